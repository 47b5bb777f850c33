"""Shared fixtures: the tiny model set (written once per session), a no-network guard, the GPU marker.

Tests never reach a network: every socket ``connect`` to a non-loopback address raises inside the test
process (audit hook below), and ``make test`` runs the whole suite in a network namespace that has only
loopback when it can (root), so Ray workers and subprocesses are cut off too.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _no_network_hook(event: str, args) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
            raise ConnectionRefusedError(f"test tried to reach the network: {address!r}")


sys.addaudithook(_no_network_hook)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Directory with a complete tiny set of every role (written once per session, seed 0)."""
    from training.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    make_tiny(root, seed=0)
    return root


@pytest.fixture(scope="module")
def ray_local():
    """One local, loopback-only Ray cluster per test module (2 CPUs, no dashboard).

    ``ray_session`` applies the loopback settings before Ray starts and restores the driver's environment after.
    """
    from pipeline.config import RayConfig
    from pipeline.local_ray import ray_session

    with ray_session(RayConfig(num_cpus=2)):
        import ray

        yield ray
