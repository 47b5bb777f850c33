"""Connecting to an existing (two-node, loopback) cluster: workers get the config-named key and nothing else.

The second node is started by ``ray start`` with a clean environment (tests/cluster.py), so what a task there sees
beyond that came through the job's runtime_env, i.e. from :func:`pipeline.local_ray.start_ray`.
"""
import os

import pytest

from pipeline.config import DEFAULT_FORWARD_ENV, load_config_dict
from pipeline.local_ray import LOOPBACK_ENV, ray_session
from tests.cluster import two_node_cluster

pytestmark = pytest.mark.integration

HF_SENTINEL = "hf_SENTINEL_two_node_0123456789"
KEY_SENTINEL = "sk-SENTINEL-two-node-0123456789"


def test_existing_cluster_gets_named_key_and_no_loopback_or_token(monkeypatch):
    for name in DEFAULT_FORWARD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", HF_SENTINEL)
    monkeypatch.setenv("CAFE_TEST_LLM_KEY", KEY_SENTINEL)
    cfg = load_config_dict({"build": {"dialogue": {"backend": "openai",
                                                   "openai": {"api_key_env": "CAFE_TEST_LLM_KEY"}}}})
    with two_node_cluster() as address, ray_session(cfg, address=address):
        import ray

        assert "GLOO_SOCKET_IFNAME" not in os.environ  # nothing set in the driver for an existing cluster

        @ray.remote(num_cpus=0, resources={"gen_node": 0.01})
        def facts():
            ctx = ray.get_runtime_context()
            names = ("CAFE_TEST_LLM_KEY", "HF_TOKEN", *LOOPBACK_ENV)
            return ctx.get_node_id(), ctx.runtime_env.get("env_vars", {}), {k: os.environ.get(k) for k in names}

        node_id, job_env, worker_env = ray.get(facts.remote(), timeout=120)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and nodes[node_id]["Resources"].get("gen_node") == 1.0
        assert node_id != ray.get_runtime_context().get_node_id()  # ran on the second node, not the driver's
        assert worker_env == {"CAFE_TEST_LLM_KEY": KEY_SENTINEL, "HF_TOKEN": None,
                              "GLOO_SOCKET_IFNAME": None, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None}
        assert job_env == {"HF_HUB_OFFLINE": "1", "CAFE_TEST_LLM_KEY": KEY_SENTINEL}
