"""Start a local loopback-only Ray cluster, or connect to an existing one (ENV.md §9).

Usage::

    with ray_session(cfg, address=None):    # cfg: the whole CafeConfig (a bare RayConfig also works)
        ...  # Ray Data / Train / actors

**Local cluster** (``ray.address: null`` and no ``address``): with ``ray.loopback_only`` (the default) the driver
sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``GLOO_SOCKET_IFNAME=lo`` in its own environment right before
``ray.init`` and puts both in the job's runtime_env, so every Ray listener and every gloo socket binds 127.0.0.1.
Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray._private.ray_constants`` is first imported (it
turns ``ENABLE_RAY_CLUSTER`` off, and ``get_node_ip_address`` then answers 127.0.0.1), and the raylet and workers
inherit it from the driver's environment. :func:`start_ray` therefore sets the variable before its own
``import ray``; when Ray was already imported in this process it also sets the flag that import derived from the
variable. :func:`ray_session` restores the driver's environment and that flag when it shuts the cluster down.

**Existing cluster** (an address: ``auto``, ``host:port`` or ``ray://…``): neither variable is set or forwarded;
that cluster's own network settings apply (a driver pinned to 127.0.0.1 could not be reached by other nodes).
One exception, inside this process only: for an address on 127.0.0.1/``localhost`` the driver turns the same flag
off, because otherwise Ray rewrites 127.0.0.1 into the machine's external IP and cannot reach a cluster that
listens on loopback only (its other nodes, being reached at 127.0.0.1, are on this machine anyway).

**Environment of workers: no credential travels in a runtime_env.** runtime_env values are readable by anyone who
can read the cluster's job info, and Ray writes them in plain text into every session's ``runtime_env_agent.log``,
files that outlive the run. So credentials (the dialogue backend's key, ``AWS_*`` for ``s3://`` locations, tokens)
reach workers only through the environment the nodes already have: on Kubernetes a Secret mounted as variables or
workload identity (``deploy/``); on a local cluster the driver's own environment, which ``ray.init`` hands to the
raylet and every worker it starts. Exactly the names in ``ray.forward_env`` travel in the runtime_env, and the
config refuses names that look like credentials there (:func:`looks_secret`). The names the config declares it
needs (:func:`declared_env_names`, e.g. ``build.dialogue.openai.api_key_env``) are checked, by name, where they
must be set: in the driver for a local cluster, on every alive node of an existing one
(:func:`missing_on_nodes`). Values are never logged.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Iterable

log = logging.getLogger(__name__)

__all__ = ["LOOPBACK_ENV", "declared_env_names", "forwarded_env", "looks_secret", "missing_on_nodes", "runtime_env_vars",
           "start_ray", "ray_session"]

#: set in the driver and the runtime_env of a local loopback-only cluster, and nowhere else
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}

# what start_ray changed in this process (a local cluster, or an address on loopback): variable -> previous value
# (None: unset), and the previous ray_constants.ENABLE_RAY_CLUSTER under the key "ENABLE_RAY_CLUSTER"
_saved_driver_state: dict[str, object] | None = None


def _sections(cfg):
    """``(ray_cfg, whole_cfg or None)`` from a CafeConfig or a bare RayConfig."""
    from pipeline.config import RayConfig

    return (cfg, None) if isinstance(cfg, RayConfig) else (cfg.ray, cfg)


def looks_secret(name: str) -> bool:
    """True for a variable name that looks like a credential (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ...)."""
    return any(w in name.upper() for w in ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL"))


def declared_env_names(cfg) -> dict[str, str]:
    """Environment variables the config says its workers need: name -> the config key that names it.

    Today: the OpenAI-compatible dialogue backend's key. These are checked by name (:func:`start_ray`), never
    forwarded: the nodes must have them (see the module docstring).
    """
    _, whole = _sections(cfg)
    names: dict[str, str] = {}
    if whole is None:
        return names
    dialogue = whole.build.dialogue
    if dialogue.backend == "openai" and dialogue.openai.api_key_env:
        names[dialogue.openai.api_key_env] = "build.dialogue.openai.api_key_env"
    return names


def forwarded_env(cfg) -> dict[str, str]:
    """The driver's variables that Ray workers receive through the runtime_env: the names in ``ray.forward_env``
    (which never look like credentials, see :class:`~pipeline.config.RayConfig`) that are set in this process.
    Logs names, never values."""
    ray_cfg, _ = _sections(cfg)
    env = {name: os.environ[name] for name in ray_cfg.forward_env if name in os.environ and not looks_secret(name)}
    log.debug("forwarding to Ray workers: %s", ", ".join(sorted(env)) or "nothing")
    return env


def runtime_env_vars(cfg, address: str | None = None) -> dict[str, str]:
    """``env_vars`` of the job's runtime_env: :func:`forwarded_env`, plus :data:`LOOPBACK_ENV` for a local
    loopback-only cluster (never for an existing cluster)."""
    ray_cfg, _ = _sections(cfg)
    env = forwarded_env(cfg)
    if not (address or ray_cfg.address) and ray_cfg.loopback_only:
        env.update(LOOPBACK_ENV)
    return env


def missing_on_nodes(names: Iterable[str]) -> dict[str, list[str]]:
    """For a connected Ray cluster: node id -> the given variable names that are unset on that node (nodes that
    have all of them are left out). One zero-CPU task per alive node reports presence only, never a value."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = sorted(set(names))
    if not names:
        return {}

    @ray.remote(num_cpus=0, max_retries=0)
    def _unset(wanted: list[str]) -> list[str]:
        return [n for n in wanted if not os.environ.get(n)]

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [_unset.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(names)
            for node in nodes]
    return {node: miss for node, miss in zip(nodes, ray.get(refs, timeout=120)) if miss}


def _check_declared(cfg, existing: bool) -> None:
    """Warn, by name, about a declared variable the workers will not have (see the module docstring)."""
    declared = declared_env_names(cfg)
    if not declared:
        return
    if not existing:
        for name, key in declared.items():
            if not os.environ.get(name):
                log.warning("%s names %s, which is not set in this environment; the workers of the local cluster "
                            "will not have it", key, name)
        return
    try:
        missing = missing_on_nodes(declared)
    except Exception as exc:  # noqa: BLE001 - a check, not a requirement: a node going away must not stop the run
        log.warning("could not check the nodes for %s: %s", ", ".join(declared), exc)
        return
    for node, names in missing.items():
        log.warning("node %s lacks %s (named by %s): set it in the nodes' environment (a Kubernetes Secret, "
                    "docs/cluster.md); credentials never travel in the job's runtime_env", node[:12],
                    ", ".join(names), ", ".join(declared[n] for n in names))


def _is_loopback_address(address: str) -> bool:
    """True for a literal ``host:port`` whose host is 127.x.x.x, ``::1`` or ``localhost``."""
    if "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pin_driver_to_loopback(set_env: bool) -> None:
    """Make Ray in this process treat 127.0.0.1 as this machine's address; remember what was there.

    ``set_env``: also set :data:`LOOPBACK_ENV` in ``os.environ`` (a local cluster: its raylet and workers inherit
    them). Without it only this process's flag changes (connecting to an address on 127.0.0.1).
    """
    global _saved_driver_state

    if set_env:
        clashes = [f"{k}={os.environ[k]!r}" for k, v in LOOPBACK_ENV.items() if os.environ.get(k, v) != v]
        if clashes:
            raise RuntimeError(f"ray.loopback_only is set but the environment has {', '.join(clashes)}: unset it, "
                               "or set ray.loopback_only=false to let a local cluster listen on every interface")
    saved: dict[str, object] = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    if set_env:
        os.environ.update(LOOPBACK_ENV)  # before the first `import ray` of the process, when this is it
    from ray._private import ray_constants

    saved["ENABLE_RAY_CLUSTER"] = ray_constants.ENABLE_RAY_CLUSTER
    # The flag RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER controls, derived once at `import ray` and read at call time by
    # ray._private.services.get_node_ip_address; set here too in case Ray was imported before the variable.
    ray_constants.ENABLE_RAY_CLUSTER = False
    if _saved_driver_state is None:
        _saved_driver_state = saved


def _restore_driver_state() -> None:
    global _saved_driver_state

    if _saved_driver_state is None:
        return
    saved, _saved_driver_state = _saved_driver_state, None
    for name in LOOPBACK_ENV:
        if saved[name] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved[name]  # type: ignore[assignment]
    ray_constants = sys.modules.get("ray._private.ray_constants")
    if ray_constants is not None:
        ray_constants.ENABLE_RAY_CLUSTER = saved["ENABLE_RAY_CLUSTER"]


def _minus_job_env(env_vars: dict[str, str]) -> dict[str, str]:
    """Inside a submitted job, the job's runtime env already holds variables (``cafe submit`` puts
    ``ray.forward_env`` there) and Ray refuses a ``ray.init`` that names the same keys again: leave those out."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return env_vars
    job_env = ((json.loads(injected).get("runtime_env") or {}).get("env_vars") or {})
    return {k: v for k, v in env_vars.items() if k not in job_env}


def start_ray(cfg, address: str | None = None) -> bool:
    """Initialise Ray once per process; return True when this call started it.

    Args:
        cfg: the whole :class:`~pipeline.config.CafeConfig` (its ``ray`` section and the env names it declares),
            or just a :class:`~pipeline.config.RayConfig`.
        address: overrides ``ray.address``; ``None`` and ``ray.address: null`` start a local cluster, unless
            ``RAY_ADDRESS`` is set (a driver inside a submitted Ray job): then that cluster is joined.
    """
    ray_cfg, _ = _sections(cfg)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    # inside a submitted Ray job (`cafe submit`), the job supervisor sets RAY_ADDRESS: join that cluster
    address = address or ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    env_vars = runtime_env_vars(cfg, address)
    if not address and ray_cfg.loopback_only:
        _pin_driver_to_loopback(set_env=True)
    elif address and _is_loopback_address(address):
        _pin_driver_to_loopback(set_env=False)
    import ray

    kwargs = dict(include_dashboard=ray_cfg.include_dashboard, log_to_driver=ray_cfg.log_to_driver)
    env_vars = _minus_job_env(env_vars)
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    try:
        if address:
            log.info("connecting to Ray at %s", address)
            ray.init(address=address, **kwargs)
        else:
            if ray_cfg.num_cpus is not None:
                kwargs["num_cpus"] = ray_cfg.num_cpus
            if ray_cfg.num_gpus is not None:
                kwargs["num_gpus"] = ray_cfg.num_gpus
            if ray_cfg.object_store_memory_mb is not None:
                kwargs["object_store_memory"] = ray_cfg.object_store_memory_mb << 20
            log.info("starting a local Ray cluster (loopback only: %s)", ray_cfg.loopback_only)
            ray.init(**kwargs)
    except BaseException:
        _restore_driver_state()
        raise
    _check_declared(cfg, existing=bool(address))
    return True


def quiet_data(verbose: bool | None = None) -> None:
    """Ray Data's console for this driver: its progress bars where a terminal is attached, and otherwise nothing
    every 10 s (the project prints its own progress lines); the execution plan and per-dataset INFO lines only at
    ``--log-level DEBUG``. Its high-memory issue detector is silenced: it warns about every actor pool that
    declares no ``memory`` (each of ours), whatever the node has free — object-store pressure is Ray's own
    backpressure's job, and a worker killed for memory is retried as an infrastructure fault."""
    import logging
    import sys

    from ray.data import DataContext

    if verbose is None:
        verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stdout.isatty()
    ctx.print_on_execution_start = verbose
    detectors = getattr(getattr(ctx, "issue_detectors_config", None), "detectors", None)
    if detectors is not None:
        ctx.issue_detectors_config.detectors = [d for d in detectors if "HighMemory" not in getattr(d, "__name__", "")]
    logging.getLogger("ray.data").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # (its one-line notices "progress bars disabled" / "progress will be logged")
    logging.getLogger("ray.data._internal.progress").setLevel(logging.DEBUG if verbose else logging.ERROR)


@contextlib.contextmanager
def ray_session(cfg, address: str | None = None):
    """Context manager around :func:`start_ray`; shuts Ray down (and restores the driver's environment) only if
    it started it."""
    started = start_ray(cfg, address)
    quiet_data()
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
            _restore_driver_state()


def node_facts() -> tuple[str | None, set[str] | None]:
    """(this process's Ray node id, the alive node ids), or (None, None) outside Ray or when the GCS does not
    answer: the generation ledger uses them to leave attempts on lost nodes out of a chunk's count."""
    try:
        import ray

        if not ray.is_initialized():
            return None, None
        return ray.get_runtime_context().get_node_id(), {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001 - a refinement of the count, never a reason to fail
        return None, None
