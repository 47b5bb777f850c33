"""Ray Train launch of CAFE's trainers (``cafe train mllm|diffusion|promptnet``) and the embedding cache stage.

Usage::

    summary = train_model(cfg, "diffusion")        # runs to the end, or resumes the run of the same name
    cache_embeddings(cfg)                          # `cafe cache`: encoder outputs once, beside each dataset

How a run goes:

* Data: the kept rows of every build output in ``train.data.datasets`` (``<out>/dataset/data``), read with one
  ``ray.data.read_parquet`` over all their shards (a union without copying), or each output's embedding cache
  (``<out>/cache/<fingerprint>/data``) when ``cafe cache`` wrote it. Ray Train splits the dataset into one
  equal shard per worker, in a fixed order (``preserve_order``), so a resumed run sees the batches it expects.
* Workers: a ``TorchTrainer`` with ``train.workers.num_workers`` workers (CPU, or one GPU each). Each worker
  builds the recipe (frozen models loaded through the model kit; under ZeRO-3 inside ``deepspeed.zero.Init``
  via transformers' ``HfDeepSpeedConfig``), calls ``deepspeed.initialize`` itself and runs
  :func:`training.trainers.engine.run_training`.
* Checkpoints: every ``train.checkpoint.every_steps`` steps, through ``ray.train.report`` into
  ``<train.storage_path>/<run name>/`` (keeping the last ``keep``); the run name is ``<run.name>-<model>``.
  Re-running the same command resumes from the latest checkpoint (Ray Train restores it by run name +
  storage path; storage may be an ``s3://`` URI).
* At the end, the latest checkpoint's ``weights/`` are exported to ``<train.output_dir>/<model>``.
* Logs: TensorBoard scalars (each loss term, lr, samples/s, GPU memory) under ``train.log_dir/<run name>``
  from rank 0; the driver prints one progress line per ``train.log_every`` steps.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.models import check_fingerprints
from pipeline.store import Storage, is_uri, local_copy
from pipeline.train_config import MODELS
from training.data import schema

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
CACHE_META = "cache.json"
SUCCESS = "_SUCCESS"
#: the text columns a cache keeps beside the features (what the recipes read besides tensors)
CACHE_TEXT = (schema.ID, schema.USER_TEXT, schema.ASSISTANT_TEXT, schema.CLASS, schema.INSTRUCTION)


@dataclass
class TrainSummary:
    model: str
    run_name: str
    steps: int
    total_steps: int
    losses: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    output: str | None = None
    seconds: float = 0.0
    resumed_from: int | None = None
    #: rank → {"local", "total"} frozen parameter elements it holds (ZeRO-3: its partition)
    frozen_share: dict[int, dict] = field(default_factory=dict)
    #: rank → the checkpoint files it pulled to resume (empty when the run did not resume)
    pulled: dict[int, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# what a worker needs (plain data, shipped to Ray workers)
# ---------------------------------------------------------------------------------------------


def role_refs(cfg) -> dict:
    from training.trainers.base import RoleRef

    return {r: RoleRef(str(cfg.models.role_dir(r).absolute()), cfg.models.role_spec(r).dtype)
            for r in ("t2i", "clip_cond", "dino_cond", "llm", "promptnet")}


def recipe_class(model: str):
    if model == "mllm":
        from training.trainers.mllm import MLLMRecipe

        return MLLMRecipe
    if model == "diffusion":
        from training.trainers.diffusion import DiffusionRecipe

        return DiffusionRecipe
    if model == "promptnet":
        from training.trainers.promptnet import PromptNetRecipe

        return PromptNetRecipe
    raise ValueError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")


def run_name(cfg, model: str) -> str:
    return cfg.train.run_name or f"{cfg.run.name}-{model}"


def _abs(location: str) -> str:
    return location if is_uri(location) else str(Path(location).absolute())


def encoder_fingerprint(cfg) -> str:
    """The cache key: the encoders' weight fingerprints + the settings that change their outputs."""
    import hashlib

    from training.models.fingerprint import fingerprint

    key = {r: fingerprint(cfg.models.role_dir(r)) for r in ("t2i", "clip_cond", "dino_cond")}
    key["select_layer"] = cfg.train.mllm.select_layer
    key["version"] = 1
    if cfg.train.cache.dtype != "float32":  # (float32 caches keep the keys they had before dtypes existed)
        key["dtype"] = cfg.train.cache.dtype
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_location(dataset_out: str, fp: str) -> Storage:
    return Storage(_abs(dataset_out)).sub(f"{CACHE_DIR}/{fp}")


def data_paths(cfg, model: str) -> tuple[list[str], bool]:
    """Parquet directories to read and whether they are caches."""
    if model == "promptnet" and cfg.train.promptnet.images:
        return [_abs(cfg.train.promptnet.images)], False
    mode = cfg.train.data.cache
    paths, cached = [], []
    fp = encoder_fingerprint(cfg) if mode != "off" and model != "promptnet" else None
    for out in cfg.train.data.datasets:
        root = Storage(_abs(out))
        if not root.exists("dataset/data"):
            raise FileNotFoundError(f"train.data.datasets: {out} has no dataset/data (run `cafe build --out {out}`)")
        cache = cache_location(out, fp) if fp else None
        if cache is not None and cache.exists(SUCCESS):
            paths.append(cache.uri_of("data"))
            cached.append(True)
        elif mode == "require" and model != "promptnet":
            raise FileNotFoundError(f"train.data.cache = require, but {out} has no cache for encoders {fp} "
                                    f"(run `cafe cache CONFIG`)")
        else:
            paths.append(root.uri_of("dataset/data"))
            cached.append(False)
    if len(set(cached)) > 1:
        raise ValueError("some datasets have an embedding cache and some do not: run `cafe cache` for all, "
                         "or set train.data.cache=off")
    return paths, bool(cached and cached[0])


#: the columns each trainer reads: from the dataset (images, encoded on the fly) or from a cache (features)
READS = {
    "mllm": {"images": (schema.ID, schema.INPUT_IMAGE, schema.TARGET_IMAGE, schema.USER_TEXT, schema.ASSISTANT_TEXT),
             "cache": (schema.ID, schema.USER_TEXT, schema.ASSISTANT_TEXT, "vision_input", "clip_target")},
    "diffusion": {"images": (schema.ID, schema.INPUT_IMAGE, schema.TARGET_IMAGE),
                  "cache": (schema.ID, "latent_mean", "latent_std", "clip_target", "dino_input")},
    "promptnet": {"images": (schema.ID, schema.INPUT_IMAGE), "cache": (schema.ID, schema.INPUT_IMAGE)},
}


def _read(paths: list[str], model: str, cached: bool, images_folder: bool, shuffle_seed: int | None = None):
    """The training rows: only the columns ``model`` reads; with ``shuffle_seed``, files in a seeded order (the
    same in every epoch and after a resume: the row buffer, seeded per epoch, varies the rest)."""
    import ray.data
    from ray.data import FileShuffleConfig

    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
    if images_folder:
        return ray.data.read_images(paths, mode="RGB", include_paths=True, shuffle=shuffle)
    return ray.data.read_parquet(paths, columns=list(READS[model]["cache" if cached else "images"]), shuffle=shuffle)


def pad_to_workers(ds, rows: int, workers: int):
    """``ds`` with its first rows repeated at the end so that ``workers`` equal shards hold every row (Ray
    Train's equal split drops the remainder otherwise): at most ``workers − 1`` rows are seen twice an epoch.
    Fewer rows than workers: the rows repeat until every worker has one."""
    extra = -rows % workers
    parts = []
    while extra > 0:
        parts.append(ds.limit(min(extra, rows)))
        extra -= min(extra, rows)
    return ds.union(*parts) if parts else ds


# ---------------------------------------------------------------------------------------------
# the worker loop (runs inside each Ray Train worker)
# ---------------------------------------------------------------------------------------------


def _worker_loop(config: dict) -> None:
    import ray.train

    # the accelerator follows this run's devices, not the driver's environment (`make` exports DS_ACCELERATOR=cpu,
    # and a local cluster's workers inherit it)
    os.environ["DS_ACCELERATOR"] = "cuda" if config["use_gpu"] else "cpu"
    import deepspeed
    import torch

    from training.trainers import engine

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if config["use_gpu"] else "gloo")
    device = f"cuda:{ctx.get_local_rank()}" if config["use_gpu"] else "cpu"
    if config["use_gpu"]:
        torch.cuda.set_device(device)
    ds_config = config["ds_config"]
    zero3 = ds_config if engine.zero_stage(ds_config) == 3 else None
    check_fingerprints({r: ref.path for r, ref in config["roles"].items()}, config["fingerprints"],
                       f"train {config['model']} worker {rank}")
    section = config["section"]
    if getattr(section, "init_from", None):  # exported weights on object storage: this node's local copy
        section = section.model_copy(update={"init_from": local_copy(section.init_from)})
    recipe = recipe_class(config["model"])(section, config["roles"]).setup(
        device, encoders=not config["cached"], zero3_config=zero3)
    progress = config["progress"]
    if progress is not None:
        progress.placed.remote(rank, engine.frozen_share(recipe.module))
    shard = ray.train.get_dataset_shard("train")
    micro = config["micro_batch"]
    shuffle = config["shuffle_buffer"] > 0
    memory: list[dict] = []

    def batches(epoch: int):
        """Epoch ``epoch``'s micro-batches of this worker, the same every time it is called (a resumed run skips
        exactly the ones it had trained): full micro-batches, every row of the shard once or more."""
        if config["in_memory"]:
            if not memory:  # the shard in its stream order, once; each epoch a permutation of it
                memory.append(engine._concat(list(shard.iter_batches(batch_size=4096, batch_format="numpy"))))
            yield from engine.full_batches(engine.permuted(memory[0], config["seed"], epoch, shuffle), micro)
            return
        kwargs = {}
        if shuffle:
            kwargs = {"local_shuffle_buffer_size": config["shuffle_buffer"], "local_shuffle_seed": config["seed"] + epoch}
        yield from engine.full_batches(shard.iter_batches(batch_size=micro, batch_format="numpy", **kwargs), micro)

    writer = None
    if rank == 0 and config["log_dir"]:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["log_dir"])

    def on_metrics(metrics: dict) -> None:
        if rank != 0:
            return
        if writer is not None:
            for k, v in metrics.items():
                if k not in ("step", "epoch"):
                    writer.add_scalar(f"{config['model']}/{k}", v, metrics["step"])
            writer.flush()
        if progress is not None:
            progress.update.remote(metrics)

    def on_checkpoint(directory: Path, state: dict) -> None:
        ray.train.report({"step": state["step"], "epoch": state["epoch"]},
                         checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    tmp = None
    if checkpoint is not None:
        tmp = tempfile.mkdtemp(prefix="cafe-resume-")
        pulled = pull_checkpoint(checkpoint.filesystem, checkpoint.path, Path(tmp), rank)
        resume_dir = Path(tmp)
        if progress is not None:
            progress.pulled.remote(rank, pulled)
            if rank == 0:
                progress.resumed.remote(json.loads((resume_dir / engine.STATE_FILE).read_text())["step"])
    plan = engine.Plan(max_steps=config["total_steps"], epochs=config["epochs"], accumulation=config["accumulation"],
                       every=config["every"], stop_at=config["stop_at"], log_every=config["log_every"],
                       seed=config["seed"])
    try:
        engine.run_training(recipe, ds_config, batches, plan, resume_dir, on_checkpoint, on_metrics)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if writer is not None:
            writer.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def pull_checkpoint(fs, path: str, dest: Path, rank: int) -> list[str]:
    """Copy what rank ``rank`` needs to resume from a Ray Train checkpoint (``fs``/``path``: its
    ``pyarrow.fs`` filesystem and path) into ``dest``; return the relative paths pulled.

    DeepSpeed's ``load_checkpoint`` reads, per rank, the shared model-state file (``mp_rank_00_model_states.pt``,
    ZeRO-0/1/2) or its own (``zero_pp_rank_<r>_…_model_states.pt``, ZeRO-3) and its own optimizer partition
    (``…zero_pp_rank_<r>_…_optim_states.pt``; with ``elastic_checkpoint`` off, the default); ``state.json``
    says where to continue. The other ranks' partitions and the ``weights/`` export (the driver reads those)
    stay where they are: on 64 ranks each pulls 1/64 of the optimizer state instead of all of it."""
    import pyarrow.fs as pafs

    from training.trainers.engine import WEIGHTS_DIR

    root = path.rstrip("/")
    pulled = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) + 1:]
        if rel.startswith(f"{WEIGHTS_DIR}/"):
            continue
        m = _RANK_FILE.search(rel.rsplit("/", 1)[-1])
        if m is not None and int(m.group(1)) != rank:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)
        pulled.append(rel)
    return sorted(pulled)


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.metrics: list[dict] = []
            self.resumed_at = None
            self.ranks: dict[str, dict] = {"placed": {}, "pulled": {}}

        def update(self, metrics: dict) -> None:
            self.metrics.append(metrics)

        def resumed(self, step: int) -> None:
            self.resumed_at = step

        def placed(self, rank: int, share: dict) -> None:
            self.ranks["placed"][rank] = share

        def pulled(self, rank: int, files: list[str]) -> None:
            self.ranks["pulled"][rank] = files

        def since(self, n: int) -> tuple[list[dict], int | None]:
            return self.metrics[n:], self.resumed_at

        def per_rank(self) -> dict:
            return self.ranks

    return Progress.remote()


def _format(model: str, m: dict, total: int) -> str:
    terms = " ".join(f"{k} {m[k]:.4f}" for k in m if k not in ("step", "epoch", "lr", "samples_per_s", "gpu_mem_gb"))
    extra = f" gpu {m['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in m else ""
    return f"[{model}] step {m['step']}/{total} {terms} lr {m['lr']:.2e} {m['samples_per_s']:.1f} rows/s{extra}"


def _eta(step: int, total: int, start: int, seconds: float) -> str:
    """`` · ETA 3m 10s`` from the steps done since ``start`` in ``seconds`` (start-up included: an upper bound)."""
    done = step - start
    if done <= 0 or step >= total:
        return ""
    left = (total - step) * seconds / done
    m, s = divmod(int(left), 60)
    h, m = divmod(m, 60)
    return f" · ETA {h}h {m:02d}m" if h else f" · ETA {m}m {s:02d}s"


def train_model(cfg, model: str, address: str | None = None, echo=print) -> TrainSummary:
    """Run (or resume) ``cafe train MODEL``; return what happened. ``echo``: where progress lines go."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    import pyarrow.fs
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.local_ray import ray_session
    from training.trainers import engine

    section = getattr(cfg.train, model)
    workers = cfg.train.workers
    name = run_name(cfg, model)
    paths, cached = data_paths(cfg, model)
    images_folder = model == "promptnet" and cfg.train.promptnet.images is not None
    ds_path = Path(cfg.train.deepspeed.config)
    base = json.loads(ds_path.read_text())
    precision = cfg.train.deepspeed.precision
    bf16 = precision == "bf16" or (precision == "auto" and workers.use_gpu)
    ds_config = engine.deepspeed_config(
        base, micro_batch=section.micro_batch_size, accumulation=section.gradient_accumulation,
        world_size=workers.num_workers, lr=section.lr, weight_decay=section.weight_decay,
        warmup_steps=section.warmup_steps, grad_clip=section.grad_clip, bf16=bf16)
    storage = _abs(cfg.train.storage_path)
    t0 = time.perf_counter()
    with ray_session(cfg, address):
        free = ray.cluster_resources().get("CPU", 0) - workers.num_workers * workers.cpus_per_worker
        if free < 0.5 and not (address or cfg.ray.address):
            raise ValueError(
                f"train.workers: {workers.num_workers} worker(s) × {workers.cpus_per_worker} CPU leave {free:g} of the "
                f"local cluster's CPUs for Ray Data's read tasks, and the run would hang: lower "
                f"train.workers.cpus_per_worker or raise ray.num_cpus")
        data = cfg.train.data
        ds = _read(paths, model, cached, images_folder, cfg.run.seed if data.shuffle_files else None)
        rows = ds.count()
        if rows == 0:
            raise ValueError(f"no training rows in {paths}")
        ds = pad_to_workers(ds, rows, workers.num_workers)
        per_worker = -(-rows // workers.num_workers)
        total = engine.steps_for(per_worker, section.micro_batch_size, section.gradient_accumulation,
                                 section.epochs, section.max_steps)
        epochs_needed = section.epochs if section.max_steps is None else 10**9
        progress = _progress_actor()
        from training.models.fingerprint import fingerprint

        refs = role_refs(cfg)
        loop_config = {
            "model": model, "section": section, "roles": refs, "cached": cached,
            "fingerprints": {r: fingerprint(ref.path) for r, ref in refs.items() if Path(ref.path).is_dir()},
            "use_gpu": workers.use_gpu, "ds_config": ds_config, "micro_batch": section.micro_batch_size,
            "accumulation": section.gradient_accumulation, "epochs": epochs_needed, "total_steps": total,
            "every": cfg.train.checkpoint.every_steps, "stop_at": cfg.train.stop_at_step,
            "log_every": cfg.train.log_every, "seed": cfg.run.seed, "shuffle_buffer": cfg.train.data.shuffle_buffer,
            "in_memory": cfg.train.data.in_memory,
            "log_dir": f"{_abs(cfg.train.log_dir).rstrip('/')}/{name}" if cfg.train.log_dir else None,
            "progress": progress,
        }
        resources = {"CPU": workers.cpus_per_worker}
        if workers.use_gpu:
            resources["GPU"] = workers.gpus_per_worker
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                                   resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoint.keep)),
            datasets={"train": ds},
            dataset_config=ray.train.DataConfig(
                execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False),
        )
        echo(f"[{model}] run {name}: {rows} rows ({'cache' if cached else 'images'}), {workers.num_workers} "
             f"worker(s), {total} steps, ZeRO-{engine.zero_stage(ds_config)}, {'bf16' if bf16 else 'fp32'}, "
             f"shuffle: {'files + ' if data.shuffle_files else ''}{data.shuffle_buffer}-row buffer")
        box: dict = {}
        t_fit = time.perf_counter()
        thread = threading.Thread(target=lambda: box.update(result=_fit(trainer, box)), daemon=True)
        thread.start()
        seen, losses, resumed = 0, [], None
        # the console gets about 20 lines a run (and one a minute at most apart); TensorBoard gets every log_every
        every = max(cfg.train.log_every, -(-total // 20))
        last_line = time.perf_counter()
        while thread.is_alive():
            thread.join(timeout=1.0)
            new, resumed_at = ray.get(progress.since.remote(seen))
            if resumed_at is not None and resumed is None:
                resumed = resumed_at
                echo(f"[{model}] resumed from the checkpoint at step {resumed_at}")
            for m in new:
                now = time.perf_counter()
                if m["step"] % every == 0 or m["step"] in (1, total) or now - last_line >= 60:
                    echo(_format(model, m, total) + _eta(m["step"], total, resumed or 0, now - t_fit))
                    last_line = now
            seen += len(new)
            losses += new
        if "error" in box:
            raise box["error"]
        result = box["result"]
        summary = TrainSummary(model, name, losses[-1]["step"] if losses else (resumed or 0), total, losses,
                               seconds=time.perf_counter() - t0, resumed_from=resumed)
        ranks = ray.get(progress.per_rank.remote())
        summary.frozen_share, summary.pulled = ranks["placed"], ranks["pulled"]
        if result.checkpoint is not None:
            ckpt = result.checkpoint
            summary.checkpoint = ckpt.path
            with tempfile.TemporaryDirectory(prefix="cafe-export-") as d:
                # state.json and weights/ only: not the ranks' optimizer partitions
                fs, root = ckpt.filesystem, ckpt.path.rstrip("/")
                with fs.open_input_stream(f"{root}/{engine.STATE_FILE}") as f:
                    summary.steps = json.loads(f.read())["step"]
                pyarrow.fs.copy_files(f"{root}/{engine.WEIGHTS_DIR}", d, source_filesystem=fs)
                out = Storage(_abs(cfg.train.output_dir)).sub(model)
                _export(Path(d), out)
                summary.output = out.uri
        ray.kill(progress)
        share = summary.frozen_share.get(0)
        if share and share["local"] < share["total"]:
            echo(f"[{model}] ZeRO-3: each rank held {share['local'] / share['total']:.1%} of the "
                 f"{share['total'] / 1e6:.2f} M frozen parameters (rank 0: {share['local'] / 1e6:.2f} M)")
        echo(f"[{model}] step {summary.steps}/{total} in {summary.seconds:.0f} s; weights: {summary.output}")
    return summary


def _fit(trainer, box: dict):
    try:
        return trainer.fit()
    except BaseException as exc:  # surfaced on the driver thread
        box["error"] = exc
        return None


def _export(src: Path, out: Storage) -> None:
    """Copy a checkpoint's ``weights/`` to ``out`` (local: into a temporary sibling, then renamed)."""
    if out.is_local:
        dest = Path(out.root)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return
    for f in sorted(src.rglob("*")):
        if f.is_file():
            out.write_bytes(str(f.relative_to(src)), f.read_bytes())


# ---------------------------------------------------------------------------------------------
# the embedding cache (`cafe cache`)
# ---------------------------------------------------------------------------------------------


class _CacheEncoder:
    """Ray Data actor: every feature of :data:`training.encoders.FEATURES` for a batch of dataset rows."""

    def __init__(self, roles: dict, select_layer: int, device: str, dtype: str = "float32"):
        from training.encoders import FEATURES
        from training.trainers.base import load_encoders

        self.want = FEATURES
        self.dtype = dtype
        self.encoders = load_encoders(roles, device, FEATURES, select_layer=select_layer)

    def __call__(self, batch: dict) -> dict:
        from training.trainers.base import batch_features, store_features

        feats = batch_features(batch, self.encoders, self.want)
        out = {c: batch[c] for c in CACHE_TEXT if c in batch}
        out.update({k: store_features(v, self.dtype) for k, v in feats.items()})
        return out


def cache_embeddings(cfg, address: str | None = None, force: bool = False):
    """Write ``<out>/cache/<fingerprint>/`` for every dataset in ``train.data.datasets``; yield progress lines.

    One Ray Data pass per dataset: read the kept rows, encode them on an actor pool, write Parquet, then
    ``cache.json`` and ``_SUCCESS`` last. A cache whose ``_SUCCESS`` exists is up to date (the fingerprint
    covers the encoders' weights and settings) and is skipped; a partial one is rewritten.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipeline.local_ray import ray_session

    fp = encoder_fingerprint(cfg)
    c = cfg.train.cache
    device = "cuda" if c.num_gpus_per_actor > 0 else "cpu"
    with ray_session(cfg, address):
        for out in cfg.train.data.datasets:
            root = Storage(_abs(out))
            if not root.exists("dataset/data"):
                raise FileNotFoundError(f"train.data.datasets: {out} has no dataset/data")
            cache = cache_location(out, fp)
            if cache.exists(SUCCESS) and not force:
                yield f"{out}: cache {fp} is up to date"
                continue
            t0 = time.perf_counter()
            if cache.exists("data"):
                cache.delete_dir("data")
            ds = ray.data.read_parquet(root.uri_of("dataset/data"),
                                       columns=[*CACHE_TEXT, schema.INPUT_IMAGE, schema.TARGET_IMAGE])
            encoded = ds.map_batches(_CacheEncoder, fn_constructor_args=(role_refs(cfg), cfg.train.mllm.select_layer,
                                                                           device, c.dtype),
                                     batch_size=c.batch_size, batch_format="numpy",
                                     compute=ActorPoolStrategy(size=c.num_actors), num_gpus=c.num_gpus_per_actor,
                                     num_cpus=c.num_cpus_per_actor)
            encoded.write_parquet(cache.uri_of("data"))
            rows = ray.data.read_parquet(cache.uri_of("data")).count()
            cache.write_json(CACHE_META, {"fingerprint": fp, "rows": rows, "dataset": root.uri,
                                          "select_layer": cfg.train.mllm.select_layer, "dtype": c.dtype,
                                          "seconds": round(time.perf_counter() - t0, 2)})
            cache.write_bytes(SUCCESS, b"")
            yield f"{out}: cached {rows} rows as {cache.uri} in {time.perf_counter() - t0:.1f} s"
