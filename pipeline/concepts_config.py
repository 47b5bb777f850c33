"""The ``concepts`` section of the config tree: per-concept customization jobs (SPEC §3, §4.1–§4.3).

Usage (a job file is a config file with a ``jobs:`` list and an optional ``base:`` config it extends)::

    # configs/concepts/tiny.yaml
    base: ../tiny.yaml                 # models, ray: the embedded default
    concepts:
      output: outputs/concepts
      ico: {steps: 120}
    jobs:
      - {id: red-circle, method: ico, noun: circle, images: [a.png, b.png]}

The section holds how jobs run (actor pool, attempts, heartbeats), the per-method parameter defaults (checked
against the method's own parameter dataclass: ``training.methods.ico.IcoParams``, ``InfusionParams``,
``EmParams``, ``DciParams``) and how concepts are sampled and evaluated. The jobs themselves are *not* part of the validated
tree: one bad job must fail alone, with its error in the job table, while the others run
(:mod:`pipeline.concept_jobs`).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from pydantic import Field, model_validator

from pipeline.build_config import _Strict

MAX_ACTORS = 4096
#: method name -> (module, parameter dataclass)
METHOD_PARAMS = {
    "ico": ("training.methods.params", "IcoParams"),
    "infusion": ("training.methods.params", "InfusionParams"),
    "em": ("training.methods.params", "EmParams"),
}
DCI_PARAMS = ("training.methods.params", "DciParams")


def params_class(method: str):
    """The parameter dataclass of ``method`` (``ValueError`` naming the allowed methods)."""
    if method not in METHOD_PARAMS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHOD_PARAMS)}")
    module, name = METHOD_PARAMS[method]
    return getattr(importlib.import_module(module), name)


def build_params(cls, values: dict[str, Any], where: str):
    """``cls(**values)`` with unknown keys and wrong types reported as ``ValueError`` naming ``where``.

    YAML lists become tuples where the field is a tuple. Types are checked with pydantic's dataclass support.
    """
    from pydantic import TypeAdapter, ValidationError

    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of parameters, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    try:
        TypeAdapter(cls).validate_python(dict(values), strict=False)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])} = {e.get('input')!r}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise ValueError(f"{where}: {problems}") from None
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**fixed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def dci_params_class():
    module, name = DCI_PARAMS
    return getattr(importlib.import_module(module), name)


class ConceptActorsConfig(_Strict):
    """The actor pool: each actor loads the base model once and runs many jobs."""

    num_actors: int = Field(1, ge=1, le=MAX_ACTORS)
    num_cpus: float = Field(1.0, ge=0, le=1024)
    num_gpus: float = Field(0.0, ge=0, le=64, description="per actor; > 0 puts the base model on cuda")


class ConceptSampleConfig(_Strict):
    """Sampling of a concept (artifact samples, ``cafe concepts generate``). ``null``: the method's default
    (ICO: DDIM 50 steps, η 1, CFG 6 — DCI: 200 steps; Infusion: 50 steps, η 0, CFG 8)."""

    steps: int | None = Field(None, ge=1, le=10_000)
    guidance: float | None = Field(None, ge=0, le=100)
    eta: float | None = Field(None, ge=0, le=1)


class ConceptEvalConfig(_Strict):
    """What ``cafe concepts eval`` (and each job's ``metrics.json``) measures (SPEC §3)."""

    prompts: list[str] = Field(default_factory=lambda: ["a photo of {}"], min_length=1,
                               description="'{}' is replaced by the concept phrase (ICO: '<new1> <new2> <new3> noun'; "
                                           "Infusion: the class noun)")
    samples_per_prompt: int = Field(2, ge=1, le=10_000)
    divergence: bool = Field(False, description="also measure LFD and W2 against the base model")
    lfd_samples: int = Field(32, ge=1, le=1_000_000)
    #: samples per side of W2 (the papers: 1,000). Below the 256 pooled dimensions W2 is mostly estimator bias;
    #: every W2 is reported with ``w2_baseline`` (two draws of the base) and a note when n < 256
    w2_samples: int = Field(1000, ge=2, le=1_000_000)
    w2_prompts: list[str] = Field(default_factory=lambda: ["a photo of a {noun}"], min_length=1,
                                  description="super-class prompts whose base/customized latents W2 compares")
    lfd_prompts: list[str] = Field(default_factory=lambda: ["a photo of a dog", "a photo of a car"], min_length=1,
                                   description="non-customized prompts for the Latent Fisher divergence")

    @model_validator(mode="after")
    def _placeholders(self) -> "ConceptEvalConfig":
        for p in self.prompts:
            if "{}" not in p:
                raise ValueError(f"eval.prompts: {p!r} has no '{{}}' for the concept phrase")
        for p in self.w2_prompts:
            if "{noun}" not in p:
                raise ValueError(f"eval.w2_prompts: {p!r} has no '{{noun}}'")
        return self


class ConceptsConfig(_Strict):
    """Per-concept jobs: storage, actor pool, retries, method defaults, sampling and evaluation."""

    output: str = Field("outputs/concepts", min_length=1,
                        description="artifacts <output>/<concept>/<method>/<run>/ and the job table <output>/_jobs/; "
                                    "a local path or a storage URI (s3://...)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="a job's default seed")
    max_attempts: int = Field(3, ge=1, le=100, description="tries per job when its actor dies or a transient error hits")
    heartbeat_s: float = Field(5.0, gt=0, le=3600)
    lease_ttl_s: float = Field(60.0, gt=0, le=86400, description="a dead driver's lease expires after this")
    actors: ConceptActorsConfig = ConceptActorsConfig()
    ico: dict[str, Any] = Field(default_factory=dict, description="defaults for every ICO job (IcoParams fields)")
    infusion: dict[str, Any] = Field(default_factory=dict, description="defaults for every Infusion job")
    em: dict[str, Any] = Field(default_factory=dict, description="defaults for every EM concept-mask job (EmParams)")
    dci: dict[str, Any] = Field(default_factory=dict, description="DciParams defaults for `generate --dci`")
    prior_images: str | None = Field(None, description="ICO prior preservation from real class images: a folder (path or "
                                      "URI; '{noun}' is replaced by the job's noun) of images with same-named .txt "
                                      "captions; null: images generated by the base from 'a photo of a {noun}'")
    #: host memory for loaded concepts, least recently used evicted first (an SD-1.5 ICO concept is ≈ 73 MiB in
    #: float32); 0 keeps none. A concept is copied to the GPU only while it samples
    cache_mb: float = Field(2048.0, ge=0, le=10_000_000)
    sample: ConceptSampleConfig = ConceptSampleConfig()
    samples_per_job: int = Field(2, ge=0, le=1000, description="sample images written beside each artifact")
    eval: ConceptEvalConfig = ConceptEvalConfig()

    @model_validator(mode="after")
    def _method_defaults(self) -> "ConceptsConfig":
        # only given values are checked (importing a method pulls in torch; an empty mapping needs no check)
        for method in METHOD_PARAMS:
            if getattr(self, method):
                build_params(params_class(method), getattr(self, method), f"concepts.{method}")
        if self.dci:
            build_params(dci_params_class(), self.dci, "concepts.dci")
        return self
