"""Offline validation of Kubernetes manifests: KubeRay kinds against their CRD schemas (tests/data/kuberay, the
way KubeRay's ``scripts/openapi2jsonschema.py`` converts them), Kubernetes kinds and every pod template against
the core schemas bundled by ``kubernetes-validate``.

Usage::

    problems = validate_manifest(doc)          # [] when valid; one line per problem otherwise
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema

DATA = Path(__file__).parent / "data" / "kuberay"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes release the manifests target (CronJob timeZone is GA since 1.27)
_CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}


def openapi_to_jsonschema(s):
    """OpenAPI v3 (a CRD's structural schema) -> JSON Schema: closed objects, int-or-string, nullable."""
    if isinstance(s, list):
        return [openapi_to_jsonschema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: openapi_to_jsonschema(v) for k, v in s.items() if not k.startswith("x-kubernetes-")}
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if s.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    raw = json.loads((DATA / f"{_CRDS[kind]}.v1.json").read_text())
    return jsonschema.Draft7Validator(openapi_to_jsonschema(raw["openAPIV3Schema"]))


def pod_templates(doc: dict, path: str = "") -> list[tuple[str, dict]]:
    """Every pod template inside a manifest: (where, template)."""
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            here = f"{path}.{k}" if path else k
            if k == "template" and isinstance(v, dict) and "spec" in v and "containers" in v.get("spec", {}):
                found.append((here, v))
            else:
                found += pod_templates(v, here)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += pod_templates(v, f"{path}[{i}]")
    return found


def validate_manifest(doc: dict) -> list[str]:
    """Problems of one manifest (empty when it validates)."""
    import kubernetes_validate

    problems = []
    kind = doc.get("kind")
    if kind in _CRDS:
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{kind}: apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
        for err in crd_validator(kind).iter_errors(doc):
            problems.append(f"{kind} {'.'.join(map(str, err.absolute_path))}: {err.message}")
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{kind} {'.'.join(map(str, exc.path))}: {exc.message}")
    for where, tmpl in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tmpl}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{kind} {where}.{'.'.join(map(str, exc.path))}: {exc.message}")
    return problems
