"""The ``build`` section of the config tree: the round-0 CAFE dataset construction (SPEC §1, §4.5, D4)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: SPEC §1.1 prompt for generated sources
PAPER_SOURCE_PROMPT = (
    "A realistic photo picture of {class}, ultra quality, sharp focus, tack sharp, dof, film grain, "
    "Fujifilm XT3, crystal clear, 8K UHD, highly detailed"
)


#: Resource bounds shared by every actor pool of the config tree. They are generous for a large GPU cluster and
#: exist so that a typo (a stray ``000``) fails validation instead of asking Ray for 10**12 actors.
MAX_ACTORS = 1024  # actors in one pool
MAX_GPUS_PER_ACTOR = 8  # one node's GPUs; fractions share a GPU
MAX_CPUS_PER_ACTOR = 256  # one node's cores; fractions share a core
MAX_BATCH_SIZE = 65_536  # rows (or pairs) per actor call

ActorCount = Annotated[int, Field(ge=1, le=MAX_ACTORS)]
GpusPerActor = Annotated[float, Field(ge=0.0, le=MAX_GPUS_PER_ACTOR)]
CpusPerActor = Annotated[float, Field(ge=0.0, le=MAX_CPUS_PER_ACTOR)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]


class _Strict(BaseModel):
    """Base of every config section.

    * unknown keys are errors (``extra="forbid"``);
    * no type coercion (``strict``): ``true`` is not a number, ``"3"`` is not an int and ``1`` is not a bool; an
      int is still accepted where a float is expected;
    * no ``.inf``/``.nan`` in any float (``allow_inf_nan=False``);
    * a mapping given for a sub-section is merged into that field's default (so ``models.t2i: {dtype: float16}``
      keeps the default ``path``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _merge_into_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = None
        for name, field in cls.model_fields.items():
            default, given = field.default, data.get(name)
            if isinstance(default, BaseModel) and isinstance(given, dict):
                merged = merged if merged is not None else dict(data)
                merged[name] = _deep_merge(default.model_dump(exclude_unset=True), given)
        return data if merged is None else merged


def _deep_merge(base: dict, given: dict) -> dict:
    out = dict(base)
    for key, value in given.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


class SourcesConfig(_Strict):
    """Where reference images come from (SPEC §1.1); read by :mod:`pipeline.sources`.

    ``folder``: every file under ``path`` (a local path or a ``pyarrow.fs`` URI such as ``s3://bucket/prefix``),
    or the files listed by ``manifest`` (CSV/JSON with a ``file`` column, paths relative to ``path``).
    ``table``: Parquet/Arrow file(s) with image bytes or HF ``Image`` structs in ``image_column``.
    ``generate``: the ``t2i`` role renders ``prompt_template`` for each class in ``classes``.

    The class of a folder/table source comes from ``class_from``: ``folder`` (the first sub-folder under
    ``path``), ``manifest`` (the manifest's or table's ``class_column``) or ``fixed`` (``class_name`` for
    every source). Unset, it is ``manifest`` for tables and manifests and ``folder`` otherwise. Folder names
    that look numeric (``00000``, ``1_000``, ``3.5``) are not classes: those sources are quarantined as
    ``numeric_class`` unless ``allow_numeric_classes`` is set.
    """

    kind: Literal["folder", "table", "generate"] = "generate"
    path: str | None = None
    #: folder/manifest sources: glob patterns (``fnmatch``) on the path relative to ``path`` that are left out on
    #: purpose, e.g. the evaluation's held-out identities (``"*/cyan-circle-whitedot__*"``); counted in the log
    exclude: list[str] = Field(default_factory=list)
    #: a Parquet file (path or URI) with a ``source_id`` column: sources an earlier build already consumed, left
    #: out of this one (counted in the log). ``cafe retrain`` builds only new sources this way
    skip_ids: str | None = Field(None, min_length=1)
    #: names the listing this build plans. A build plans its sources once and keeps that plan on resume; a new
    #: value plans afresh (``cafe retrain`` sets the source snapshot here). null: the first plan of the output
    snapshot: str | None = Field(None, min_length=1, max_length=200)
    manifest: str | None = None
    image_column: str = "image"
    class_column: str = "class"
    class_from: Literal["folder", "fixed", "manifest"] | None = None
    class_name: str | None = Field(None, min_length=1, description="the class of every source (class_from: fixed)")
    allow_numeric_classes: bool = Field(False, description="accept folder names like '00000' as classes")
    classes: list[str] = Field(default_factory=lambda: ["person"])
    num_per_class: int = Field(1, ge=1, le=1_000_000)
    prompt_template: str = PAPER_SOURCE_PROMPT
    generation_steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    #: every source is converted to RGB and resized to image_size×image_size by ``resize``
    image_size: int = Field(64, ge=8, le=4096)
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    min_side: int = Field(8, ge=1, le=4096)
    max_pixels: int = Field(64_000_000, ge=1, le=1_000_000_000, description="decompression-bomb limit (width*height)")
    max_file_mb: float = Field(64.0, gt=0, le=4096.0)
    num_actors: ActorCount = 1
    #: the pool autoscales between ``num_actors`` and ``max_actors`` (null: a fixed pool of ``num_actors``)
    max_actors: ActorCount | None = None
    num_cpus_per_actor: CpusPerActor = 0.125
    num_gpus_per_actor: GpusPerActor = Field(0.0, description="only used when kind is 'generate'")

    @model_validator(mode="after")
    def _check(self) -> "SourcesConfig":
        if self.kind in ("folder", "table") and not self.path:
            raise ValueError(f"sources.path is required when sources.kind is {self.kind!r}")
        if self.kind == "generate" and not self.classes:
            raise ValueError("sources.classes must name at least one class when sources.kind is 'generate'")
        if "{class}" not in self.prompt_template:
            raise ValueError("sources.prompt_template must contain '{class}'")
        if self.kind == "generate" and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"sources.classes = {self.classes}: each class may be listed once")
        self._check_class_from()
        return self

    def _check_class_from(self) -> None:
        if self.class_from is not None and self.kind == "generate":
            raise ValueError("sources.class_from is for 'folder' and 'table' sources; "
                             "generated sources take their class from sources.classes")
        if self.class_from == "folder" and self.kind == "table":
            raise ValueError("sources.class_from = 'folder' is not allowed when sources.kind is 'table'; "
                             "allowed: 'manifest' (the class_column) or 'fixed'")
        if self.class_from == "manifest" and self.kind == "folder" and not self.manifest:
            raise ValueError("sources.class_from = 'manifest' needs sources.manifest")
        if (self.class_from == "fixed") != (self.class_name is not None):
            raise ValueError(f"sources.class_name = {self.class_name!r} with class_from = {self.class_from!r}: "
                             "class_name is required with class_from 'fixed' and allowed only there")

    @property
    def class_source(self) -> str | None:
        """``class_from`` with the default applied: ``folder``, ``fixed``, ``manifest`` (None for 'generate')."""
        if self.kind == "generate":
            return None
        if self.class_from is not None:
            return self.class_from
        return "manifest" if self.kind == "table" or self.manifest else "folder"


MAX_PHRASE_CHARS = 200


class InstructionsConfig(_Strict):
    """k seeded instructions per source, built into prompts as SPEC §1.2 says."""

    phrases: list[str] = Field(
        default_factory=lambda: ["in comic book style", "on the beach", "wearing a red hat"], min_length=1
    )
    per_source: int = Field(2, ge=1)
    sstar_prompt: str = "a holder {phrase}"
    reference_prompt: str = "a {class} {phrase}"
    filled_prompt: str = "a {class} {phrase}"

    @field_validator("phrases")
    @classmethod
    def _distinct_phrases(cls, phrases: list[str]) -> list[str]:
        # row ids are sha256(round|source_id|phrase): a repeated phrase would give two rows one id
        seen: dict[str, int] = {}
        for i, phrase in enumerate(phrases):
            key = " ".join(phrase.split()).casefold()
            if not key:
                raise ValueError(f"phrases[{i}] is blank; every phrase must have text")
            if len(phrase) > MAX_PHRASE_CHARS:
                raise ValueError(f"phrases[{i}] has {len(phrase)} characters; at most {MAX_PHRASE_CHARS} (a phrase "
                                 "goes into 77-token CLIP prompts)")
            if key in seen:
                raise ValueError(f"phrases[{i}] {phrase!r} repeats phrases[{seen[key]}] {phrases[seen[key]]!r} "
                                 "(ignoring case and spacing); phrases must be distinct (they make the row ids)")
            seen[key] = i
        return phrases

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
    s1: float = Field(7.0, ge=0.0, le=50.0, description="guidance on the S* prompt")
    s2: float = Field(5.0, ge=0.0, le=50.0, description="guidance on the class-word reference prompt")
    refine_step: int = Field(1, ge=0, le=10)
    gamma: float = Field(0.6, ge=0.0, le=10.0)
    w_r: float = Field(7.0, ge=0.0, le=50.0)
    refine_eta: float = Field(1.0, ge=0.0, le=1.0)
    finetune: bool = False
    finetune_steps: int = Field(100, ge=1, le=100_000)
    finetune_batch_size: BatchSize = Field(4, ge=1)
    finetune_lr: float = Field(2e-5, gt=0.0, le=1.0)
    finetune_weight_decay: float = Field(1e-2, ge=0.0, le=1.0)
    finetune_prompt: str = "a photo of holder"
    #: the text context S* is fine-tuned in: ``none`` = BOS + prompt + EOS (the authors' code), ``max_length`` =
    #: padded to the tokenizer's length, the context sampling uses and the base model was trained with
    context_padding: Literal["none", "max_length"] = "none"
    #: Mixed-precision mode of per-image fine-tuning, separate from the roles' storage dtype. The trained
    #: parameters (PromptNet, UNet attn1/attn2 to_q/to_k/to_v) are always held and updated in float32; this
    #: picks the autocast dtype of the frozen parts' compute: ``fp16`` (with a gradient scaler, as the
    #: authors' ``Accelerator(mixed_precision="fp16")``), ``bf16``, ``fp32`` (no autocast: frozen weights are
    #: up-cast for the fine-tuning and cast back exactly), ``auto`` = the t2i UNet's storage dtype.
    finetune_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="autocast dtype of fine-tuning; trained parameters are always float32")
    num_augmentations: int = Field(31, ge=0, le=1024)
    augmentation: Literal["generic", "none"] = "generic"
    batch_size: BatchSize = Field(4, ge=1, description="(source, instruction) pairs per actor call")
    num_actors: ActorCount = Field(1, ge=1)
    #: the pool autoscales between ``num_actors`` and ``max_actors`` (null: a fixed pool of ``num_actors``)
    max_actors: ActorCount | None = None
    num_gpus_per_actor: GpusPerActor = Field(0.0, ge=0.0)
    num_cpus_per_actor: CpusPerActor = Field(1.0, ge=0.0)


class ScoringConfig(_Strict):
    """CLIP-T, DINO and CLIP-I scorer actor pools (SPEC §1.4, §3)."""

    batch_size: BatchSize = 16
    num_actors: ActorCount = 1
    #: the pool autoscales between ``num_actors`` and ``max_actors`` (null: a fixed pool of ``num_actors``)
    max_actors: ActorCount | None = None
    num_gpus_per_actor: GpusPerActor = 0.0
    num_cpus_per_actor: CpusPerActor = 0.25
    #: the synthetic world's oracle directory (``cafe world make``): when set, every scored row also gets the
    #: oracle's verdicts (identity kept, instruction followed) in ``candidates/`` — an evaluation signal that
    #: the rules never read. Null for real data.
    oracle: str | None = Field(None, min_length=1)


class RulesConfig(_Strict):
    """Keep/drop decisions on stored scores (SPEC §1.4). ``quantile`` keeps rows at or above the quantile."""

    mode: Literal["absolute", "quantile"] = "absolute"
    clip_t_min: float = Field(0.3, ge=-1.0, le=1.0)
    dino_min: float = Field(0.6, ge=-1.0, le=1.0)
    clip_t_quantile: float = Field(0.5, ge=0.0, le=1.0)
    dino_quantile: float = Field(0.5, ge=0.0, le=1.0)


class OpenAIBackendConfig(_Strict):
    """Any OpenAI-compatible chat-completions endpoint (vLLM, TGI, ...), through the ``openai`` SDK.

    The key is read from the environment variable named by ``api_key_env`` when the stage starts (an
    unset or empty variable is an error then); null sends no key (a local server without auth).
    ``json_schema`` sends the dialogue's JSON schema as ``response_format`` (guided decoding) instead of
    ``{"type": "json_object"}``.
    """

    base_url: str = Field("http://127.0.0.1:8000/v1", pattern=r"^https?://")
    model: str = "llama-2-70b-chat"
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0)
    max_concurrency: int = Field(8, ge=1, le=256)
    max_retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(1.0, ge=0.0, le=600.0)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=8, le=32_768)
    json_schema: bool = False


class TransformersBackendConfig(_Strict):
    max_new_tokens: int = Field(128, ge=1, le=32_768)
    batch_size: BatchSize = Field(8, ge=1)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    num_actors: ActorCount = Field(1, ge=1)
    #: the pool autoscales between ``num_actors`` and ``max_actors`` (null: a fixed pool of ``num_actors``)
    max_actors: ActorCount | None = None
    num_gpus_per_actor: GpusPerActor = Field(0.0, ge=0.0)


class DialogueConfig(_Strict):
    """Dialogue synthesis (D4): one JSON object {"user", "assistant"} per row, strictly parsed."""

    backend: Literal["template", "transformers", "openai"] = "template"
    styles: list[Literal["clear", "ambiguous", "question"]] = Field(
        default_factory=lambda: ["clear", "ambiguous", "question"], min_length=1
    )
    max_chars: int = Field(600, ge=16, le=100_000)
    #: template/openai backends: the pool of actors issuing requests (each keeps ``openai.max_concurrency`` in flight)
    num_actors: ActorCount = 1
    #: the pool autoscales between ``num_actors`` and ``max_actors`` (null: a fixed pool of ``num_actors``)
    max_actors: ActorCount | None = None
    num_cpus_per_actor: CpusPerActor = Field(0.125, ge=0.0)
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    transformers: TransformersBackendConfig = TransformersBackendConfig()


class DistillConfig(_Strict):
    """Rounds r ≥ 1 (self-distillation, CAFE Eq. 4; SPEC D3): the round r−1 assistant makes the targets.

    ``mllm``/``diffusion`` name the trained model directories (``cafe pipeline run`` fills them with the round
    r−1 exports); their weight fingerprints are the rows' ``checkpoint`` and part of the generation key.
    """

    mode: Literal["eq4", "mix"] = "eq4"
    scale_dino: float = Field(0.5, ge=0.0, le=10.0, description="λ of Eq. 4: the DINO (identity) stream's scale")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="mode mix: weight of E_clip(x_ref) against H(MLLM)")
    mllm: str | None = Field(None, min_length=1)
    diffusion: str | None = Field(None, min_length=1)
    num_inference_steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(2.5, ge=0.0)
    reference_guidance_scale: float = Field(2.5, ge=0.0, description="the base t2i's guidance for x_ref")
    request: str = Field("Can you generate an image for this {class} {phrase}?",
                         description="mode mix: the user text the MLLM reads")


class BuildConfig(_Strict):
    """``cafe build``: sources → instructions → ProFusion → scores → rules → dialogue → Arrow (round 0)."""

    round: int = Field(0, ge=0, le=1000)
    sources: SourcesConfig = SourcesConfig()
    instructions: InstructionsConfig = InstructionsConfig()
    profusion: ProFusionConfig = ProFusionConfig()
    distill: DistillConfig = DistillConfig()
    scoring: ScoringConfig = ScoringConfig()
    rules: RulesConfig = RulesConfig()
    dialogue: DialogueConfig = DialogueConfig()
    rows_per_chunk: int = Field(8, ge=1, le=MAX_BATCH_SIZE,
                                description="rows committed per ledger chunk (resume granularity)")
    report_samples: int = Field(8, ge=0, le=1024)
    #: a chunk whose generation killed its worker this many times in one run, on nodes that stayed up, is
    #: quarantined (``worker_crashed``); attempts cut short by a driver, job or node death do not count, and
    #: Ray's actor restarts and task retries are unbounded (infrastructure faults are retried, never charged)
    max_chunk_attempts: int = Field(3, ge=1, le=100)
    #: one driver per output: a lease whose heartbeat is older than this belongs to a dead driver
    lease_ttl_s: float = Field(60.0, ge=1.0, le=86_400.0)
    #: how long a second driver waits for a live owner before refusing (0: refuse at once; null: lease_ttl_s, so a
    #: scheduler's retry outlasts a dead driver elsewhere whose lease has not expired yet)
    lease_wait_s: float | None = Field(None, ge=0.0, le=86_400.0)

    @property
    def lease_wait(self) -> float:
        return self.lease_ttl_s if self.lease_wait_s is None else self.lease_wait_s
    #: recorded in the dataset card and manifest (e.g. "cc-by-nc-4.0"); "other" when unknown
    license: str = Field("other", min_length=1, max_length=64)
    #: where the license text is (recorded as the card's ``license_link``; the Hub expects one with ``other``)
    license_link: str | None = Field(None, pattern=r"^https://\S+$", max_length=500)
    #: custom Ray resources per stage (sources, generate, score, dialogue, sink), e.g. to pin generation to
    #: GPU nodes: ``{generate: {gen_node: 0.01}}``
    resources: dict[Literal["sources", "generate", "score", "dialogue", "sink"], dict[str, float]] = Field(
        default_factory=dict)
    sink_num_cpus: float = Field(0.25, ge=0.0, le=MAX_CPUS_PER_ACTOR)

    @model_validator(mode="after")
    def _distill_models(self):
        if self.round >= 1 and (self.distill.diffusion is None or
                                (self.distill.mode == "mix" and self.distill.mllm is None)):
            raise ValueError(f"build.round = {self.round} generates with the round {self.round - 1} models: set "
                             "build.distill.diffusion (and build.distill.mllm for mode mix), or run "
                             "`cafe pipeline run`, which sets them")
        return self
