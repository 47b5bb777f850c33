"""Run any ``cafe`` command on a running Ray cluster through Ray's Job Submission SDK, and manage those jobs.

Usage::

    cafe submit --address http://HEAD:8265 -- cafe pipeline run configs/paper.yaml
    cafe jobs list|status|logs [--follow]|stop JOB_ID [--address ...]

What :func:`submit` does, in order, before anything reaches the cluster:

1. parses the entrypoint with ``cafe``'s own argument parser (a typo fails here, exit 2) and, when the command
   takes a config, loads and validates it with its ``--set`` overrides (exit 3) — the config file must lie inside
   the uploaded working directory, since that is where the job will read it;
2. for a cluster that is not on this machine, refuses output locations that only exist on one node (a relative
   local path: use ``s3://…`` or an absolute path on a shared mount);
3. builds the runtime environment: the working directory (the project, without outputs, models and virtual
   environments; or nothing with ``--no-upload`` when the image already holds the project), optional wheels
   (``py_modules``) and pinned requirements (``pip``), and ``env_vars`` = the config's ``ray.forward_env`` only.
   **No credential travels in a runtime_env**: job info shows it to anyone who can list jobs and Ray writes it in
   plain text into ``runtime_env_agent.log``. The job's driver and workers read credentials from the nodes'
   environment (Kubernetes Secrets, workload identity; ``deploy/``).

Then it submits, prints the job id, streams the logs until the job ends (Ctrl-C detaches; the job keeps running)
and returns the remote command's exit status (``driver_exit_code``; 1 when the job failed without one, 130 when it
was stopped). Ray's token authentication is taken from the environment by the SDK itself (``RAY_AUTH_MODE=token``
with ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``); the address from ``--address`` or ``RAY_API_SERVER_ADDRESS`` /
``RAY_ADDRESS`` (an ``http://`` dashboard URL).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

__all__ = ["SubmitError", "Submission", "prepare", "submit", "client", "exit_status", "wait_and_stream",
           "UPLOAD_EXCLUDES"]

#: never uploaded with the working directory: outputs, environments, caches, VCS data (model directories under
#: ``models/`` are left out too, except the one the command's config reads: see :func:`_model_excludes`)
UPLOAD_EXCLUDES = [".git", ".venv", "venv", "outputs", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
                   "bench/out", "build", "dist", "tb"]
#: the most model data a working directory may carry (Ray packs it into one object): real weights belong on the
#: cluster's storage (a shared volume at an absolute ``models.root``)
MAX_UPLOAD_MODELS = 256 << 20

#: job status -> exit status when the driver reported none
_TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


class SubmitError(ValueError):
    """The entrypoint, its config or the submission options are not usable; nothing was submitted."""


@dataclass(frozen=True)
class Submission:
    """What :func:`submit` sends: the entrypoint (a shell command line) and the runtime environment."""

    entrypoint: str
    runtime_env: dict
    submission_id: str
    metadata: dict


def dashboard_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``; must be an ``http(s)://`` URL."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) or set "
                          "RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"address {address!r}: job submission talks to the Ray dashboard, an http(s):// URL "
                          "such as http://HEAD:8265 (not the GCS host:port)")
    return address


def _is_local(address: str) -> bool:
    host = urlparse(address).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1")


def _check_entrypoint(argv: list[str], working_dir: Path | None, local_cluster: bool) -> tuple[dict, object]:
    """Parse ``cafe ARGS`` with the real parser; validate its config (with the entrypoint's ``--set``); return
    (metadata: command, config, run name; the loaded config or None for a command without one)."""
    import argparse

    from pipeline.cli import build_parser
    from pipeline.config import load_config

    if not argv or Path(argv[0]).name != "cafe":
        raise SubmitError(f"the entrypoint must be a `cafe` command (got {shlex.join(argv) or 'nothing'}): "
                          "cafe submit -- cafe pipeline run CONFIG")
    if argv[1:2] in (["submit"], ["jobs"]):
        raise SubmitError(f"`cafe {argv[1]}` runs on this machine, not as a job")
    parser = build_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(argv[1:])
    except argparse.ArgumentError as exc:
        raise SubmitError(f"the entrypoint does not parse ({exc}): {shlex.join(argv)}") from None
    except SystemExit as exc:  # a sub-command's parser printed the reason (or --help)
        raise SubmitError(f"the entrypoint does not parse: {shlex.join(argv)}") from exc
    meta = {"cafe_command": " ".join(a for a in (args.noun, getattr(args, "verb", None)) if a)}
    cfg = None
    config = getattr(args, "config", None)
    jobs = getattr(args, "jobs", None)  # a concept job file is a config too (`cafe concepts run JOBS.yaml`)
    if not config and isinstance(jobs, str) and jobs.endswith((".yaml", ".yml")):
        config = jobs
    if config:
        path = Path(config)
        if working_dir is not None:
            full = path if path.is_absolute() else working_dir / path
            if not path.is_absolute() and not full.resolve().is_relative_to(working_dir.resolve()):
                raise SubmitError(f"{config}: outside the working directory {working_dir}; the job would not find it")
        else:
            full = path
        if not full.is_file():
            raise SubmitError(f"{config}: no such config file (looked at {full})")
        cfg = load_config(full, getattr(args, "overrides", []))  # ConfigError -> exit 3
        meta["config"] = str(config)
        meta["run_name"] = cfg.run.name
        if not local_cluster:
            _check_shared_locations(cfg, meta["cafe_command"], getattr(args, "out", None))
    return meta, cfg


#: which config locations a command reads or writes (key prefixes); a command not listed uses all of them
_USES = {"build": ("run.", "build.", "models."), "train": ("train.", "models."), "cache": ("train.", "models."),
         "generate": ("train.", "models."), "concepts run": ("concepts.", "models."),
         "pipeline run": ("run.", "build.", "models.", "train.", "pipeline."),
         "retrain": ("run.", "build.", "models.", "train.", "pipeline."),
         "eval": ("run.", "models.", "train.", "pipeline.")}


def _check_shared_locations(cfg, command: str, out: str | None) -> None:
    """On a multi-node cluster a relative local path names a directory on whichever node runs the driver."""
    from pipeline.config import locations

    prefixes = _USES.get(command, ("",))
    used = {k: v for k, v in locations(cfg).items() if k.startswith(prefixes)}
    if out:
        used = {**{k: v for k, v in used.items() if k != "run.output_dir"}, "--out": out}
    bad = [f"{key} = {value}" for key, value in used.items() if "://" not in value and not Path(value).is_absolute()]
    if bad:
        raise SubmitError("these locations are relative local paths, which on a cluster exist on one node only: "
                          + "; ".join(bad) + " — use s3://… URIs or absolute paths on a shared mount (in the "
                          "config, or --set KEY=s3://… in the entrypoint)")


def prepare(argv: list[str], address: str, working_dir: str | None = ".", wheels: list[str] = (),
            requirements: str | None = None, submission_id: str | None = None) -> Submission:
    """Validate the entrypoint locally and build the submission (see the module docstring); submits nothing."""
    from pipeline.config import load_config_dict
    from pipeline.local_ray import forwarded_env

    wd = Path(working_dir).resolve() if working_dir else None
    if wd is not None and not wd.is_dir():
        raise SubmitError(f"--working-dir {working_dir}: not a directory")
    meta, cfg = _check_entrypoint(list(argv), wd, _is_local(address))
    cfg = cfg or load_config_dict({})  # a command without a config: ray.forward_env's defaults travel
    runtime_env: dict = {}
    if wd is not None:
        runtime_env["working_dir"] = str(wd)
        runtime_env["excludes"] = list(UPLOAD_EXCLUDES) + _model_excludes(wd, str(cfg.models.root))
    for w in wheels:
        if not (w.endswith(".whl") and Path(w).is_file()):
            raise SubmitError(f"--wheel {w}: not a .whl file")
    if wheels:
        runtime_env["py_modules"] = [str(Path(w).resolve()) for w in wheels]
    if requirements:
        lines = [ln.strip() for ln in Path(requirements).read_text().splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        unpinned = [ln for ln in lines if "==" not in ln and "@" not in ln and not ln.endswith(".whl")]
        if unpinned:
            raise SubmitError(f"--requirements {requirements}: pin every package (==): {', '.join(unpinned)}")
        runtime_env["pip"] = {"packages": lines}
    env = forwarded_env(cfg)  # ray.forward_env only: credentials never travel
    if env:
        runtime_env["env_vars"] = env
    sid = submission_id or f"cafe-{meta['cafe_command'].replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-" \
                           f"{uuid.uuid4().hex[:6]}"
    return Submission(entrypoint=shlex.join(argv), runtime_env=runtime_env, submission_id=sid, metadata=meta)


def _model_excludes(wd: Path, models_root: str | None) -> list[str]:
    """Leave out every directory under ``WD/models/`` but the config's ``models.root`` (when it lies there, e.g.
    the embedded default's ``models/world``); refuse to upload more than :data:`MAX_UPLOAD_MODELS` of it."""
    models = wd / "models"
    if not models.is_dir():
        return []
    keep = None
    if models_root and "://" not in models_root:
        root = (wd / models_root).resolve() if not Path(models_root).is_absolute() else Path(models_root).resolve()
        if root.is_relative_to(models.resolve()) and root != models.resolve():
            keep = root.relative_to(models.resolve()).parts[0]
    if keep is not None:
        size = sum(p.stat().st_size for p in (models / keep).rglob("*") if p.is_file())
        if size > MAX_UPLOAD_MODELS:
            raise SubmitError(f"models.root = {models_root} lies in the working directory and holds {size >> 20} MiB: "
                              "put the weights on the cluster (a shared volume) and point models.root at them "
                              "with an absolute path")
    return [f"/models/{c.name}" for c in sorted(models.iterdir()) if c.name != keep]


def client(address: str | None):
    """A :class:`ray.job_submission.JobSubmissionClient` for the dashboard at ``address`` (token auth from the
    environment, handled by the SDK)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address))


def submit(sub: Submission, address: str) -> str:
    """Submit ``sub``; return the job's submission id."""
    c = client(address)
    job_id = c.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, submission_id=sub.submission_id,
                          metadata=sub.metadata)
    log.info("submitted %s to %s", job_id, address)
    return job_id


def exit_status(info) -> int | None:
    """The job's exit status once it is terminal (the remote command's own when Ray knows it), else None."""
    status = str(getattr(info.status, "value", info.status))
    if status not in _TERMINAL:
        return None
    if status == "STOPPED":
        return _TERMINAL[status]
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    return _TERMINAL[status]


def wait_and_stream(c, job_id: str, out=None, follow: bool = True, poll_s: float = 1.0) -> int:
    """Print the job's logs as they come (``follow``), wait for it to end, return :func:`exit_status`."""
    out = out or sys.stdout
    if follow:
        async def _tail():
            async for chunk in c.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        asyncio.run(_tail())
    while True:
        code = exit_status(c.get_job_info(job_id))
        if code is not None:
            return code
        time.sleep(poll_s)
