"""The build on a real two-node Ray cluster (127.0.0.1), storage only on s3:// (a local S3-compatible server).

Generation and scoring are pinned to the second node by a custom resource (``build.resources``). The nodes have
the storage credentials in their own environment (as a Kubernetes Secret would provide them); the job's runtime
env carries none, and no node's Ray session logs hold the secret. The result must equal a single-node local build
of the same config.
"""
from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from pipeline.build import run_build
from tests.buildutil import as_config, tiny_build_config
from tests.cluster import ROOTS, files_containing, two_node_cluster
from tests.s3util import S3_ENV, s3_bucket, s3_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def test_two_node_s3_build_equals_single_node_local(tiny_models, tmp_path, s3_bucket, monkeypatch):
    data = tiny_build_config(tiny_models)
    data["build"]["resources"] = {"generate": {"gen_node": 0.01}, "score": {"gen_node": 0.01}}
    cfg = as_config(data)
    out = f"{s3_bucket}/two-node"
    import os

    with two_node_cluster(node_env_extra={k: os.environ[k] for k in S3_ENV}) as address:
        remote = run_build(cfg, out_dir=out, address=address)
        assert files_containing(ROOTS[address], "testing-secret-sentinel") == []
        import ray

        assert not ray.is_initialized()  # the build disconnected from the cluster it did not start
    fs, root = pafs.FileSystem.from_uri(out)
    with fs.open_input_stream(f"{root}/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["status"] == "complete" and fs.get_file_info(f"{root}/_SUCCESS").type == pafs.FileType.File
    assert "testing-secret-sentinel" not in json.dumps(manifest)
    local = run_build(as_config(tiny_build_config(tiny_models)), out_dir=tmp_path / "local")
    assert remote.manifest["dataset_hash"] == local.manifest["dataset_hash"] == manifest["dataset_hash"]
    assert remote.manifest["counts"] == local.manifest["counts"]
