"""`cafe submit` / `cafe jobs` against a real Ray head started by the test (``ray start --head`` on 127.0.0.1 with
the dashboard, i.e. Ray's job submission server), and the local checks that run before anything is submitted.

The head's environment plays the cluster's: it has ``cafe`` on its PATH (the image) and the dialogue key (a
Kubernetes Secret). Nothing the submitter's environment holds reaches the job except ``ray.forward_env``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.cluster.submit import SubmitError, exit_status, prepare
from pipeline.config import DEFAULT_FORWARD_ENV, ConfigError
from tests.buildutil import tiny_build_config
from tests.cluster import ROOTS, files_containing, free_port, two_node_cluster

SECRET = "sk-SENTINEL-submit-0123456789"
REMOTE = "http://10.1.2.3:8265"  # never contacted: prepare() only validates


def _one_chunk_build(models: Path) -> dict:
    data = tiny_build_config(models, rows_per_chunk=1)
    data["build"]["sources"].update(classes=["cat"], num_per_class=1)
    data["build"]["instructions"].update(per_source=1)
    return data


@pytest.fixture
def workdir(tmp_path, tiny_models):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "build.yaml").write_text(yaml.safe_dump(_one_chunk_build(tiny_models)))
    return tmp_path / "wd"


# ------------------------------------------------------------------------------------------ local checks


def test_prepare_validates_the_entrypoint_and_its_config_before_submitting(workdir, tmp_path):
    out = str(tmp_path / "out")
    sub = prepare(["cafe", "build", "build.yaml", "--out", out], "http://127.0.0.1:8265", working_dir=str(workdir))
    assert sub.entrypoint == f"cafe build build.yaml --out {out}"
    assert sub.runtime_env["working_dir"] == str(workdir) and "outputs" in sub.runtime_env["excludes"]
    assert sub.metadata == {"cafe_command": "build", "config": "build.yaml", "run_name": "t"}
    with pytest.raises(SubmitError, match="must be a `cafe` command"):
        prepare(["python", "train.py"], REMOTE, working_dir=str(workdir))
    with pytest.raises(SubmitError, match="invalid choice: 'biuld'"):
        prepare(["cafe", "biuld", "build.yaml"], REMOTE, working_dir=str(workdir))
    with pytest.raises(SubmitError, match="no such config file"):
        prepare(["cafe", "build", "nope.yaml"], REMOTE, working_dir=str(workdir))
    with pytest.raises(SubmitError, match="outside the working directory"):
        (tmp_path / "elsewhere.yaml").write_text("{}")
        prepare(["cafe", "build", "../elsewhere.yaml"], REMOTE, working_dir=str(workdir))
    with pytest.raises(ConfigError, match="build.rules.clip_t_mni"):
        prepare(["cafe", "build", "build.yaml", "--set", "build.rules.clip_t_mni=0.3"], REMOTE, working_dir=str(workdir))
    with pytest.raises(SubmitError, match="runs on this machine"):
        prepare(["cafe", "jobs", "list"], REMOTE, working_dir=str(workdir))


def test_the_upload_carries_the_configs_models_only(workdir, tmp_path):
    """Model directories under the working dir stay home, but the one the config reads (the embedded default's
    models/world); a large one is refused instead of being packed into the job."""
    for name in ("world", "tiny", "sd2"):
        (workdir / "models" / name).mkdir(parents=True)
        (workdir / "models" / name / "w.safetensors").write_bytes(b"0" * 16)
    data = yaml.safe_load((workdir / "build.yaml").read_text())
    data["models"]["root"] = "models/world"
    (workdir / "world.yaml").write_text(yaml.safe_dump(data))
    sub = prepare(["cafe", "build", "world.yaml"], "http://127.0.0.1:8265", working_dir=str(workdir))
    assert "/models/tiny" in sub.runtime_env["excludes"] and "/models/sd2" in sub.runtime_env["excludes"]
    assert "/models/world" not in sub.runtime_env["excludes"] and "outputs" in sub.runtime_env["excludes"]
    with open(workdir / "models" / "world" / "big.safetensors", "wb") as f:
        f.truncate(300 << 20)  # sparse: counts by its size
    with pytest.raises(SubmitError, match="holds 300 MiB"):
        prepare(["cafe", "build", "world.yaml"], "http://127.0.0.1:8265", working_dir=str(workdir))
    # an absolute models.root elsewhere: every directory under models/ stays home
    sub = prepare(["cafe", "build", "build.yaml"], "http://127.0.0.1:8265", working_dir=str(workdir))
    assert {"/models/tiny", "/models/sd2", "/models/world"} <= set(sub.runtime_env["excludes"])


def test_a_remote_cluster_needs_shared_locations(workdir):
    # relative local output paths exist on one node only: refused for a remote cluster, fine on this machine
    with pytest.raises(SubmitError, match=r"run.output_dir = outputs.*s3://"):
        prepare(["cafe", "build", "build.yaml"], REMOTE, working_dir=str(workdir))
    prepare(["cafe", "build", "build.yaml"], "http://127.0.0.1:8265", working_dir=str(workdir))
    sub = prepare(["cafe", "build", "build.yaml", "--set", "run.output_dir=s3://b/out"], REMOTE,
                  working_dir=str(workdir))
    assert sub.metadata["cafe_command"] == "build"
    prepare(["cafe", "build", "build.yaml", "--out", "s3://b/o"], REMOTE, working_dir=str(workdir))
    with pytest.raises(SubmitError, match="--out = o"):
        prepare(["cafe", "build", "build.yaml", "--out", "o"], REMOTE, working_dir=str(workdir))
    # the loop also writes training runs: their defaults are local too
    with pytest.raises(SubmitError, match="train.storage_path = outputs/train/runs"):
        prepare(["cafe", "pipeline", "run", "build.yaml", "--set", "run.output_dir=s3://b/out"], REMOTE,
                working_dir=str(workdir))


def test_no_credential_travels_in_the_runtime_env(workdir, tmp_path, monkeypatch):
    """The submitter's credentials (AWS, the config's dialogue key, tokens) stay on the submitter's machine."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "CAFE_LLM_API_KEY", "HF_TOKEN", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load((workdir / "build.yaml").read_text())
    data["build"]["dialogue"] = {"backend": "openai", "openai": {"api_key_env": "CAFE_LLM_API_KEY"}}
    (workdir / "llm.yaml").write_text(yaml.safe_dump(data))
    req = tmp_path / "req.txt"
    req.write_text("# pinned\nrequests==2.32.3\n")
    sub = prepare(["cafe", "build", "llm.yaml"], "http://127.0.0.1:8265", working_dir=str(workdir),
                  requirements=str(req))
    env = sub.runtime_env["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and set(env) <= set(DEFAULT_FORWARD_ENV)  # ray.forward_env only
    assert sub.runtime_env["pip"] == {"packages": ["requests==2.32.3"]}
    assert SECRET not in json.dumps(sub.runtime_env) and SECRET not in json.dumps(sub.metadata)
    req.write_text("requests\n")
    with pytest.raises(SubmitError, match="pin every package"):
        prepare(["cafe", "build", "llm.yaml"], "http://127.0.0.1:8265", working_dir=str(workdir),
                requirements=str(req))


def test_address_must_be_the_dashboard_url(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "--", "cafe", "world", "check", "x"]) == 2
    assert "no cluster address" in capsys.readouterr().err
    assert main(["jobs", "list", "--address", "127.0.0.1:6379"]) == 2
    assert "an http(s):// URL" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a real Ray head


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster with the dashboard on 127.0.0.1 and token authentication; ``cafe`` on its PATH; the
    key in its environment. Yields (dashboard URL, GCS address, token).

    Every ``cafe`` call runs as its own process with the token in its environment, as a user's terminal would
    (Ray fixes a process's authentication mode at its first use, so one test process cannot switch modes)."""
    port = free_port()
    token = secrets.token_hex(32)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with two_node_cluster(head_cpus=2, second_node=False, dashboard_port=port,
                          node_env_extra={"PATH": path, "CAFE_TEST_NODE_KEY": SECRET, "RAY_AUTH_MODE": "token",
                                          "RAY_AUTH_TOKEN": token}) as address:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # the job server comes up a little after `ray start` returns
            try:
                _client(url, token).list_jobs()
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url, address, token


def _client(url: str, token: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})


def _cafe(*args: str, token: str | None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``cafe ARGS`` in a fresh process whose environment has Ray's token (or none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["CAFE_TEST_SUBMITTER_SECRET"] = SECRET  # on the submitter only: must not travel
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.integration
def test_submitted_build_succeeds_and_streams_its_logs(head, workdir, tmp_path):
    url, address, token = head
    out = tmp_path / "out"
    p = _cafe("submit", "--address", url, "--working-dir", str(workdir), "--job-id", "tiny-build",
              "--", "cafe", "build", "build.yaml", "--out", str(out), token=token)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "build: 1 chunks; 1 to do" in p.stdout  # the remote driver's log lines came back
    assert "job tiny-build ended with exit status 0" in p.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["candidates"] == 1  # one source × one instruction
    p = _cafe("jobs", "status", "tiny-build", "--address", url, token=token)
    assert p.returncode == 0 and "tiny-build: SUCCEEDED (exit status 0)" in p.stdout
    p = _cafe("jobs", "list", "--address", url, token=token)
    assert p.returncode == 0 and re.search(r"tiny-build\s+SUCCEEDED\s+0\s+cafe build build.yaml", p.stdout)
    info = _client(url, token).get_job_info("tiny-build")
    assert SECRET not in json.dumps(info.runtime_env) and info.metadata["cafe_command"] == "build"
    assert files_containing(ROOTS[address], SECRET) == []  # nothing of the cluster's session holds a secret
    # without the token, or with a wrong one, the cluster refuses
    for bad in (None, "0" * 64):
        p = _cafe("jobs", "list", "--address", url, token=bad)
        assert p.returncode != 0 and "tiny-build" not in p.stdout
        assert re.search(r"(?i)auth", p.stderr), p.stderr[-2000:]


@pytest.mark.integration
def test_failing_job_reports_its_exit_status(head, workdir):
    url, _, token = head
    missing = str(workdir / "no-world")
    local = main(["world", "check", missing])  # the same command run here: its own exit status
    assert local != 0
    p = _cafe("submit", "--address", url, "--working-dir", str(workdir), "--job-id", "fails",
              "--", "cafe", "world", "check", missing, token=token)
    assert p.returncode == local, p.stderr[-2000:]
    assert f"job fails ended with exit status {local}" in p.stderr
    info = _client(url, token).get_job_info("fails")
    assert info.status.value == "FAILED" and exit_status(info) == local


@pytest.mark.integration
def test_jobs_stop_stops_a_running_job(head, workdir, tmp_path):
    url, _, token = head
    c = _client(url, token)
    data = yaml.safe_load((workdir / "build.yaml").read_text())
    data["build"]["sources"]["num_per_class"] = 50  # long enough to be stopped while it runs
    (workdir / "long.yaml").write_text(yaml.safe_dump(data))
    p = _cafe("submit", "--address", url, "--working-dir", str(workdir), "--job-id", "long", "--no-wait",
              "--", "cafe", "build", "long.yaml", "--out", str(tmp_path / "long"), token=token)
    assert p.returncode == 0 and p.stdout.strip() == "long", p.stderr[-2000:]
    deadline = time.monotonic() + 120
    while c.get_job_status("long").value != "RUNNING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    p = _cafe("jobs", "stop", "long", "--address", url, token=token)
    assert p.returncode == 0 and "long: STOPPED" in p.stdout, p.stderr[-2000:]
    assert exit_status(c.get_job_info("long")) == 130
    assert not (tmp_path / "long" / "_SUCCESS").exists()
