"""``cafe models …``: write the tiny set, load and check every role.

Usage::

    make_tiny_models("models/tiny")
    rows = check_models("configs/tiny.yaml")       # or a directory holding one folder per role
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ROLE_NAMES, CafeConfig, ModelsConfig, load_config

log = logging.getLogger(__name__)


class ModelMismatch(RuntimeError):
    """A worker's model copy is not the one the driver keyed the work by."""


def check_fingerprints(dirs: dict[str, str | os.PathLike], want: dict[str, str], who: str) -> None:
    """Every directory of ``dirs`` has the fingerprint the driver recorded in ``want`` (names missing from ``want``
    are not checked): a node whose copy differs (a stale sync, another mount) fails loudly, before loading it,
    instead of producing rows or weights under the wrong key."""
    from training.models.fingerprint import fingerprint

    for name, directory in dirs.items():
        if want.get(name) is None:
            continue
        got = fingerprint(directory) if Path(directory).is_dir() else "missing"
        if got != want[name]:
            raise mismatch(who, name, directory, got, want[name])


def mismatch(who: str, name: str, where, got: str, want: str) -> ModelMismatch:
    """The one error for a worker whose model copy (``name`` at ``where``) is not the driver's."""
    import socket

    return ModelMismatch(f"{who} on {socket.gethostname()}: {name} at {where} has fingerprint {got}, the driver's "
                         f"is {want}: this node's model copy differs from the driver's (sync the models volume or "
                         "the node's copy) — nothing was written")


@dataclass
class CheckRow:
    role: str
    class_name: str
    num_parameters: int
    dtype: str
    load_seconds: float
    outputs: dict
    fingerprint: str
    path: str


def make_tiny_models(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write a complete, seeded tiny set of every role into ``out_dir`` (see :mod:`training.models.tiny`)."""
    from training.models.tiny import make_tiny

    return make_tiny(out_dir, seed=seed, overwrite=overwrite)


def ensure_models(cfg: CafeConfig) -> None:
    """Create the tiny set when ``models.make_tiny_if_missing`` is on and a role directory is missing."""
    missing = [r for r in ROLE_NAMES if not cfg.models.role_dir(r).is_dir()]
    if missing and cfg.models.make_tiny_if_missing:
        log.info("models: %s missing under %s; writing the tiny set", ", ".join(missing), cfg.models.root)
        make_tiny_models(cfg.models.root, seed=cfg.run.seed)


def models_config_for(target: str | os.PathLike, overrides: list[str] | None = None) -> ModelsConfig:
    """A directory (one sub-folder per role) or a config file → the :class:`ModelsConfig` to load."""
    p = Path(target)
    if p.is_dir():
        return ModelsConfig(root=str(p))
    return load_config(p, overrides).models


def check_models(target: str | os.PathLike, overrides: list[str] | None = None,
                 roles: list[str] | None = None) -> list[CheckRow]:
    """Load every role (or ``roles``), run one forward pass each, return one row per role.

    Raises :class:`training.models.kit.ModelLoadError` on the first unusable role.
    """
    from training.models.kit import load_role, smoke_forward

    models = models_config_for(target, overrides)
    rows = []
    for role in roles or ROLE_NAMES:
        spec = models.role_spec(role)
        loaded = load_role(role, models.role_dir(role), dtype=spec.dtype, device=spec.device)
        outputs = smoke_forward(loaded)
        rows.append(CheckRow(role, loaded.class_name, loaded.num_parameters, loaded.dtype,
                             loaded.load_seconds, outputs, loaded.fingerprint, str(loaded.path)))
        log.info("models: %s ok (%s)", role, loaded.class_name)
    return rows


def format_check_table(rows: list[CheckRow]) -> str:
    header = ("role", "class", "params", "dtype", "load s", "forward outputs")
    body = [
        (r.role, r.class_name, f"{r.num_parameters:,}", r.dtype, f"{r.load_seconds:.2f}",
         " ".join(f"{k}={list(v)}" for k, v in r.outputs.items()))
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])
