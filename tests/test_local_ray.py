"""The project's local Ray cluster listens on loopback only; the test guard refuses the network."""
import ipaddress
import socket

import psutil
import pytest


def test_network_guard_refuses_non_loopback():
    s = socket.socket()
    s.settimeout(0.5)
    with pytest.raises(ConnectionRefusedError, match="test tried to reach the network"):
        s.connect(("10.255.255.1", 9))
    s.close()


@pytest.mark.integration
def test_local_ray_listens_on_loopback_only(ray_local):
    ray = ray_local

    @ray.remote
    def pid():
        import os
        return os.getpid()

    worker_pid = ray.get(pid.remote())
    ray_pids = {worker_pid}
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(k in cmd for k in ("gcs_server", "raylet", "ray::", "default_worker", "dashboard", "runtime_env")):
            ray_pids.add(p.pid)
    listeners = []
    for pid_ in ray_pids:
        try:
            conns = psutil.Process(pid_).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listeners += [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    assert listeners, "found no Ray listeners to check"
    def loopback(ip):
        a = ipaddress.ip_address(ip)
        return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)

    exposed = [addr for addr in listeners if not loopback(addr.ip)]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
