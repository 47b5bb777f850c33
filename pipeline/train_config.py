"""The ``train`` section of the config tree: CAFE's training jobs (SPEC §2, §4.5, D1–D2) and inference.

``cafe train mllm|diffusion|promptnet CONFIG`` reads ``train.<model>`` (optimiser, batch, length) plus the
shared keys (workers, DeepSpeed, data, checkpoints, logs). Defaults are the paper's where it gives them.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.build_config import MAX_BATCH_SIZE, _Strict

MAX_WORKERS = 4096
MODELS = ("mllm", "diffusion", "promptnet")


class OptimConfig(_Strict):
    """AdamW over the trainable parameters (DeepSpeed's optimizer; fp32 master weights)."""

    lr: float = Field(2e-5, gt=0, le=1.0)
    weight_decay: float = Field(1e-2, ge=0, le=1.0)
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="0 disables clipping")
    micro_batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE, description="rows per worker per forward")
    gradient_accumulation: int = Field(1, ge=1, le=4096)
    epochs: int = Field(1, ge=1, le=100_000)
    max_steps: int | None = Field(None, ge=1, le=100_000_000, description="optimizer steps; null: the epochs decide")


class MLLMTrainConfig(OptimConfig):
    """SPEC §2: AdamW lr 2e-3, batch 128, 5 epochs on round 0 then 5 on the union with self-distilled data."""

    lr: float = Field(2e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    epochs: int = Field(5, ge=1, le=100_000)
    lam: float = Field(1.0, ge=0, le=1e6, description="λ of the embedding MSE term (D2)")
    select_layer: int = Field(-2, ge=-64, le=64, description="CLIP vision hidden layer whose patch tokens V reads")
    max_new_tokens: int = Field(128, ge=1, le=4096, description="inference: response length limit")
    #: start V and H from these exported weights (``cafe train mllm``'s output, a path or URI) instead of their
    #: seeded initialisation: ``cafe retrain`` continues from the promoted model this way
    init_from: str | None = Field(None, min_length=1)
    #: recompute the frozen LLM's layer activations in the backward pass instead of keeping them (V is reached
    #: through every layer): activation memory falls to about one layer's, for about a third more compute
    gradient_checkpointing: bool = False


class DiffusionTrainConfig(OptimConfig):
    """SPEC §2: AdamW lr 2e-5, batch 64; each condition dropped with p = 0.1 independently (D1)."""

    drop_clip: float = Field(0.1, ge=0, le=1)
    drop_dino: float = Field(0.1, ge=0, le=1)
    n_clip_tokens: int = Field(1, ge=1, le=256)
    #: start the UNet and conditioner from these exported weights (``cafe train diffusion``'s output, a path or URI)
    #: instead of the t2i and a seeded conditioner: ``cafe retrain`` continues from the promoted model this way
    init_from: str | None = Field(None, min_length=1)
    #: recompute the UNet blocks' activations in the backward pass (diffusers' gradient checkpointing)
    gradient_checkpointing: bool = False


class PromptNetTrainConfig(OptimConfig):
    """SPEC §4.5: AdamW lr 2e-5, wd 1e-2, batch 8, 80k steps, grad-clip 1.0, prompt "A photo of holder".

    ``images``: an image folder or URI (``ray.data.read_images``); unset, the input images of ``train.data``.
    """

    prompt: str = "A photo of holder"
    #: the text context S* is trained in (as ``build.profusion.context_padding``): ``none`` (the authors') or
    #: ``max_length`` (the padded context sampling uses)
    context_padding: Literal["none", "max_length"] = "none"
    images: str | None = None
    max_steps: int | None = Field(80_000, ge=1, le=100_000_000)
    epochs: int = Field(100_000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _holder(self) -> "PromptNetTrainConfig":
        if "holder" not in self.prompt.split():
            raise ValueError("train.promptnet.prompt must contain the word 'holder' (S*'s slot)")
        return self


class WorkersConfig(_Strict):
    """Ray Train workers: one DeepSpeed rank each."""

    num_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    use_gpu: bool = False
    #: leave CPUs for Ray Data's read tasks: on a 2-CPU local cluster, 2 workers need 0.5 each
    cpus_per_worker: float = Field(1.0, ge=0, le=256)
    gpus_per_worker: float = Field(1.0, ge=0, le=8, description="used when use_gpu")


class DeepSpeedConfig(_Strict):
    config: str = "configs/deepspeed/zero2.json"
    #: auto: bf16 on GPU (fp32 master copy of the trained weights), fp32 on CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class TrainDataConfig(_Strict):
    """Training rows: the kept rows of one or more built datasets (``cafe build --out``), unioned.

    Each entry is a build output (local path or URI); its ``dataset/data`` Parquet shards are read with Ray Data.
    ``cache``: ``auto`` uses ``<output>/cache/<encoder fingerprint>`` when ``cafe cache`` wrote it, ``off`` always
    encodes on the fly, ``require`` fails when a cache is missing.
    """

    datasets: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["outputs/tiny"],
                                                                  min_length=1, max_length=1024)
    cache: Literal["auto", "off", "require"] = "auto"
    #: read the Parquet files in a seeded random order (the build writes a source's rows next to each other)
    shuffle_files: bool = True
    #: rows in each worker's shuffle buffer, reseeded every epoch (0: rows in file order). Memory: this many rows
    #: per worker (images ≈ 0.5–1 MB a row at 512 px; cached features ≈ 1–4 MB)
    shuffle_buffer: int = Field(256, ge=0, le=10_000_000)
    #: each worker reads its shard once and keeps it in memory; every epoch is a permutation of it (seeded by
    #: run.seed and the epoch; its order when shuffle_buffer is 0). For a small fine-tuning set trained for many
    #: epochs: saves one Ray Data pass per epoch. Off for large datasets.
    in_memory: bool = False


class CheckpointConfig(_Strict):
    every_steps: int = Field(100, ge=0, le=100_000_000, description="0: only at the end")
    keep: int = Field(2, ge=1, le=10_000)


class CacheConfig(_Strict):
    """``cafe cache``: the frozen encoders' outputs written once per dataset. ``dtype``: how features are stored —
    ``float16``/``bfloat16`` halve the bytes (a 512-px row at paper scale: ≈ 4 MB in float32) where the consumer
    runs in that dtype anyway (bf16 training); ``bfloat16`` is stored as its 16-bit pattern (Parquet has no
    bfloat16 type) and read back as such. Training upcasts to float32 before the trained layers."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    num_actors: int = Field(1, ge=1, le=1024)
    num_gpus_per_actor: float = Field(0.0, ge=0, le=8)
    num_cpus_per_actor: float = Field(1.0, ge=0, le=256)


class GenerateConfig(_Strict):
    """``cafe generate``: the sampler and the guidance of the conditioned diffusion model, and where it runs.

    Guidance (D1): one scale on (both conditions) vs (neither) by default; with ``guidance_dino`` set, two scales
    — ``guidance_scale`` on the CLIP condition and ``guidance_dino`` on the DINO stream given it (three model
    evaluations a step instead of two; equal scales give the one-scale result). ``device``: ``auto`` = CUDA
    when the process sees a GPU (a batch actor with ``num_gpus_per_actor`` > 0 does), else the CPU; the
    models run in their role dtypes (``models.roles.<role>.dtype``: float16/bfloat16 on GPUs)."""

    num_inference_steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(3.0, ge=0, le=50)
    guidance_dino: float | None = Field(None, ge=0, le=50)
    scale_dino: float = Field(1.0, ge=0, le=10)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE)
    num_actors: int = Field(1, ge=1, le=1024)
    num_gpus_per_actor: float = Field(0.0, ge=0, le=8)


class TrainConfig(_Strict):
    """``storage_path``: where Ray Train keeps runs (local path or ``s3://``); a run's name is
    ``<run.name>-<model>`` unless ``run_name`` is set, and re-running the same command resumes it.
    ``output_dir``: where each model's final weights are exported (``<output_dir>/<model>``), read by
    ``cafe generate``. ``stop_at_step``: stop (with a checkpoint) after that step — a preemption drill."""

    data: TrainDataConfig = TrainDataConfig()
    workers: WorkersConfig = WorkersConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    storage_path: str = "outputs/train/runs"
    output_dir: str = "outputs/train"
    log_dir: str = "outputs/train/tensorboard"
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    #: TensorBoard scalars every this many steps; the console prints about 20 lines a run (at least this far apart)
    log_every: int = Field(1, ge=1, le=1_000_000)
    stop_at_step: int | None = Field(None, ge=1)
    mllm: MLLMTrainConfig = MLLMTrainConfig()
    diffusion: DiffusionTrainConfig = DiffusionTrainConfig()
    promptnet: PromptNetTrainConfig = PromptNetTrainConfig()
    cache: CacheConfig = CacheConfig()
    generate: GenerateConfig = GenerateConfig()
