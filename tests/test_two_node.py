"""Connecting to an existing (two-node, loopback) cluster: the job's runtime_env carries the forwarded offline
switches and no credential; a credential reaches workers only from the nodes' own environment.

The nodes are started by ``ray start`` with a clean environment (tests/cluster.py) plus, as a Kubernetes Secret
would, the dialogue key; what a task sees beyond that came through the job's runtime_env.
"""
import logging
import os

import pytest

from pipeline.config import DEFAULT_FORWARD_ENV, load_config_dict
from pipeline.local_ray import LOOPBACK_ENV, missing_on_nodes, ray_session
from tests.cluster import ROOTS, files_containing, two_node_cluster

pytestmark = pytest.mark.integration

HF_SENTINEL = "hf_SENTINEL_two_node_0123456789"
KEY_SENTINEL = "sk-SENTINEL-two-node-0123456789"


def test_existing_cluster_credentials_come_from_the_nodes_never_the_runtime_env(monkeypatch, caplog):
    for name in DEFAULT_FORWARD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", HF_SENTINEL)
    monkeypatch.setenv("CAFE_TEST_LLM_KEY", KEY_SENTINEL)
    cfg = load_config_dict({"build": {"dialogue": {"backend": "openai",
                                                   "openai": {"api_key_env": "CAFE_TEST_LLM_KEY"}}}})
    with two_node_cluster(node_env_extra={"CAFE_TEST_LLM_KEY": KEY_SENTINEL}) as address, \
            caplog.at_level(logging.WARNING, logger="pipeline.local_ray"), ray_session(cfg, address=address):
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
        assert job_env == {"HF_HUB_OFFLINE": "1"}  # the key came from the node, not the runtime_env
        assert "lacks" not in caplog.text  # every node has the declared key: no warning
        # the presence check names, per node, what is missing, and never returns a value
        missing = missing_on_nodes(["CAFE_TEST_LLM_KEY", "CAFE_TEST_UNSET"])
        assert set(missing) == set(nodes) and all(m == ["CAFE_TEST_UNSET"] for m in missing.values())
        # neither sentinel is in any file of either node's Ray session (runtime_env_agent.log included)
        assert files_containing(ROOTS[address], KEY_SENTINEL) == []
        assert files_containing(ROOTS[address], HF_SENTINEL) == []


def test_missing_credential_on_a_node_is_warned_by_name(monkeypatch, caplog):
    """The driver has the key, the nodes do not: start_ray warns which node lacks which name; the value is
    neither forwarded nor printed."""
    monkeypatch.setenv("CAFE_TEST_LLM_KEY", KEY_SENTINEL)
    cfg = load_config_dict({"build": {"dialogue": {"backend": "openai",
                                                   "openai": {"api_key_env": "CAFE_TEST_LLM_KEY"}}}})
    with two_node_cluster(second_node=False) as address, \
            caplog.at_level(logging.WARNING, logger="pipeline.local_ray"), ray_session(cfg, address=address):
        pass
    assert "lacks CAFE_TEST_LLM_KEY (named by build.dialogue.openai.api_key_env)" in caplog.text
    assert KEY_SENTINEL not in caplog.text
