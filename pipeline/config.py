"""Typed configuration tree: YAML files + ``--set`` overrides, validated as a whole before Ray starts.

Usage::

    cfg = load_config("configs/tiny.yaml", overrides=["build.num_sources=8"])

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or an
out-of-range value is an error, and *all* errors of a file are reported at once as
``FILE: key.path = value: what is allowed``. Types are strict (``true`` is not a number, ``"3"`` is not an
int, ``.inf``/``.nan`` are refused; an int is fine where a float is expected), resources have upper bounds
(``MAX_*`` in :mod:`pipeline.build_config`), and a mapping given for a section — in YAML or through
``--set`` — is merged into that section's defaults. String values may reference environment variables as
``${VAR}`` or ``${VAR:-default}`` (used for the models root and secrets' *names*, never secret values); the
result is a string, so numeric keys take literal numbers. Relative paths are resolved against the current
working directory when used.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.build_config import BuildConfig, _deep_merge, _Strict
from pipeline.cluster.config import DeployConfig
from pipeline.concepts_config import ConceptsConfig
from pipeline.train_config import TrainConfig
from pipeline.local_ray import looks_secret
from pipeline.loop.config import LoopConfig

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

__all__ = [
    "ConfigError",
    "CafeConfig",
    "ModelsConfig",
    "RayConfig",
    "RoleSpec",
    "ROLE_NAMES",
    "load_config",
    "load_config_dict",
    "apply_overrides",
    "config_hash",
]


class ConfigError(ValueError):
    """A config could not be loaded; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  {e}" for e in errors))


# ---------------------------------------------------------------------------------------------
# run / ray
# ---------------------------------------------------------------------------------------------


class RunConfig(_Strict):
    name: str = Field("cafe", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    output_dir: str = "outputs"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


#: environment variables forwarded to Ray workers by default: the offline switches and the HF cache location.
#: Credentials (``HF_TOKEN``, keys) are refused here: runtime_env values show in job info and in Ray's logs.
DEFAULT_FORWARD_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HOME",
                       "HF_HUB_DISABLE_PROGRESS_BARS")

#: bounds for a local cluster started by ``ray.init`` (one machine)
MAX_LOCAL_CPUS = 4096
MAX_LOCAL_GPUS = 64


#: a Ray cluster address: ``auto``, ``host:port`` (IPv4, a name, or ``[IPv6]``) or ``ray://host:port``
RAY_ADDRESS_PATTERN = r"^(auto|(ray://)?([A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5})$"


class RayConfig(_Strict):
    """Where Ray runs (see :mod:`pipeline.local_ray`).

    ``address: null`` starts a local cluster sized by ``num_cpus``/``num_gpus``/``object_store_memory_mb``;
    ``loopback_only`` keeps that cluster on 127.0.0.1. An address (``auto``, ``host:port``, ``ray://…``)
    connects to an existing cluster, and those keys do not apply. ``forward_env`` names the driver's
    environment variables that workers receive through the job's runtime_env; credentials are refused there
    (the nodes must have them: a Kubernetes Secret, workload identity, or for a local cluster the driver's own
    environment).
    """

    #: ``auto``, ``host:port`` or ``ray://host:port`` (null: a local cluster)
    address: str | None = Field(None, pattern=RAY_ADDRESS_PATTERN)
    num_cpus: int | None = Field(2, ge=1, le=MAX_LOCAL_CPUS)
    num_gpus: int | None = Field(None, ge=0, le=MAX_LOCAL_GPUS)
    object_store_memory_mb: int | None = Field(None, ge=64, le=1 << 24)  # 16 TiB
    loopback_only: bool = True
    include_dashboard: bool = False
    log_to_driver: bool = False
    forward_env: list[str] = Field(default_factory=lambda: list(DEFAULT_FORWARD_ENV), max_length=256)

    @field_validator("forward_env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for i, name in enumerate(names):
            if not _ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"forward_env[{i}] = {name!r} is not an environment variable name "
                                 "([A-Za-z_][A-Za-z0-9_]*); list variable names, never values")
            if looks_secret(name):
                raise ValueError(f"forward_env[{i}] = {name!r} looks like a credential: credentials never travel "
                                 "in a Ray runtime_env (job info shows it and Ray logs it in plain text); set it "
                                 "in the nodes' environment instead (a Kubernetes Secret, workload identity; a local "
                                 "cluster inherits the driver's environment)")
        return names


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

#: every model role the system knows (SPEC §1–§2, §4.5); the kit maps each to a loader.
ROLE_NAMES = (
    "t2i",
    "clip_filter",
    "dino_filter",
    "clip_cond",
    "dino_cond",
    "llm",
    "dialogue_llm",
    "promptnet",
)


class RoleSpec(_Strict):
    """One model role: a local directory in its library's standard layout.

    In :class:`ModelsConfig` each role defaults to ``path: <role name>``; a mapping that leaves ``path`` out
    (``--set models.t2i.dtype=float16``) keeps that default.
    """

    path: str = Field(..., min_length=1, description="directory, absolute or relative to models.root")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|auto)$")


class ModelsConfig(_Strict):
    """The model kit's view of the config: ``root`` + one :class:`RoleSpec` per role."""

    root: str = Field("models", min_length=1)
    t2i: RoleSpec = RoleSpec(path="t2i")
    clip_filter: RoleSpec = RoleSpec(path="clip_filter")
    dino_filter: RoleSpec = RoleSpec(path="dino_filter")
    clip_cond: RoleSpec = RoleSpec(path="clip_cond")
    dino_cond: RoleSpec = RoleSpec(path="dino_cond")
    llm: RoleSpec = RoleSpec(path="llm")
    dialogue_llm: RoleSpec = RoleSpec(path="dialogue_llm")
    promptnet: RoleSpec = RoleSpec(path="promptnet")
    #: create the tiny set in ``root`` when it is missing (only sensible for the embedded default)
    make_tiny_if_missing: bool = False

    def role_dir(self, role: str) -> Path:
        if role not in ROLE_NAMES:
            raise ValueError(f"unknown model role {role!r}; allowed: {', '.join(ROLE_NAMES)}")
        spec: RoleSpec = getattr(self, role)
        p = Path(spec.path)
        return p if p.is_absolute() else Path(self.root) / p

    def role_spec(self, role: str) -> RoleSpec:
        self.role_dir(role)  # validates the name
        return getattr(self, role)


# ---------------------------------------------------------------------------------------------
# the whole tree
# ---------------------------------------------------------------------------------------------


class CafeConfig(_Strict):
    """Root of the config tree. Later sections (train, concepts, pipeline, deploy) sit beside ``build``."""

    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    models: ModelsConfig = ModelsConfig()
    build: BuildConfig = BuildConfig()
    train: TrainConfig = TrainConfig()
    concepts: ConceptsConfig = ConceptsConfig()
    pipeline: LoopConfig = LoopConfig()
    deploy: DeployConfig = DeployConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "CafeConfig":
        return self


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: str, errors: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, str):

        def repl(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            errors.append(f"{path} = {value!r}: environment variable {var} is not set and has no default")
            return m.group(0)

        return _ENV_RE.sub(repl, value)
    return value


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    out = json.loads(json.dumps(data))
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ValueError(
                    f"--set {item!r}: {'.'.join(parts[: i + 1])} is a {type(nxt).__name__}, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _lookup(data: Any, loc: tuple) -> Any:
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node


def _format_validation_error(exc: ValidationError, data: dict) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        value = _lookup(data, loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        else:
            msg = err["msg"]
        shown = value if value == "<missing>" else json.dumps(value, default=str)
        if isinstance(shown, str) and len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{_fmt_loc(loc) or '<root>'} = {shown}: {msg}")
    return lines


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = CafeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def load_config_dict(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> CafeConfig:
    """Validate a raw mapping (plus overrides) into a :class:`CafeConfig`; raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<root> = {type(data).__name__}: the file must hold a mapping"])
    try:
        data = apply_overrides(data, overrides)
    except ValueError as exc:
        raise ConfigError(source, [str(exc)]) from None
    errors: list[str] = []
    data = _expand_env(data, "", errors)
    try:
        cfg = CafeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, errors + _format_validation_error(exc, data)) from None
    if errors:
        raise ConfigError(source, errors)
    return cfg


def read_config_data(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config file's mapping with its ``base:`` chain merged under it (the file's own keys win).

    ``base: other.yaml`` (relative to the file) lets a file extend another one: a concept job file extends the
    embedded default this way. A top-level ``jobs:`` list (concept job files) is returned as it is; only the
    file itself may carry it, not its bases.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["not UTF-8 text"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return data
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(str(path), [f"base = {base!r}: expected a path to a config file"])
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(str(path), [f"base = {base!r}: a cycle of base files"])
    parent = read_config_data(base_path, _seen + (base_path,))
    if not isinstance(parent, dict):
        raise ConfigError(str(base_path), ["<root>: the file must hold a mapping"])
    parent.pop("jobs", None)
    return _deep_merge(parent, data)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> CafeConfig:
    """Load ``path`` (YAML, with its ``base:`` chain) with ``--set`` style overrides; raise :class:`ConfigError`
    listing every problem. A concept job file's ``jobs:`` list is not part of the tree and is ignored here (see
    :func:`pipeline.concept_jobs.load_jobs`)."""
    data = read_config_data(path)
    if isinstance(data, dict):
        data.pop("jobs", None)
    return load_config_dict(data, str(path), overrides)


def check_paths(cfg: CafeConfig) -> list[str]:
    """Return one message per configured model directory that does not exist."""
    missing = []
    for role in ROLE_NAMES:
        d = cfg.models.role_dir(role)
        if not d.is_dir():
            missing.append(f"models.{role}.path -> {d}: directory does not exist")
    return missing


def config_hash(cfg: CafeConfig, sections: tuple[str, ...] | None = None) -> str:
    """Stable sha256 of the resolved config (or of some sections), used in manifests and ledgers."""
    dumped = cfg.model_dump(mode="json")
    if sections is not None:
        dumped = {k: dumped[k] for k in sections}
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def locations(cfg: CafeConfig) -> dict[str, str]:
    """Every configured storage location (inputs, outputs, checkpoints, logs, registry): config key -> value.

    What a cluster launch checks (each must be a shared URI or a shared mount) and what ``deploy render`` mounts.
    """
    out = {"run.output_dir": cfg.run.output_dir, "models.root": str(cfg.models.root),
           "build.sources.path": cfg.build.sources.path, "train.storage_path": cfg.train.storage_path,
           "train.output_dir": cfg.train.output_dir, "train.log_dir": cfg.train.log_dir,
           "pipeline.output": cfg.pipeline.output, "pipeline.registry": cfg.pipeline.registry,
           "concepts.output": cfg.concepts.output}
    out.update({f"train.data.datasets[{i}]": d for i, d in enumerate(cfg.train.data.datasets)})
    return {k: v for k, v in out.items() if v}

