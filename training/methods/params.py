"""The per-concept methods' parameters (ICO, DCI, Infusion; SPEC §4.1–§4.3), without torch: validating a job file
or a request (``cafe concepts …``) imports no model library. Each method module re-exports its class."""
from __future__ import annotations

import math
from dataclasses import dataclass

PRECISION_NAMES = ("auto", "fp32", "fp16", "bf16")  # autocast dtype of a frozen base ("auto": its own)
ICO_PROMPTS = ("ico", "manual")
INFUSION_PLACEMENTS = ("post_v", "pre_v")  # D6: Δ after to_v (inner_dim) | before to_v (text width)
INFUSION_MODES = ("paper", "code_compat")


@dataclass(frozen=True)
class IcoParams:
    """ICO fine-tuning parameters; the defaults are the authors' last run (SPEC §4.1)."""

    steps: int = 900
    learning_rate: float = 1e-5  # per sample: effective lr = learning_rate · batch_size (one device)
    context_lr_scale: float = 10.0
    weight_decay: float = 0.01
    batch_size: int = 1
    num_prefix: int = 1  # P
    num_suffix: int = 1  # S
    new_tokens: tuple[str, ...] = ("<new1>", "<new2>", "<new3>")
    init_token_ids: tuple[int, ...] | None = None
    init_word: str | None = None
    context_init_words: tuple[str, str] = ("a", ".")
    prompt: str = "ico"
    prior_weight: float = 1.0
    flip_p: float = 0.5
    precision: str = "auto"   # "auto": autocast in the base's own half dtype, fp32 for a float32 base
    code_compat: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"IcoParams.{name}: {getattr(self, name)!r} must be ≥ 1")
        for name in ("num_prefix", "num_suffix"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"IcoParams.{name}: {getattr(self, name)!r} must be ≥ 0")
        if not self.new_tokens or len(set(self.new_tokens)) != len(self.new_tokens) or \
                not all(t and not any(c.isspace() for c in t) for t in self.new_tokens):
            raise ValueError(f"IcoParams.new_tokens: {self.new_tokens!r} must be distinct non-empty strings "
                             "without whitespace")
        if self.init_token_ids is not None and self.init_word is not None:
            raise ValueError("IcoParams: give init_token_ids or init_word, not both")
        if self.init_token_ids is not None and len(self.init_token_ids) != len(self.new_tokens):
            raise ValueError(f"IcoParams.init_token_ids: {self.init_token_ids!r} needs one id per new token "
                             f"({len(self.new_tokens)})")
        if len(self.context_init_words) != 2:
            raise ValueError(f"IcoParams.context_init_words: {self.context_init_words!r} must be (prefix, suffix)")
        if self.prompt not in ICO_PROMPTS:
            raise ValueError(f"IcoParams.prompt: {self.prompt!r} not allowed; allowed: {ICO_PROMPTS}")
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"IcoParams.precision: {self.precision!r} not allowed; allowed: {PRECISION_NAMES}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"IcoParams.flip_p: {self.flip_p!r} must be in [0, 1]")
        for name in ("learning_rate", "context_lr_scale", "weight_decay", "prior_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"IcoParams.{name}: {getattr(self, name)!r} must be ≥ 0")


@dataclass(frozen=True)
class DciParams:
    """DCI sampling parameters (SPEC §4.2 defaults: the authors' sample.py)."""

    lam: float = 0.0  # injection ratio λ; -inf => M_c = 1 exactly (single-branch)
    agg_time: float = 0.3
    steps: int = 200
    guidance: float = 6.0
    eta: float = 1.0
    share_guidance: bool = True
    aux_nouns: tuple[str, ...] = ("dog", "cat", "car", "person")

    def __post_init__(self):
        if math.isnan(self.lam):
            raise ValueError("DciParams.lam: NaN not allowed; allowed: a float or ±inf")
        if not 0.0 <= self.agg_time <= 1.0:
            raise ValueError(f"DciParams.agg_time: {self.agg_time!r} must be in [0, 1]")
        if int(self.steps) < 1:
            raise ValueError(f"DciParams.steps: {self.steps!r} must be ≥ 1")
        if self.eta < 0:
            raise ValueError(f"DciParams.eta: {self.eta!r} must be ≥ 0")


@dataclass(frozen=True)
class InfusionParams:
    """Infusion training settings (defaults: SPEC §4.3)."""

    steps: int = 500  # optimizer steps
    learning_rate: float = 0.01
    batch_size: int = 4
    grad_accum: int = 4
    templates: tuple[str, ...] = ("a photo of a {}",)
    placement: str = "post_v"  # D6: "post_v" (Δ ∈ inner_dim after to_v) | "pre_v" (Δ ∈ text width before to_v)
    mode: str = "paper"  # "paper" | "code_compat"
    flip_p: float = 0.5
    precision: str = "auto"  # autocast dtype of the frozen base: "auto" (its own dtype) | "fp32" | "fp16" | "bf16"
    #: draw z0 from the VAE posterior each step (diffusers' scripts) instead of its mean (see module doc)
    sample_posterior: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InfusionParams.{name}={value!r}: must be an integer >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"InfusionParams.learning_rate={self.learning_rate!r}: must be > 0")
        if isinstance(self.templates, str) or not self.templates:
            raise ValueError(f"InfusionParams.templates={self.templates!r}: must be a non-empty tuple of strings")
        object.__setattr__(self, "templates", tuple(self.templates))
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"InfusionParams.templates: {t!r} must contain '{{}}' exactly once")
        if self.placement not in INFUSION_PLACEMENTS:
            raise ValueError(f"InfusionParams.placement={self.placement!r}: allowed {INFUSION_PLACEMENTS}")
        if self.mode not in INFUSION_MODES:
            raise ValueError(f"InfusionParams.mode={self.mode!r}: allowed {INFUSION_MODES}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"InfusionParams.flip_p={self.flip_p!r}: must be in [0, 1]")
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"InfusionParams.precision={self.precision!r}: allowed {PRECISION_NAMES}")
