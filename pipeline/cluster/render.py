"""`cafe deploy render CONFIG --out DIR`: KubeRay manifests written from the typed config, so they cannot drift.

Usage::

    files = render(cfg, "configs/paper.yaml")      # file name -> YAML text
    write(files, "deploy/")

What it writes (all from ``cfg.deploy``, the config's path and its locations):

* ``raycluster.yaml`` — a long-lived, autoscaling RayCluster to ``cafe submit`` to: the head with ``num-cpus: 0``
  (drivers only) and token authentication; one worker group per ``deploy.workers`` entry.
* ``rayjob-pipeline.yaml``, ``rayjob-build.yaml``, ``rayjob-concepts.yaml`` — RayJobs that each bring up their own
  cluster for ``cafe pipeline run``, a one-off ``cafe build``, and a per-concept batch (``cafe concepts run``),
  with ``backoffLimit``, ``activeDeadlineSeconds``, ``shutdownAfterJobFinishes`` and a TTL.
* ``cronjob-retrain.yaml`` — scheduled retraining, the default: a Kubernetes CronJob with
  ``concurrencyPolicy: Forbid`` whose one pod creates the ``cafe retrain`` RayJob and waits for it to finish, so
  a daily schedule never provisions a second GPU cluster while a multi-day run still holds the output (with the
  ServiceAccount, Role and RoleBinding it needs to create RayJobs).
* ``raycronjob-retrain.yaml`` — the same with KubeRay's RayCronJob (alpha: the operator's ``RayCronJob`` feature
  gate must be on; it has no concurrency policy, so the loop's lease is what keeps two runs off one output).
* ``serviceaccount.yaml`` — the Ray pods' service account, annotated for workload identity (object storage
  without static keys).

Every pod: the project's image, requests equal to limits (GPUs included), the models volume read-only at
``deploy.models.mount``, the shared read-write volume at ``deploy.shared.mount`` (registry, TensorBoard), an
in-memory ``/dev/shm``, ``deploy.env`` as plain variables and ``deploy.secrets`` as
``secretKeyRef`` (a credential's value is never in a manifest). GPU groups marked ``spot`` tolerate spot nodes and
drain their Ray node with the preemption reason in a ``preStop`` hook, so Ray reschedules the work without
counting the kill as a task failure.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

__all__ = ["DeployError", "check", "render", "write", "entrypoints", "HEADER"]

HEADER = "# Rendered by `cafe deploy render {config}` from the config's `deploy` section: edit the config and\n" \
         "# re-render (`cafe deploy render {config} --check` fails when this file and its render differ).\n"

_GPU = "nvidia.com/gpu"


class DeployError(ValueError):
    """The config cannot run on the cluster the deploy section describes; nothing was rendered."""


def check(cfg) -> list[str]:
    """What would break on the cluster: one message per problem (empty when the config can be deployed).

    Every location must be a shared URI (``s3://``, ``gs://``) or on the shared volume; ``models.root`` must be the
    models volume's mount; a retried RayJob must wait out its dead driver's lease (``build.lease_wait_s`` ≥
    ``build.lease_ttl_s``) instead of failing on a busy output.
    """
    from pipeline.config import locations

    d, problems = cfg.deploy, []
    for key, value in locations(cfg).items():
        if key == "models.root":
            if value.rstrip("/") != d.models.mount.rstrip("/"):
                problems.append(f"models.root = {value}: must be deploy.models.mount ({d.models.mount}), where "
                                "every pod mounts the models volume")
        elif not (value.startswith(("s3://", "gs://")) or value.startswith(d.shared.mount.rstrip("/") + "/")):
            problems.append(f"{key} = {value}: not shared by the pods; use an s3:// or gs:// URI or a path under "
                            f"deploy.shared.mount ({d.shared.mount})")
    if cfg.build.lease_wait < cfg.build.lease_ttl_s:
        problems.append(f"build.lease_wait_s = {cfg.build.lease_wait_s} < build.lease_ttl_s = "
                        f"{cfg.build.lease_ttl_s}: a retried RayJob would fail on its dead driver's lease")
    return problems


def entrypoints(cfg, config_path: str) -> dict[str, str]:
    """The ``cafe`` command of each RayJob (file stem -> shell command)."""
    c = shlex.quote(config_path)
    return {"rayjob-pipeline": f"cafe pipeline run {c}",
            "rayjob-build": f"cafe build {c}",
            "rayjob-concepts": f"cafe concepts run {shlex.quote(cfg.deploy.concepts_jobs)}",
            "retrain": f"cafe retrain {c}"}


def _env(d) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in sorted(d.env.items())]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            for k, ref in sorted(d.secrets.items())]
    return env


def _container(d, name: str, image: str, cpu: str, memory: str, gpus: int, prestop: list[str] | None) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits[_GPU] = gpus
    c = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "workingDir": d.workdir,
         "env": _env(d), "resources": {"requests": dict(limits), "limits": dict(limits)},
         "volumeMounts": [{"name": "models", "mountPath": d.models.mount, "readOnly": True},
                          {"name": "shared", "mountPath": d.shared.mount},
                          {"name": "dshm", "mountPath": "/dev/shm"}]}
    if not c["env"]:
        del c["env"]
    if name == "ray-head":
        c["ports"] = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}]
    if prestop:
        c["lifecycle"] = {"preStop": {"exec": {"command": prestop}}}
    return c


def _pod(d, container: dict, shm: str, tolerations: list[dict] | None = None, node_selector=None,
         grace_s: int | None = None) -> dict:
    spec = {"serviceAccountName": d.service_account, "containers": [container],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": d.models.claim, "readOnly": True}},
                        {"name": "shared", "persistentVolumeClaim": {"claimName": d.shared.claim}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]}
    if tolerations:
        spec["tolerations"] = tolerations
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if grace_s:
        spec["terminationGracePeriodSeconds"] = grace_s
    return {"spec": spec}


def _worker_group(d, w) -> dict:
    image = d.image if w.gpus else d.cpu_image
    tolerations = []
    if w.gpus:
        tolerations.append({"key": _GPU, "operator": "Exists", "effect": "NoSchedule"})
    prestop = None
    if w.spot:
        tolerations += [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                         "effect": "NoSchedule"},
                        {"key": "eks.amazonaws.com/capacityType", "operator": "Equal", "value": "SPOT",
                         "effect": "NoSchedule"}]
        prestop = ["ray", "drain-node", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                   "--reason-message=spot node preempted (pod preStop)",
                   f"--deadline-remaining-seconds={max(w.grace_s - 10, 1)}"]
    container = _container(d, "ray-worker", image, w.cpu, w.memory, w.gpus, prestop)
    return {"groupName": w.name, "replicas": w.replicas, "minReplicas": w.min_replicas,
            "maxReplicas": w.max_replicas, "rayStartParams": {},
            "template": _pod(d, container, w.shm, tolerations, w.node_selector, w.grace_s if w.spot else None)}


def _cluster_spec(d) -> dict:
    head = _container(d, "ray-head", d.cpu_image, d.head.cpu, d.head.memory, 0, None)
    return {"rayVersion": d.ray_version, "enableInTreeAutoscaling": True, "authOptions": {"mode": "token"},
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": _pod(d, head, "2Gi")},
            "workerGroupSpecs": [_worker_group(d, w) for w in d.workers]}


def _labels(d) -> dict:
    return {"app.kubernetes.io/name": "cafe", "app.kubernetes.io/instance": d.name}


def _meta(d, name: str) -> dict:
    return {"name": name, "namespace": d.namespace, "labels": _labels(d)}


def _rayjob_spec(d, entrypoint: str) -> dict:
    return {"entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": d.ttl_after_finished_s,
            "backoffLimit": d.backoff_limit, "activeDeadlineSeconds": d.active_deadline_s,
            "rayClusterSpec": _cluster_spec(d)}


def _retrain_cronjob(d, rayjob: dict) -> list[dict]:
    """CronJob (Forbid) → a pod that creates the RayJob and waits for its end: no overlap of scheduled runs."""
    creator = f"{d.name}-retrain-scheduler"
    wait = ("set -eu\n"
            "name=$(kubectl create -f /manifests/rayjob-retrain.yaml -o jsonpath='{.metadata.name}')\n"
            "echo \"created rayjob/$name\"\n"
            "while true; do\n"
            "  s=$(kubectl get rayjob \"$name\" -o jsonpath='{.status.jobDeploymentStatus}')\n"
            "  case \"$s\" in Complete) exit 0 ;; Failed) exit 1 ;; esac\n"
            "  sleep 60\n"
            "done\n")
    job_rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
                  "metadata": {"generateName": f"{d.name}-retrain-", "namespace": d.namespace,
                               "labels": _labels(d)},
                  "spec": rayjob}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(d, creator)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(d, creator),
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(d, creator),
         "subjects": [{"kind": "ServiceAccount", "name": creator, "namespace": d.namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": creator}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(d, f"{d.name}-retrain-rayjob"),
         "data": {"rayjob-retrain.yaml": yaml.safe_dump(job_rayjob, sort_keys=False)}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": _meta(d, f"{d.name}-retrain"),
         "spec": {"schedule": d.schedule.cron, "timeZone": d.schedule.time_zone, "concurrencyPolicy": "Forbid",
                  "startingDeadlineSeconds": 3600, "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
                  "jobTemplate": {"spec": {
                      "backoffLimit": 0,
                      # the RayJob's own retries and deadline, plus the time to provision its cluster
                      "activeDeadlineSeconds": d.active_deadline_s * (d.backoff_limit + 1) + 3600,
                      "template": {"spec": {
                          "serviceAccountName": creator, "restartPolicy": "Never",
                          "containers": [{"name": "create-and-wait", "image": d.schedule.kubectl_image,
                                          "command": ["/bin/sh", "-c", wait],
                                          "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                                        "limits": {"cpu": "100m", "memory": "128Mi"}},
                                          "volumeMounts": [{"name": "manifests", "mountPath": "/manifests"}]}],
                          "volumes": [{"name": "manifests",
                                       "configMap": {"name": f"{d.name}-retrain-rayjob"}}]}}}}}},
    ]


def render(cfg, config_path: str) -> dict[str, str]:
    """Render every manifest of ``cfg.deploy`` (see the module docstring): file name -> YAML text; raise
    :class:`DeployError` listing every problem :func:`check` finds."""
    problems = check(cfg)
    if problems:
        raise DeployError("cannot deploy this config:\n  " + "\n  ".join(problems))
    d = cfg.deploy
    eps = entrypoints(cfg, config_path)
    docs: dict[str, list[dict]] = {
        "serviceaccount.yaml": [{"apiVersion": "v1", "kind": "ServiceAccount",
                                 "metadata": {**_meta(d, d.service_account),
                                              **({"annotations": dict(d.service_account_annotations)}
                                                 if d.service_account_annotations else {})}}],
        "raycluster.yaml": [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(d, d.name),
                             "spec": _cluster_spec(d)}],
    }
    for stem in ("rayjob-pipeline", "rayjob-build", "rayjob-concepts"):
        docs[f"{stem}.yaml"] = [{"apiVersion": "ray.io/v1", "kind": "RayJob",
                                 "metadata": _meta(d, f"{d.name}-{stem.removeprefix('rayjob-')}"),
                                 "spec": _rayjob_spec(d, eps[stem])}]
    retrain = _rayjob_spec(d, eps["retrain"])
    docs["cronjob-retrain.yaml"] = _retrain_cronjob(d, retrain)
    docs["raycronjob-retrain.yaml"] = [{"apiVersion": "ray.io/v1", "kind": "RayCronJob",
                                        "metadata": _meta(d, f"{d.name}-retrain"),
                                        "spec": {"schedule": d.schedule.cron, "timeZone": d.schedule.time_zone,
                                                 "jobTemplate": retrain}}]
    header = HEADER.format(config=config_path)
    return {name: header + yaml.safe_dump_all(items, sort_keys=False, width=120) for name, items in docs.items()}


def write(files: dict[str, str], out_dir: str | Path) -> list[Path]:
    """Write the rendered files into ``out_dir`` (atomically each, through the one storage helper)."""
    from pipeline.store import Storage

    out = Storage(str(out_dir))
    for name, text in files.items():
        out.write_bytes(name, text.encode())
    return [Path(out_dir) / name for name in files]
