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

**Environment of workers.** Workers of an existing cluster do not inherit the driver's environment; exactly the
variables :func:`forwarded_env` returns travel in the runtime_env: the names in ``ray.forward_env``, the names
the config declares it needs (:func:`declared_env_names`, e.g. ``build.dialogue.openai.api_key_env``) and the
names the caller passes as ``extra_env`` (the build passes the ``AWS_*`` credentials for ``s3://`` locations).
runtime_env values are visible to whoever can read the cluster's job info, which is why the list is explicit and
tokens such as ``HF_TOKEN`` are not forwarded unless named. Values are never logged.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import Iterable

log = logging.getLogger(__name__)

__all__ = ["LOOPBACK_ENV", "declared_env_names", "forwarded_env", "runtime_env_vars", "start_ray", "ray_session"]

#: set in the driver and the runtime_env of a local loopback-only cluster, and nowhere else
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}

# what start_ray changed in this process (a local cluster, or an address on loopback): variable -> previous value
# (None: unset), and the previous ray_constants.ENABLE_RAY_CLUSTER under the key "ENABLE_RAY_CLUSTER"
_saved_driver_state: dict[str, object] | None = None


def _sections(cfg):
    """``(ray_cfg, whole_cfg or None)`` from a CafeConfig or a bare RayConfig."""
    from pipeline.config import RayConfig

    return (cfg, None) if isinstance(cfg, RayConfig) else (cfg.ray, cfg)


def declared_env_names(cfg) -> dict[str, str]:
    """Environment variables the config says workers need: name -> the config key that names it.

    Today: the OpenAI-compatible dialogue backend's key. A future config section that names variables (a
    ``storage`` section naming credentials) adds its names here; credentials that depend on a run's locations
    (``AWS_*`` for ``s3://``) come from the caller as ``extra_env`` instead.
    """
    _, whole = _sections(cfg)
    names: dict[str, str] = {}
    if whole is None:
        return names
    dialogue = whole.build.dialogue
    if dialogue.backend == "openai" and dialogue.openai.api_key_env:
        names[dialogue.openai.api_key_env] = "build.dialogue.openai.api_key_env"
    return names


def forwarded_env(cfg, extra_env: Iterable[str] = ()) -> dict[str, str]:
    """The driver's variables that Ray workers receive.

    Args:
        cfg: a CafeConfig (or a bare RayConfig).
        extra_env: more variable *names* the caller knows workers need (e.g. the ``AWS_*`` credentials when an
            input or output is an ``s3://`` URI).

    Returns:
        name -> value for the names in ``ray.forward_env``, :func:`declared_env_names` and ``extra_env`` that
        are set in this process. Logs names, never values.
    """
    ray_cfg, _ = _sections(cfg)
    declared = declared_env_names(cfg)
    names = list(dict.fromkeys([*ray_cfg.forward_env, *declared, *extra_env]))
    env = {name: os.environ[name] for name in names if name in os.environ}
    for name, key in declared.items():
        if name not in os.environ:
            log.warning("%s names %s, which is not set in this environment; workers will not have it", key, name)
    log.debug("forwarding to Ray workers: %s", ", ".join(sorted(env)) or "nothing")
    return env


def runtime_env_vars(cfg, address: str | None = None, extra_env: Iterable[str] = ()) -> dict[str, str]:
    """``env_vars`` of the job's runtime_env: :func:`forwarded_env`, plus :data:`LOOPBACK_ENV` for a local
    loopback-only cluster (never for an existing cluster)."""
    ray_cfg, _ = _sections(cfg)
    env = forwarded_env(cfg, extra_env)
    if not (address or ray_cfg.address) and ray_cfg.loopback_only:
        env.update(LOOPBACK_ENV)
    return env


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


def start_ray(cfg, address: str | None = None, extra_env: Iterable[str] = ()) -> bool:
    """Initialise Ray once per process; return True when this call started it.

    Args:
        cfg: the whole :class:`~pipeline.config.CafeConfig` (its ``ray`` section and the env names it declares),
            or just a :class:`~pipeline.config.RayConfig`.
        address: overrides ``ray.address``; ``None`` and ``ray.address: null`` start a local cluster.
        extra_env: more variable names to forward to workers (see :func:`forwarded_env`).
    """
    ray_cfg, _ = _sections(cfg)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    address = address or ray_cfg.address
    env_vars = runtime_env_vars(cfg, address, extra_env)
    if not address and ray_cfg.loopback_only:
        _pin_driver_to_loopback(set_env=True)
    elif address and _is_loopback_address(address):
        _pin_driver_to_loopback(set_env=False)
    import ray

    kwargs = dict(include_dashboard=ray_cfg.include_dashboard, log_to_driver=ray_cfg.log_to_driver)
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
    return True


@contextlib.contextmanager
def ray_session(cfg, address: str | None = None, extra_env: Iterable[str] = ()):
    """Context manager around :func:`start_ray`; shuts Ray down (and restores the driver's environment) only if
    it started it."""
    started = start_ray(cfg, address, extra_env)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
            _restore_driver_state()
