"""The ``deploy`` section: what `cafe deploy render` needs to write KubeRay manifests from the same typed config.

Only names and sizes live here — images, resources, schedules, volumes, the *names* of Kubernetes Secrets and of
the service account that carries workload identity for object storage. Never a credential value.
"""
from __future__ import annotations

import re

from pydantic import Field, field_validator

from pipeline.build_config import _Strict

#: Kubernetes quantities: "4", "500m", "16Gi", "1.5"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
#: a DNS-1123 label (names of objects, groups, secrets, claims)
_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_CRON_FIELD = re.compile(r"^(\*|[0-9]+(-[0-9]+)?)(/[0-9]+)?(,(\*|[0-9]+(-[0-9]+)?)(/[0-9]+)?)*$")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def check_cron(expr: str) -> str:
    """Validate a five-field cron schedule (minute hour day-of-month month day-of-week); return it."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"schedule {expr!r}: expected 5 fields (minute hour day month weekday)")
    for value, (lo, hi), what in zip(fields, _CRON_RANGES, ("minute", "hour", "day", "month", "weekday")):
        if not _CRON_FIELD.fullmatch(value):
            raise ValueError(f"schedule {expr!r}: {what} field {value!r} is not a cron field")
        for n in re.findall(r"[0-9]+", re.sub(r"/[0-9]+", "", value)):
            if not lo <= int(n) <= hi:
                raise ValueError(f"schedule {expr!r}: {what} {n} outside {lo}-{hi}")
    return expr


class HeadGroup(_Strict):
    """The head pod runs the drivers (``num-cpus: 0``: no task lands there) and the dashboard/job server;
    its memory covers the build driver (about 2 GiB at 46,875 chunks) with room for the loop's driver."""

    cpu: str = Field("8", pattern=_QUANTITY)
    memory: str = Field("32Gi", pattern=_QUANTITY)


class WorkerGroup(_Strict):
    """One autoscaled worker group. ``gpus`` per pod (0: a CPU group); ``spot``: tolerate spot/preemptible
    nodes (the preStop hook drains the Ray node with the preemption reason, so a restart is not charged against
    the data); ``shm``: the in-memory ``/dev/shm`` for NCCL and DataLoader workers."""

    name: str = Field(..., pattern=_NAME)
    replicas: int = Field(0, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(8, ge=1)
    gpus: int = Field(0, ge=0, le=16)
    cpu: str = Field("16", pattern=_QUANTITY)
    memory: str = Field("64Gi", pattern=_QUANTITY)
    shm: str = Field("16Gi", pattern=_QUANTITY)
    spot: bool = False
    node_selector: dict[str, str] = Field(default_factory=dict)
    #: seconds between the preemption notice and the kill (the pod's termination grace period)
    grace_s: int = Field(120, ge=10, le=3600)


class ModelsVolume(_Strict):
    """Model weights on one read-only volume (a PersistentVolumeClaim, ReadOnlyMany), mounted at ``mount`` on
    every pod; ``models.root`` must be that mount. Each actor checks the fingerprint of what it loads."""

    claim: str = Field("cafe-models", pattern=_NAME)
    mount: str = Field("/models", pattern=r"^/")


class SharedVolume(_Strict):
    """A read-write volume every pod mounts (ReadWriteMany: EFS, Filestore, CephFS) for what object storage cannot
    hold: TensorBoard event files, and a SQLite model registry where one is configured (POSIX locks; the default
    registry of an ``s3://`` output is a log of decisions on the bucket and needs no volume)."""

    claim: str = Field("cafe-shared", pattern=_NAME)
    mount: str = Field("/shared", pattern=r"^/")


class SecretRef(_Strict):
    """A key of a Kubernetes Secret, exposed to every pod as the environment variable the config names."""

    name: str = Field(..., pattern=_NAME)
    key: str = Field(..., min_length=1, max_length=253)


class Schedule(_Strict):
    """Scheduled retraining (`cafe retrain`). ``kind: cronjob`` = a Kubernetes CronJob with
    ``concurrencyPolicy: Forbid`` that creates the RayJob (a daily run never provisions a second GPU cluster
    while one still holds the output); ``raycronjob`` = KubeRay's RayCronJob (alpha, behind the operator's
    ``RayCronJob`` feature gate, and without a concurrency policy). Both files are rendered; ``kind`` says which
    one the README's commands apply."""

    cron: str = "0 3 * * *"
    time_zone: str = "Etc/UTC"
    kind: str = Field("cronjob", pattern=r"^(cronjob|raycronjob)$")
    #: the image of the CronJob's one container that creates the RayJob (kubectl)
    kubectl_image: str = "bitnami/kubectl:1.33"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return check_cron(v)


class DeployConfig(_Strict):
    """KubeRay manifests (``cafe deploy render``). See docs/cluster.md."""

    name: str = Field("cafe", pattern=_NAME)
    namespace: str = Field("cafe", pattern=_NAME)
    #: the project's image (deploy/Dockerfile); its Ray must equal the pinned Ray (``ray_version``)
    image: str = "ghcr.io/example/cafe-system:0.1.0-gpu"
    cpu_image: str = "ghcr.io/example/cafe-system:0.1.0-cpu"
    ray_version: str = Field("2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    #: the project's directory in the image (the entrypoints' working directory: configs/ is there)
    workdir: str = Field("/app", pattern=r"^/")
    #: the Kubernetes service account of every Ray pod: bind it to a cloud role (IRSA, GKE Workload Identity)
    #: that may read and write the buckets, instead of static keys
    service_account: str = Field("cafe-ray", pattern=_NAME)
    #: annotations of that service account, e.g. ``eks.amazonaws.com/role-arn: arn:aws:iam::…:role/cafe`` or
    #: ``iam.gke.io/gcp-service-account: cafe@PROJECT.iam.gserviceaccount.com``
    service_account_annotations: dict[str, str] = Field(default_factory=dict)
    head: HeadGroup = HeadGroup()
    workers: list[WorkerGroup] = Field(default_factory=lambda: [
        WorkerGroup(name="gpu", gpus=8, cpu="64", memory="512Gi", shm="64Gi", spot=True, max_replicas=8),
        WorkerGroup(name="cpu", cpu="32", memory="128Gi", shm="8Gi", max_replicas=16)], min_length=1)
    models: ModelsVolume = ModelsVolume()
    shared: SharedVolume = SharedVolume()
    #: environment variable name -> Secret key, e.g. the dialogue backend's key (build.dialogue.openai.api_key_env)
    secrets: dict[str, SecretRef] = Field(default_factory=dict)
    #: plain (non-secret) variables every pod gets, e.g. AWS_REGION, CAFE_OUTPUT_ROOT
    env: dict[str, str] = Field(default_factory=dict)
    schedule: Schedule = Schedule()
    #: RayJob retries (a new cluster each), the whole job's deadline, cluster lifetime after the job
    backoff_limit: int = Field(2, ge=0, le=20)
    active_deadline_s: int = Field(7 * 24 * 3600, ge=60)
    ttl_after_finished_s: int = Field(3600, ge=0)
    #: the concept-job file of the per-concept batch RayJob (inside the image's workdir)
    concepts_jobs: str = "configs/concepts/paper.yaml"

    @field_validator("env")
    @classmethod
    def _no_secret_values(cls, env: dict[str, str]) -> dict[str, str]:
        from pipeline.local_ray import looks_secret

        bad = [k for k in env if looks_secret(k)]
        if bad:
            raise ValueError(f"deploy.env: {', '.join(bad)} look like credentials: name a Kubernetes Secret "
                             "under deploy.secrets instead (values never go into a config or a manifest)")
        return env
