"""The per-concept methods' parameters (ICO, DCI, Infusion; SPEC §4.1–§4.3), without torch: validating a job file
or a request (``cafe concepts …``) imports no model library. Each method module re-exports its class."""
from __future__ import annotations

import math
from dataclasses import dataclass

PRECISION_NAMES = ("auto", "fp32", "fp16", "bf16")  # autocast dtype of a frozen base ("auto": its own)
ICO_PROMPTS = ("ico", "manual")
INFUSION_PLACEMENTS = ("post_v", "pre_v")  # D6: Δ after to_v (inner_dim) | before to_v (text width)
INFUSION_MODES = ("paper", "code_compat")
#: the authors' training prompts (zwl666666/infusion, infusion/dataset.py: PROMPT_TEMPLATE), '{}' = the noun
INFUSION_TEMPLATES = ("a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}",
                      "image of a {}", "image of the {}", "A photograph of {}", "A {} shown in a photo ",
                      "A photo of {}", "A {}", "{}")
#: mask weighting: "authors" = mean((m·ε̂ − m·ε)²) over every element, m bilinear to the latent size and divided by
#: its max (their p_losses); "normalized" = Σ m (ε̂ − ε)² / (C · Σ m), m area-resized
INFUSION_MASK_LOSSES = ("authors", "normalized")


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
    templates: tuple[str, ...] = INFUSION_TEMPLATES
    mask_loss: str = "authors"
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
        if self.mask_loss not in INFUSION_MASK_LOSSES:
            raise ValueError(f"InfusionParams.mask_loss={self.mask_loss!r}: allowed {INFUSION_MASK_LOSSES}")
        if self.placement not in INFUSION_PLACEMENTS:
            raise ValueError(f"InfusionParams.placement={self.placement!r}: allowed {INFUSION_PLACEMENTS}")
        if self.mode not in INFUSION_MODES:
            raise ValueError(f"InfusionParams.mode={self.mode!r}: allowed {INFUSION_MODES}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"InfusionParams.flip_p={self.flip_p!r}: must be in [0, 1]")
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"InfusionParams.precision={self.precision!r}: allowed {PRECISION_NAMES}")


EM_INITS = ("word", "random", "inversion")
EM_UNET_PARAMS = ("all", "attention", "cross_attention")


@dataclass(frozen=True)
class EmParams:
    """EM concept-mask settings (SPEC §4.4, D7; defaults from seed 003 and Break-A-Scene).

    ``tokens`` are the K new tokens; ``token_images[k]`` is the image token k is tied to (default: image 0 for
    every token); ``background_tokens`` name the tokens that stand for a background (a CRF label like any
    other, never a generation subject of its own). ``init``: ``word`` (``init_words[k]``, one vocabulary token
    each), ``random`` (a random row of the vocabulary's embedding statistics) or ``inversion`` (``init_steps``
    steps of unmasked textual inversion at ``lr_tokens``). ``layers``: ``"all"`` attn2 layers resized to
    ``attn_res`` (seed 003) or an int side (``16``: Break-A-Scene's 16×16 layers).
    """

    tokens: tuple[str, ...] = ("[v1]", "[v2]")
    token_images: tuple[int, ...] | None = None
    background_tokens: tuple[str, ...] = ()
    init: str = "inversion"
    init_words: tuple[str, ...] | None = None
    init_steps: int = 100
    steps_tokens: int = 400      # stage 2: tokens under the current masks, re-estimated every reestimate_every
    steps_joint: int = 400       # stage 3: tokens + UNet, masks fixed
    lr_tokens: float = 5e-4
    lr_unet: float = 2e-6
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    batch_size: int = 1
    flip_p: float = 0.5
    attn_weight: float = 0.01
    threshold: float = 0.5
    attn_res: int = 16
    layers: str | int = "all"
    mask_timesteps: int = 50
    reestimate_every: int = 1    # seed 003 reads as every step; 50 is a cheaper option
    crf: bool = True
    crf_iterations: int = 10     # CutLER's inference(10) and pairwise parameters (SPEC §4.4)
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 7.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 10.0
    #: None: the sxy values in pixels as given (SPEC); N: they are CutLER's at N-pixel images and scale with the
    #: image (at 32 px, 512 turns the bilateral sxy 50 into 3.1 px)
    crf_reference_size: int | None = None
    unet_params: str = "all"     # stage 3: "all" (Break-A-Scene) | "attention" (attn1+attn2) | "cross_attention"
    prompt: str = "a photo of {}"
    joiner: str = " and "        # between the tokens named in one prompt: "a photo of [v1] and [v2]"
    precision: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "background_tokens", tuple(self.background_tokens))
        if not self.tokens or len(set(self.tokens)) != len(self.tokens) or \
                not all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in self.tokens):
            raise ValueError(f"EmParams.tokens: {self.tokens!r} must be distinct non-empty strings without whitespace")
        unknown = [t for t in self.background_tokens if t not in self.tokens]
        if unknown:
            raise ValueError(f"EmParams.background_tokens: {unknown} are not among tokens {list(self.tokens)}")
        if len(self.background_tokens) == len(self.tokens):
            raise ValueError("EmParams.background_tokens: at least one token must name a subject")
        if self.token_images is not None:
            object.__setattr__(self, "token_images", tuple(int(i) for i in self.token_images))
            if len(self.token_images) != len(self.tokens) or min(self.token_images) < 0:
                raise ValueError(f"EmParams.token_images: {self.token_images!r} needs one image index ≥ 0 per token "
                                 f"({len(self.tokens)})")
        if self.init not in EM_INITS:
            raise ValueError(f"EmParams.init: {self.init!r} not allowed; allowed: {EM_INITS}")
        if self.init == "word":
            if self.init_words is None or len(self.init_words) != len(self.tokens):
                raise ValueError(f"EmParams.init_words: {self.init_words!r} needs one word per token "
                                 f"({len(self.tokens)}) with init 'word'")
            object.__setattr__(self, "init_words", tuple(self.init_words))
        for name in ("batch_size", "attn_res", "mask_timesteps", "reestimate_every", "crf_iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EmParams.{name}: {getattr(self, name)!r} must be an integer ≥ 1")
        for name in ("init_steps", "steps_tokens", "steps_joint"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"EmParams.{name}: {getattr(self, name)!r} must be an integer ≥ 0")
        if self.crf_reference_size is not None and (not isinstance(self.crf_reference_size, int)
                                                    or self.crf_reference_size < 1):
            raise ValueError(f"EmParams.crf_reference_size: {self.crf_reference_size!r} must be null or an integer ≥ 1")
        if self.layers != "all" and not (isinstance(self.layers, int) and self.layers >= 1):
            raise ValueError(f"EmParams.layers: {self.layers!r} not allowed; allowed: 'all' or a side ≥ 1")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"EmParams.threshold: {self.threshold!r} must be in (0, 1)")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"EmParams.flip_p: {self.flip_p!r} must be in [0, 1]")
        for name in ("lr_tokens", "lr_unet", "weight_decay", "grad_clip", "attn_weight", "crf_gaussian_sxy",
                     "crf_gaussian_compat", "crf_bilateral_sxy", "crf_bilateral_srgb", "crf_bilateral_compat"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"EmParams.{name}: {getattr(self, name)!r} must be ≥ 0")
        if self.unet_params not in EM_UNET_PARAMS:
            raise ValueError(f"EmParams.unet_params: {self.unet_params!r} not allowed; allowed: {EM_UNET_PARAMS}")
        if self.prompt.count("{}") != 1:
            raise ValueError(f"EmParams.prompt: {self.prompt!r} must contain '{{}}' exactly once")
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"EmParams.precision: {self.precision!r} not allowed; allowed: {PRECISION_NAMES}")

    @property
    def images_of_tokens(self) -> tuple[int, ...]:
        return self.token_images if self.token_images is not None else (0,) * len(self.tokens)
