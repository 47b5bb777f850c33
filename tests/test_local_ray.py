"""Loopback settings apply only to clusters the project starts; workers get exactly the named env variables."""
import ipaddress
import logging
import os
import socket
import subprocess
import sys

import psutil
import pytest

from pipeline.config import DEFAULT_FORWARD_ENV, RayConfig, load_config_dict
from pipeline.config import ConfigError
from pipeline.local_ray import LOOPBACK_ENV, forwarded_env, looks_secret, ray_session, runtime_env_vars, start_ray
from tests.cluster import files_containing

HF_SENTINEL = "hf_SENTINEL_must_not_travel_0123456789"
KEY_SENTINEL = "sk-SENTINEL-named-key-0123456789"


def test_network_guard_refuses_non_loopback():
    s = socket.socket()
    s.settimeout(0.5)
    with pytest.raises(ConnectionRefusedError, match="test tried to reach the network"):
        s.connect(("10.255.255.1", 9))
    s.close()


def test_importing_the_package_sets_no_environment():
    env = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV}
    code = ("import os; before = dict(os.environ); "
            "import pipeline, pipeline.cli, pipeline.config, pipeline.local_ray; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture
def sentinel_env(monkeypatch):
    """HF_TOKEN and a config-named key hold sentinels; an offline switch is set; no loopback variables."""
    for name in (*DEFAULT_FORWARD_ENV, *LOOPBACK_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", HF_SENTINEL)
    monkeypatch.setenv("CAFE_TEST_LLM_KEY", KEY_SENTINEL)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _openai_cfg(**ray):
    return load_config_dict({"ray": ray, "build": {"dialogue": {
        "backend": "openai", "openai": {"api_key_env": "CAFE_TEST_LLM_KEY"}}}})


def test_forwarded_env_is_the_named_list_and_never_a_credential(sentinel_env, caplog):
    caplog.set_level(logging.DEBUG, logger="pipeline.local_ray")
    env = forwarded_env(_openai_cfg())
    assert env == {"HF_HUB_OFFLINE": "1"}  # the dialogue key is declared, checked by name, never forwarded
    assert KEY_SENTINEL not in caplog.text and HF_SENTINEL not in caplog.text
    assert forwarded_env(load_config_dict({})) == {"HF_HUB_OFFLINE": "1"}
    # a credential cannot be listed: the config says where it belongs instead
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "CAFE_TEST_LLM_KEY", "DB_PASSWORD"):
        with pytest.raises(ConfigError, match=f"forward_env\\[0\\] = '{name}' looks like a credential"):
            _openai_cfg(forward_env=[name])
    assert looks_secret("AWS_SESSION_TOKEN") and not looks_secret("HF_HOME") and not looks_secret("AWS_ENDPOINT_URL")


def test_declared_key_missing_is_warned_by_name_only(sentinel_env, monkeypatch, caplog):
    from pipeline.local_ray import _check_declared

    with caplog.at_level(logging.WARNING, logger="pipeline.local_ray"):
        _check_declared(_openai_cfg(), existing=False)
        assert caplog.text == ""  # set in the driver: a local cluster's workers inherit it
        monkeypatch.delenv("CAFE_TEST_LLM_KEY")
        _check_declared(_openai_cfg(), existing=False)
    assert "build.dialogue.openai.api_key_env names CAFE_TEST_LLM_KEY, which is not set" in caplog.text


def test_loopback_variables_only_for_a_cluster_we_start(sentinel_env):
    local = runtime_env_vars(_openai_cfg())
    assert local == {"HF_HUB_OFFLINE": "1", **LOOPBACK_ENV}
    for address in ("auto", "10.0.0.5:6379", "head.cluster.local:6379", "ray://head:10001", "127.0.0.1:6379"):
        assert runtime_env_vars(_openai_cfg(), address) == {"HF_HUB_OFFLINE": "1"}
        assert runtime_env_vars(_openai_cfg(address=address)) == runtime_env_vars(_openai_cfg(), address)
    assert "GLOO_SOCKET_IFNAME" not in runtime_env_vars(_openai_cfg(loopback_only=False))


def test_conflicting_loopback_variable_is_refused_before_ray_starts(sentinel_env, monkeypatch):
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    with pytest.raises(RuntimeError, match="GLOO_SOCKET_IFNAME='eth0'"):
        start_ray(RayConfig(num_cpus=1))
    assert not ray.is_initialized()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth0" and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)


@pytest.mark.integration
def test_local_ray_listens_on_loopback_only_and_restores_the_driver(sentinel_env):
    """Every listener of the local cluster (driver's descendants) is on 127.0.0.1; workers see the loopback
    variables through the job's runtime_env, the declared key through the environment they inherit from the
    driver, and no credential in the runtime_env or in any file of Ray's session; the driver's environment is
    restored after."""
    from ray._private import ray_constants

    flag_before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_session(_openai_cfg(num_cpus=2)):
        import ray

        assert {k: os.environ.get(k) for k in LOOPBACK_ENV} == LOOPBACK_ENV

        @ray.remote
        def facts():
            env_vars = ray.get_runtime_context().runtime_env.get("env_vars", {})
            return os.getpid(), env_vars, {k: os.environ.get(k) for k in (*LOOPBACK_ENV, "CAFE_TEST_LLM_KEY")}

        worker_pid, job_env, worker_env = ray.get(facts.remote())
        assert worker_env == {**LOOPBACK_ENV, "CAFE_TEST_LLM_KEY": KEY_SENTINEL}  # inherited from the driver
        assert job_env == {"HF_HUB_OFFLINE": "1", **LOOPBACK_ENV}
        session = ray._private.worker._global_node.get_session_dir_path()
        assert files_containing(session, KEY_SENTINEL) == [] and files_containing(session, HF_SENTINEL) == []

        ray_pids = {worker_pid} | {p.pid for p in psutil.Process().children(recursive=True)}
        listeners = []
        for pid in ray_pids:
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            listeners += [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
        assert len(listeners) >= 3, f"found too few Ray listeners to check: {listeners}"  # gcs, raylet, workers
        exposed = [addr for addr in listeners if not _loopback(addr.ip)]
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
    assert not any(k in os.environ for k in LOOPBACK_ENV)
    assert ray_constants.ENABLE_RAY_CLUSTER == flag_before
