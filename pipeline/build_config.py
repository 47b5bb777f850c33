"""The ``build`` section of the config tree: the round-0 CAFE dataset construction (SPEC §1, §4.5, D4)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: SPEC §1.1 prompt for generated sources
PAPER_SOURCE_PROMPT = (
    "A realistic photo picture of {class}, ultra quality, sharp focus, tack sharp, dof, film grain, "
    "Fujifilm XT3, crystal clear, 8K UHD, highly detailed"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourcesConfig(_Strict):
    """Where reference images come from (SPEC §1.1).

    ``folder``: images under ``path``, class = sub-folder name, or from ``manifest`` (CSV/JSON with
    ``file`` and ``class`` columns). ``table``: Parquet/Arrow file(s) with image bytes. ``generate``: the
    ``t2i`` role renders ``prompt_template`` for each class in ``classes``.
    """

    kind: Literal["folder", "table", "generate"] = "generate"
    path: str | None = None
    manifest: str | None = None
    image_column: str = "image"
    class_column: str = "class"
    classes: list[str] = Field(default_factory=lambda: ["person"])
    num_per_class: int = Field(1, ge=1)
    prompt_template: str = PAPER_SOURCE_PROMPT
    generation_steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    #: every source is converted to RGB and resized to image_size×image_size by ``resize``
    image_size: int = Field(64, ge=8, le=4096)
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    min_side: int = Field(8, ge=1)
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit (width*height)")
    max_file_mb: float = Field(64.0, gt=0)
    num_cpus_per_actor: float = Field(0.125, ge=0.0)
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="only used when kind is 'generate'")

    @model_validator(mode="after")
    def _check(self) -> "SourcesConfig":
        if self.kind in ("folder", "table") and not self.path:
            raise ValueError(f"sources.path is required when sources.kind is {self.kind!r}")
        if self.kind == "generate" and not self.classes:
            raise ValueError("sources.classes must name at least one class when sources.kind is 'generate'")
        if "{class}" not in self.prompt_template:
            raise ValueError("sources.prompt_template must contain '{class}'")
        return self


class InstructionsConfig(_Strict):
    """k seeded instructions per source, built into prompts as SPEC §1.2 says."""

    phrases: list[str] = Field(
        default_factory=lambda: ["in comic book style", "on the beach", "wearing a red hat"], min_length=1
    )
    per_source: int = Field(2, ge=1)
    sstar_prompt: str = "a holder {phrase}"
    reference_prompt: str = "a {class} {phrase}"
    filled_prompt: str = "a {class} {phrase}"

    @model_validator(mode="after")
    def _check(self) -> "InstructionsConfig":
        if self.per_source > len(self.phrases):
            raise ValueError(
                f"instructions.per_source={self.per_source} exceeds the {len(self.phrases)} configured phrases"
            )
        if "holder" not in self.sstar_prompt.split():
            raise ValueError("instructions.sstar_prompt must contain the word 'holder' (where S* goes)")
        for name in ("sstar_prompt", "reference_prompt", "filled_prompt"):
            if "{phrase}" not in getattr(self, name):
                raise ValueError(f"instructions.{name} must contain '{{phrase}}'")
        return self


class ProFusionConfig(_Strict):
    """ProFusion fusion sampling and per-image fine-tuning (SPEC §4.5; defaults = the authors' notebook)."""

    num_inference_steps: int = Field(50, ge=1, le=1000)
    s1: float = Field(7.0, ge=0.0, description="guidance on the S* prompt")
    s2: float = Field(5.0, ge=0.0, description="guidance on the class-word reference prompt")
    refine_step: int = Field(1, ge=0, le=10)
    gamma: float = Field(0.6, ge=0.0, le=10.0)
    w_r: float = Field(7.0, ge=0.0)
    refine_eta: float = Field(1.0, ge=0.0, le=1.0)
    finetune: bool = False
    finetune_steps: int = Field(100, ge=1)
    finetune_batch_size: int = Field(4, ge=1)
    finetune_lr: float = Field(2e-5, gt=0.0)
    finetune_weight_decay: float = Field(1e-2, ge=0.0)
    finetune_prompt: str = "a photo of holder"
    num_augmentations: int = Field(31, ge=0)
    augmentation: Literal["generic", "none"] = "generic"
    batch_size: int = Field(4, ge=1, description="(source, instruction) pairs per actor call")
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, ge=0.0)


class ScoringConfig(_Strict):
    """CLIP-T, DINO and CLIP-I scorer actor pools (SPEC §1.4, §3)."""

    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(0.25, ge=0.0)


class RulesConfig(_Strict):
    """Keep/drop decisions on stored scores (SPEC §1.4). ``quantile`` keeps rows at or above the quantile."""

    mode: Literal["absolute", "quantile"] = "absolute"
    clip_t_min: float = Field(0.3, ge=-1.0, le=1.0)
    dino_min: float = Field(0.6, ge=-1.0, le=1.0)
    clip_t_quantile: float = Field(0.5, ge=0.0, le=1.0)
    dino_quantile: float = Field(0.5, ge=0.0, le=1.0)


class OpenAIBackendConfig(_Strict):
    """Any OpenAI-compatible chat-completions endpoint (vLLM, TGI, ...). The key comes from ``api_key_env``."""

    base_url: str = Field("http://127.0.0.1:8000/v1", pattern=r"^https?://")
    model: str = "llama-2-70b-chat"
    api_key_env: str | None = "CAFE_LLM_API_KEY"
    timeout_s: float = Field(60.0, gt=0.0)
    max_concurrency: int = Field(8, ge=1, le=256)
    max_retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(1.0, ge=0.0)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=8)


class TransformersBackendConfig(_Strict):
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)


class DialogueConfig(_Strict):
    """Dialogue synthesis (D4): one JSON object {"user", "assistant"} per row, strictly parsed."""

    backend: Literal["template", "transformers", "openai"] = "template"
    styles: list[Literal["clear", "ambiguous", "question"]] = Field(
        default_factory=lambda: ["clear", "ambiguous", "question"], min_length=1
    )
    max_chars: int = Field(600, ge=16)
    num_cpus_per_actor: float = Field(0.125, ge=0.0)
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    transformers: TransformersBackendConfig = TransformersBackendConfig()


class BuildConfig(_Strict):
    """``cafe build``: sources → instructions → ProFusion → scores → rules → dialogue → Arrow (round 0)."""

    round: int = Field(0, ge=0)
    sources: SourcesConfig = SourcesConfig()
    instructions: InstructionsConfig = InstructionsConfig()
    profusion: ProFusionConfig = ProFusionConfig()
    scoring: ScoringConfig = ScoringConfig()
    rules: RulesConfig = RulesConfig()
    dialogue: DialogueConfig = DialogueConfig()
    rows_per_chunk: int = Field(8, ge=1, description="rows committed per ledger chunk (resume granularity)")
    report_samples: int = Field(8, ge=0)
