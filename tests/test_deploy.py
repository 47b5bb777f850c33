"""`cafe deploy render`: every rendered and shipped manifest validates offline (KubeRay CRDs, Kubernetes core
schemas), the shipped deploy/ equals its render, and the semantic lints a KubeRay user relies on hold."""
from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.cli import main
from pipeline.cluster.config import check_cron
from pipeline.cluster.render import DeployError, render
from pipeline.cluster.submit import _check_entrypoint
from pipeline.config import load_config, load_config_dict, locations
from pipeline.local_ray import looks_secret
from tests.kuberay import pod_templates, validate_manifest

REPO = Path(__file__).resolve().parents[1]
PAPER = "configs/paper.yaml"
SENTINEL = "sk-SENTINEL-deploy-0123456789"


def _docs(files: dict[str, str]) -> list[tuple[str, dict]]:
    """Every manifest of a render, the RayJob kept in the retrain CronJob's ConfigMap included."""
    out = []
    for name, text in files.items():
        for doc in yaml.safe_load_all(text):
            out.append((name, doc))
            if doc["kind"] == "ConfigMap":
                out += [(f"{name}:{k}", yaml.safe_load(v)) for k, v in doc["data"].items()]
    return out


@pytest.fixture(scope="module")
def paper():
    return load_config(REPO / PAPER)


@pytest.fixture(scope="module")
def shipped(paper):
    return render(paper, PAPER)


def _variant():
    """Another deploy section: CPU-only workers, no spot, the RayCronJob schedule, annotations and secrets."""
    shared = {"run": {"output_dir": "gs://b/out"}, "models": {"root": "/models"},
              "build": {"lease_ttl_s": 60, "lease_wait_s": 90},
              "train": {"storage_path": "gs://b/runs", "output_dir": "gs://b/models", "log_dir": "/shared/tb",
                        "data": {"datasets": ["gs://b/round0"]}},
              "concepts": {"output": "gs://b/concepts"}}
    return load_config_dict({**shared, "deploy": {
        "name": "x", "namespace": "team-a", "workers": [{"name": "cpu", "cpu": "4", "memory": "8Gi"}],
        "schedule": {"cron": "*/30 1-5 * * 1,3", "kind": "raycronjob"},
        "service_account_annotations": {"iam.gke.io/gcp-service-account": "cafe@p.iam.gserviceaccount.com"},
        "secrets": {"CAFE_LLM_API_KEY": {"name": "llm", "key": "k"}, "AWS_SECRET_ACCESS_KEY": {"name": "s3",
                                                                                               "key": "secret"}},
        "env": {"AWS_ENDPOINT_URL": "http://minio.storage:9000"}}})


def test_shipped_deploy_is_the_render_of_the_paper_config(shipped, monkeypatch):
    monkeypatch.chdir(REPO)
    for name, text in shipped.items():
        assert (REPO / "deploy" / name).read_text() == text, f"deploy/{name} is stale: cafe deploy render {PAPER}"
    rendered_yaml = {p.name for p in (REPO / "deploy").glob("*.yaml")}
    assert rendered_yaml == set(shipped), "deploy/ holds a manifest the render does not produce"
    assert main(["deploy", "render", PAPER, "--out", "deploy", "--check"]) == 0


def test_render_check_flags_a_hand_edit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "deploy"
    assert main(["deploy", "render", PAPER, "--out", str(out)]) == 0
    assert main(["deploy", "render", PAPER, "--out", str(out), "--check"]) == 0
    p = out / "raycluster.yaml"
    p.write_text(p.read_text().replace("maxReplicas: 8", "maxReplicas: 80"))
    capsys.readouterr()
    assert main(["deploy", "render", PAPER, "--out", str(out), "--check"]) == 1
    assert "raycluster.yaml: differs from its render" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["shipped", "variant"])
def test_every_manifest_validates_offline(which, shipped):
    files = shipped if which == "shipped" else render(_variant(), "configs/tiny.yaml")
    docs = _docs(files)
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "Role", "RoleBinding",
            "ServiceAccount"} <= kinds
    for name, doc in docs:
        assert validate_manifest(doc) == [], name
    assert sum(len(pod_templates(d)) for _, d in docs) >= 12  # the pod templates were validated too


def test_the_validator_rejects_what_kuberay_and_kubernetes_would(shipped):
    cluster = yaml.safe_load(shipped["raycluster.yaml"].split("\n", 2)[2])
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    assert any("minReplica" in p for p in validate_manifest(typo))
    bad_pod = copy.deepcopy(cluster)
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in p for p in validate_manifest(bad_pod))
    bad_auth = copy.deepcopy(cluster)
    bad_auth["spec"]["authOptions"] = {"mode": "password"}
    assert validate_manifest(bad_auth)
    cron = next(d for _, d in _docs(shipped) if d["kind"] == "CronJob")
    cron["spec"]["startingDeadlineSeconds"] = "one hour"
    assert any("startingDeadlineSeconds" in p for p in validate_manifest(cron))


def _clusters(docs):
    for name, d in docs:
        if d["kind"] == "RayCluster":
            yield name, d["spec"]
        elif d["kind"] == "RayJob":
            yield name, d["spec"]["rayClusterSpec"]
        elif d["kind"] == "RayCronJob":
            yield name, d["spec"]["jobTemplate"]["rayClusterSpec"]


def test_ray_version_is_the_pinned_ray_everywhere(shipped):
    pinned = next(Requirement(r) for r in importlib.metadata.requires("cafe-system") if r.startswith("ray["))
    assert str(pinned.specifier) == f"=={importlib.metadata.version('ray')}"
    version = importlib.metadata.version("ray")
    for name, spec in _clusters(_docs(shipped)):
        assert spec["rayVersion"] == version, name
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={version}\n" in docker and "FROM rayproject/ray:${RAY_VERSION}-" in docker
    assert f"ray=={version}\n" in (REPO / "deploy" / "constraints.txt").read_text()


def test_constraints_satisfy_the_project_requirements():
    pins = {}
    for line in (REPO / "deploy" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = next(iter(req.specifier)).version
    for raw in importlib.metadata.requires("cafe-system"):
        req = Requirement(raw)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


def test_pods_request_what_they_limit_and_spot_groups_drain_on_preemption(shipped):
    docs = _docs(shipped)
    for name, doc in docs:
        for where, tmpl in pod_templates(doc):
            for c in tmpl["spec"]["containers"]:
                assert c["resources"]["requests"] == c["resources"]["limits"], f"{name} {where}"
    for name, spec in _clusters(docs):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # drivers only on the head
        assert spec["authOptions"] == {"mode": "token"}
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            c = pod["containers"][0]
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] or g["replicas"] == 0
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True
            if "nvidia.com/gpu" in c["resources"]["limits"]:
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
                prestop = c["lifecycle"]["preStop"]["exec"]["command"]
                assert prestop[:3] == ["ray", "drain-node", "--reason=DRAIN_NODE_REASON_PREEMPTION"]
                deadline = int(prestop[-1].split("=")[1])
                assert 0 < deadline < pod["terminationGracePeriodSeconds"]
    for name, d in docs:
        if d["kind"] == "RayJob":
            s = d["spec"]
            assert s["shutdownAfterJobFinishes"] is True and s["backoffLimit"] >= 1
            assert s["activeDeadlineSeconds"] >= 24 * 3600, name  # multi-day runs are not cut short


def test_every_entrypoint_is_a_real_cafe_command_on_shared_storage(shipped, paper):
    """Each RayJob's command parses with cafe's own parser, its config validates, and every location it uses is a
    shared URI or on a volume every pod mounts; a retried job waits out its dead driver's lease."""
    d = paper.deploy
    entrypoints = [doc["spec"]["entrypoint"] for _, doc in _docs(shipped) if doc["kind"] == "RayJob"]
    entrypoints += [doc["spec"]["jobTemplate"]["entrypoint"] for _, doc in _docs(shipped)
                    if doc["kind"] == "RayCronJob"]
    commands = set()
    for ep in entrypoints:
        meta, _ = _check_entrypoint(shlex.split(ep), REPO, local_cluster=False)
        commands.add(meta["cafe_command"])
    assert {"pipeline run", "build", "concepts run", "retrain"} <= commands
    for key, value in locations(paper).items():
        if key == "models.root":
            assert value == d.models.mount
        else:
            assert re.match(r"^(s3|gs)://", value) or value.startswith(d.shared.mount + "/"), f"{key} = {value}"
    assert paper.build.lease_wait_s >= paper.build.lease_ttl_s


def test_no_credential_value_in_any_manifest(monkeypatch):
    """Secrets are referenced by name (secretKeyRef), never inlined, whatever the renderer's environment holds."""
    for name in ("CAFE_LLM_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "HF_TOKEN"):
        monkeypatch.setenv(name, SENTINEL)
    files = render(_variant(), "configs/tiny.yaml")
    assert SENTINEL not in "".join(files.values())
    for name, doc in _docs(files):
        for _, tmpl in pod_templates(doc):
            for e in tmpl["spec"]["containers"][0].get("env", []):
                if looks_secret(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (name, e["name"])
    with pytest.raises(Exception, match="look like credentials"):
        load_config_dict({"deploy": {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}})
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    assert not [ln for ln in docker.splitlines() if ln.startswith("ENV") and looks_secret(ln)]


def test_schedules_parse_and_bad_ones_are_refused(shipped):
    for name, doc in _docs(shipped):
        if doc["kind"] in ("CronJob", "RayCronJob"):
            assert check_cron(doc["spec"]["schedule"]) == doc["spec"]["schedule"]
            assert doc["spec"]["timeZone"]
    cron = next(d for _, d in _docs(shipped) if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # never a second GPU cluster beside a running one
    for bad in ("0 3 * *", "61 3 * * *", "0 24 * * *", "0 3 * 13 *", "0 3 * * mon-fri", "@daily"):
        with pytest.raises(Exception, match="schedule"):
            load_config_dict({"deploy": {"schedule": {"cron": bad}}})


def test_a_config_that_cannot_run_on_the_cluster_is_not_rendered(capsys):
    """The embedded default writes to local paths: rendering it names every location and the lease problem."""
    with pytest.raises(DeployError) as info:
        render(load_config(REPO / "configs/tiny.yaml"), "configs/tiny.yaml")
    text = str(info.value)
    for needle in ("models.root = models/world: must be deploy.models.mount (/models)",
                   "run.output_dir = outputs: not shared by the pods", "train.storage_path = outputs/train/runs"):
        assert needle in text
    assert "lease" not in text  # the default wait is the ttl
    with pytest.raises(DeployError, match="build.lease_wait_s = 0.0 < build.lease_ttl_s"):
        render(load_config(REPO / "configs/tiny.yaml", ["build.lease_wait_s=0"]), "configs/tiny.yaml")
    assert main(["deploy", "render", str(REPO / "configs/tiny.yaml"), "--out", "/nonexistent/x"]) == 1
    assert "cannot deploy this config" in capsys.readouterr().err
    assert not Path("/nonexistent/x").exists()
