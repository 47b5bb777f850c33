"""A throwaway two-node Ray cluster on 127.0.0.1 for integration tests (``ray start``, not ``ray.init``).

Usage::

    with two_node_cluster() as address:      # "127.0.0.1:PORT"
        start_ray(cfg, address=address)
        ...                                   # tasks with resources={"gen_node": 0.01} run on the second node

Node 1 (head): ``--num-cpus=1 --resources='{"head": 1}'``; node 2: ``--num-cpus=2 --resources='{"gen_node": 1}'``;
both ``--node-ip-address=127.0.0.1``, each with its own ``--temp-dir``. Every listener binds 127.0.0.1:

* the head runs ``ray start`` with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (ENV.md §9);
* the second node cannot: ``ray start --address`` refuses to join a cluster when that variable is 0 ("Multi-node
  Ray clusters are not supported on Windows and OSX"). Without it Ray rewrites 127.0.0.1 — the head's address and
  ``--node-ip-address`` alike — into the machine's external IP, where the head does not listen. So ``ray start``
  runs through a launcher (:data:`_RAY_START_ON_LOOPBACK`, the ``ray`` console script plus one line) in which the
  address Ray derives for "this machine" is 127.0.0.1; Ray passes 127.0.0.1 on to the raylet, agents and workers
  it starts. Both nodes use it; for the head it changes nothing.

The nodes get a clean copy of the environment: no ``RAY_ADDRESS``, no ``GLOO_SOCKET_IFNAME`` and no token-like
variables (``*TOKEN*``, ``*KEY*``, ``*SECRET*``; Ray's own ``RAY_AUTH_*`` excepted, see :func:`node_env`), so a
test can tell what reached a worker through the job's runtime_env from what the node had anyway. At exit every process of the two ``ray start`` sessions is killed
(by session id; ``ray stop`` would stop every Ray cluster of the machine).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

_DROP = ("RAY_ADDRESS", "GLOO_SOCKET_IFNAME", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
_RAY_AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # the nodes must agree with the driver

#: ``python -c`` program = the ``ray`` CLI with "this machine's IP" fixed to 127.0.0.1 (see the module docstring)
_RAY_START_ON_LOOPBACK = """
import sys
from ray._private import services
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    """The driver's environment minus Ray/gloo settings and anything that looks like a secret, with Ray's
    authentication set as the driver will find it.

    Ray 2.60's ``ray start --head`` turns token authentication on when a token is available (``~/.ray/auth_token``,
    ``RAY_AUTH_TOKEN[_PATH]``), but ``ray start --address`` and a connecting driver only when ``RAY_AUTH_MODE=token``
    is set: without it they are refused ("InvalidAuthToken"). So the mode is made explicit here — the driver's
    own, else ``token`` when a token is available, else ``disabled`` — and :func:`two_node_cluster` sets the same
    mode in the driver while the cluster is up.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in _DROP and not any(w in k.upper() for w in ("TOKEN", "KEY", "SECRET", "PASSWORD"))}
    env.update({k: os.environ[k] for k in _RAY_AUTH if k in os.environ})
    if "RAY_AUTH_MODE" not in env:
        has_token = "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env or \
            (Path.home() / ".ray" / "auth_token").is_file()
        env["RAY_AUTH_MODE"] = "token" if has_token else "disabled"
    return env


def _ray_start(args: list[str], env: dict[str, str], log: Path, sessions: list[int]) -> None:
    """Run ``ray start ARGS`` in a new session (recorded in ``sessions``); wait for it to return. The node's
    processes stay in that session."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", *args], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sessions.append(proc.pid)
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed (rc={proc.returncode}):\n{log.read_text()[-3000:]}")


def _kill_sessions(session_ids: list[int]) -> None:
    victims = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in session_ids:
                victims.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in victims):
        time.sleep(0.1)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE  # killed, waiting for its (adoptive) parent to reap it
    except psutil.Error:
        return False


#: address -> the temporary root holding every node's ``--temp-dir`` (session logs), while the cluster is up
ROOTS: dict[str, Path] = {}


@contextlib.contextmanager
def two_node_cluster(head_cpus: int = 1, gen_cpus: int = 2, node_env_extra: dict[str, str] | None = None,
                     dashboard_port: int | None = None, second_node: bool = True):
    """Start a head node and a ``gen_node`` node on 127.0.0.1; yield the GCS address; kill both at exit.

    ``node_env_extra``: variables both nodes have in their own environment (what a Kubernetes Secret or the
    node's image provides: credentials reach workers this way, never through a runtime_env).
    ``dashboard_port``: run the head's dashboard (and with it the job submission server) on 127.0.0.1:PORT.
    ``second_node=False``: the head alone.
    Sets ``RAY_AUTH_MODE`` in this process (the driver) to the nodes' mode while the cluster is up; the session
    directories are under ``ROOTS[address]``."""
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 bytes
    log = root / "ray_start.log"
    env = {**node_env(), **(node_env_extra or {})}
    sessions: list[int] = []
    driver_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
    dash = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={free_port()}"] if dashboard_port else ["--include-dashboard=false"])
    address = f"127.0.0.1:{port}"
    try:
        _ray_start(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={head_cpus}",
                    "--num-gpus=0", '--resources={"head": 1}', f"--temp-dir={root / 'head'}", *dash,
                    "--disable-usage-stats"],
                   {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, log, sessions)
        if second_node:
            _ray_start([f"--address={address}", "--node-ip-address=127.0.0.1", f"--num-cpus={gen_cpus}",
                        "--num-gpus=0", '--resources={"gen_node": 1}', f"--temp-dir={root / 'node'}",
                        "--disable-usage-stats"], env, log, sessions)
        ROOTS[address] = root
        yield address
    finally:
        ROOTS.pop(address, None)
        _kill_sessions(sessions)
        shutil.rmtree(root, ignore_errors=True)
        if driver_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = driver_auth


def files_containing(root: Path, needle: str) -> list[str]:
    """Files under ``root`` (Ray session logs, outputs) whose bytes contain ``needle``."""
    raw = needle.encode()
    hits = []
    for p in Path(root).rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and raw in p.read_bytes():
                hits.append(str(p))
        except OSError:
            continue
    return hits
