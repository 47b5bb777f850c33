"""The ``pipeline`` section of the config tree: the CAFE loop (rounds, evaluation, the promotion gate)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.build_config import _Strict


class EvalConfig(_Strict):
    """``cafe eval``: the DreamBench protocol (SPEC §2) on a subject folder and prompt list.

    ``subjects``: a directory with ``prompts.jsonl`` (one object per line: ``subject``, ``class``, ``phrase``;
    the world's set adds ``attribute``, ``value``, ``held_out``) and ``subjects/<subject>/<i>.png``.
    ``oracle``: the synthetic world's judge (identity kept, instruction followed, both); null for real data.
    ``max_prompts``: evaluate the first N (subject, prompt) pairs (null: all) — for smoke runs only.
    """

    subjects: str = "models/world/eval"
    oracle: str | None = Field(None, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    refs: int = Field(1, ge=1, le=16, description="reference images per subject used as inputs")
    num_inference_steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(2.5, ge=0.0)
    t2i_guidance_scale: float = Field(2.5, ge=0.0)
    scale_dino: float = Field(1.0, ge=0.0, le=10.0)
    max_prompts: int | None = Field(None, ge=1)
    device: str = "auto"


class GateConfig(_Strict):
    """Promotion (``cafe retrain``): a candidate is promoted only if every gated metric is at least the current
    model's minus ``tolerance`` (higher is better for every metric)."""

    metrics: list[str] = Field(default_factory=lambda: ["assistant.both", "assistant.identity",
                                                        "assistant.instruction"], min_length=1)
    tolerance: float = Field(0.02, ge=0.0, le=1.0)
    #: ``changing``: the pairs whose instruction asks for something the input does not already show (CAFE's
    #: setting; needs the oracle); ``all``; ``held_out`` (pairs held out of the world models' training)
    split: Literal["all", "held_out", "changing"] = "changing"


class LoopConfig(_Strict):
    """``cafe pipeline run``: round 0 → train → evaluate → rounds r ≥ 1 (Eq. 4) → train on the union → …

    ``output``: the loop's directory or URI (null: ``<run.output_dir>/<run.name>-loop``).
    ``registry``: the model registry — a ``*.sqlite`` file on a POSIX file system, or a directory / ``s3://`` prefix
    holding a log of decisions written with conditional creates (null: ``<output>/registry.sqlite`` locally,
    ``<output>/registry`` when ``output`` is a URI).
    """

    rounds: int = Field(2, ge=1, le=100, description="round 0 plus rounds-1 self-distillation rounds")
    output: str | None = Field(None, min_length=1)
    registry: str | None = Field(None, min_length=1)
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
