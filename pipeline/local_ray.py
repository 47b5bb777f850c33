"""Start or connect to Ray — loopback-only for local clusters (ENV.md §9).

Usage::

    with ray_session(cfg.ray, runtime_env_dirs=["pipeline", "training", "filtering"]):
        ...  # Ray Data / Train / actors

``address: null`` starts a local cluster whose listeners bind 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
set in :mod:`pipeline` before Ray is imported) and sets ``GLOO_SOCKET_IFNAME=lo`` for any torch.distributed
group. An explicit address (``ray://…``, ``host:port`` or ``auto``) connects to an existing cluster instead.
"""
from __future__ import annotations

import contextlib
import logging
import os

import pipeline  # noqa: F401  (loopback env vars before ray is imported)

log = logging.getLogger(__name__)


def _loopback_env() -> dict[str, str]:
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


def start_ray(ray_cfg, address: str | None = None):
    """Initialise Ray once per process; return True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or ray_cfg.address
    if ray_cfg.loopback_only and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError(
            "ray.loopback_only is set but RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is not '0': unset it or set "
            "ray.loopback_only=false to let a local cluster listen on every interface"
        )
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    env_vars.update(_loopback_env() if ray_cfg.loopback_only else {})
    kwargs = dict(include_dashboard=ray_cfg.include_dashboard, log_to_driver=ray_cfg.log_to_driver,
                  runtime_env={"env_vars": env_vars})
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
    return True


@contextlib.contextmanager
def ray_session(ray_cfg, address: str | None = None):
    """Context manager around :func:`start_ray`; shuts Ray down only if it started it."""
    import ray

    started = start_ray(ray_cfg, address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
