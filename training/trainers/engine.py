"""The DeepSpeed training loop shared by every recipe (no Ray here: :mod:`pipeline.train` calls it per worker).

Usage (per worker, after ``torch.distributed`` is initialised)::

    recipe = MLLMRecipe(section, roles, seed=0); recipe.setup(device)
    ds_config = deepspeed_config(base_json, section, world_size, device)
    result = run_training(recipe, ds_config, batches, plan, resume_dir, on_checkpoint, on_metrics)

* ``batches(epoch)`` yields this worker's micro-batches of epoch ``epoch`` (dicts of numpy columns), in the
  same order every time it is called (Ray Data with ``preserve_order`` in :mod:`pipeline.train`);
* a recipe turns a micro-batch into model inputs (:meth:`Recipe.prepare`); the engine's module returns a dict
  of loss terms whose ``"loss"`` is optimised;
* checkpoints (every ``plan.every`` optimizer steps and at the end) hold ``deepspeed/`` (optimizer, scheduler
  and *trainable* module state: ``exclude_frozen_parameters``), ``weights/`` (the recipe's loadable export,
  rank 0) and ``state.json`` (step, epoch, micro-batches done in that epoch); resuming skips those batches;
* the random draws of a row (noise, timestep, drops) come from :func:`training.encoders.row_generator`, so a
  resumed or re-sharded run sees exactly the draws an uninterrupted single-worker run would.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
DS_DIR = "deepspeed"
WEIGHTS_DIR = "weights"
DS_TAG = "state"


@dataclass
class Plan:
    """How long to train and when to checkpoint (optimizer steps)."""

    max_steps: int
    epochs: int
    accumulation: int = 1
    every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    stop_at: int | None = None  # stop (with a checkpoint) after this step: a preemption drill
    log_every: int = 1
    seed: int = 0


@dataclass
class TrainResult:
    step: int
    losses: list[dict[str, float]] = field(default_factory=list)  # per optimizer step, averaged over ranks
    finished: bool = False


def _fill_auto(node: Any, values: dict[str, Any], path: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise ValueError(f"DeepSpeed config: no value for 'auto' at {path}")
        return values[path]
    return node


def deepspeed_config(base: dict, *, micro_batch: int, accumulation: int, world_size: int, lr: float,
                     weight_decay: float, warmup_steps: int, grad_clip: float, bf16: bool) -> dict:
    """``base`` (a ``configs/deepspeed/*.json``) with every ``"auto"`` filled from the train section."""
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "optimizer.params.lr": lr,
        "optimizer.params.weight_decay": weight_decay,
        "scheduler.params.warmup_max_lr": lr,
        "scheduler.params.warmup_num_steps": warmup_steps,
        "gradient_clipping": grad_clip,
        "bf16.enabled": bf16,
    }
    config = _fill_auto(base, values)
    if warmup_steps <= 0 and config.get("scheduler", {}).get("type") == "WarmupLR":
        # DeepSpeed's WarmupLR starts at lr 0 even with 0 warm-up steps: no warm-up means no scheduler
        config = {k: v for k, v in config.items() if k != "scheduler"}
    return config


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def initialize(recipe, ds_config: dict):
    """``deepspeed.initialize`` over the recipe's module with only its trainable parameters."""
    import deepspeed

    params = [p for p in recipe.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"recipe {recipe.name}: no trainable parameters")
    engine, _, _, scheduler = deepspeed.initialize(model=recipe.module, model_parameters=params, config=ds_config)
    return engine, scheduler


def _gathered(engine, params):
    """Under ZeRO-3, the full trainable tensors for the export; otherwise they are whole already."""
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def frozen_share(module: torch.nn.Module) -> dict[str, int]:
    """How many of the module's frozen parameter elements this rank holds (``local``) of how many (``total``):
    under ZeRO-3 a partitioned parameter holds its ``ds_tensor`` slice (``ds_numel`` in all), otherwise all."""
    local = total = 0
    for p in module.parameters():
        if p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            local += int(p.ds_tensor.numel())
            total += int(p.ds_numel)
        else:
            local += p.numel()
            total += p.numel()
    return {"local": local, "total": total}


def save_checkpoint(engine, recipe, out: Path, state: dict) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 also the recipe's weights export and ``state.json``."""
    import torch.distributed as dist

    engine.save_checkpoint(str(out / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with _gathered(engine, trainable):
        if not dist.is_initialized() or dist.get_rank() == 0:
            recipe.save_weights(engine.module, out / WEIGHTS_DIR)
            (out / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_checkpoint(engine, ckpt_dir: Path) -> dict:
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    path, _ = engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {ckpt_dir / DS_DIR}")
    return state


def run_training(recipe, ds_config: dict, batches: Callable[[int], Iterable[dict]], plan: Plan,
                 resume_dir: Path | None = None,
                 on_checkpoint: Callable[[Path, dict], None] | None = None,
                 on_metrics: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``recipe`` under DeepSpeed; see the module docstring."""
    engine, scheduler = initialize(recipe, ds_config)
    step, epoch, done_in_epoch = 0, 0, 0
    if resume_dir is not None:
        state = load_checkpoint(engine, resume_dir)
        step, epoch, done_in_epoch = state["step"], state["epoch"], state["micro_batches_in_epoch"]
        log.info("resumed %s at step %d (epoch %d, %d micro-batches in)", recipe.name, step, epoch, done_in_epoch)
    result = TrainResult(step=step)
    stop = plan.max_steps if plan.stop_at is None else min(plan.max_steps, plan.stop_at)

    last_ckpt = [step]

    def checkpoint(state):
        last_ckpt[0] = state["step"]
        with tempfile.TemporaryDirectory(prefix="cafe-ckpt-") as tmp:
            save_checkpoint(engine, recipe, Path(tmp), state)
            if on_checkpoint is not None:
                on_checkpoint(Path(tmp), state)

    engine.train()
    recipe.module_train_mode(engine.module)
    acc_terms: dict[str, float] = {}
    micro_in_step, rows_in_step, t0 = 0, 0, time.perf_counter()
    while step < stop and epoch < plan.epochs:
        micro = 0
        for batch in batches(epoch):
            micro += 1
            if micro <= done_in_epoch:
                continue  # consumed before the checkpoint we resumed from
            inputs = recipe.prepare(batch, epoch, plan.seed)
            terms = engine(**inputs)
            engine.backward(terms["loss"])
            engine.step()
            for k, v in terms.items():
                acc_terms[k] = acc_terms.get(k, 0.0) + float(v.detach()) / plan.accumulation
            micro_in_step += 1
            rows_in_step += recipe.batch_rows(batch)
            if micro_in_step < plan.accumulation:
                continue
            step += 1
            acc_terms = mean_over_ranks(acc_terms, engine.device)
            seconds = time.perf_counter() - t0
            metrics = {**acc_terms, "step": step, "epoch": epoch, "lr": float(engine.get_lr()[0]),
                       "samples_per_s": rows_in_step / max(seconds, 1e-9)}
            if torch.cuda.is_available():
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            result.losses.append(metrics)
            if on_metrics is not None and (step % plan.log_every == 0 or step == stop):
                on_metrics(metrics)
            acc_terms, micro_in_step, rows_in_step, t0 = {}, 0, 0, time.perf_counter()
            if step >= stop or (plan.every and step % plan.every == 0):
                checkpoint({"step": step, "epoch": epoch, "micro_batches_in_epoch": micro, "model": recipe.name})
            if step >= stop:
                break
        else:
            epoch, done_in_epoch = epoch + 1, 0
            continue
        break
    result.step = step
    result.finished = step >= plan.max_steps or epoch >= plan.epochs
    if step != last_ckpt[0]:  # the data ran out before `stop`: checkpoint the end state too
        checkpoint({"step": step, "epoch": epoch, "micro_batches_in_epoch": 0, "model": recipe.name})
    return result


def mean_over_ranks(terms: dict[str, float], device: torch.device | str) -> dict[str, float]:
    """Loss terms averaged over the data-parallel ranks (each rank saw its own rows): the global batch's loss.

    The reduction runs on ``device``, the engine's: an NCCL process group (Ray Train's ``backend="nccl"``)
    accepts only CUDA tensors, gloo only CPU ones."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return terms
    keys = sorted(terms)
    t = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.cpu())}


def steps_for(rows_per_worker: int, micro_batch: int, accumulation: int, epochs: int,
              max_steps: int | None) -> int:
    """Optimizer steps: ``epochs`` passes over ``rows_per_worker`` in micro-batches of ``micro_batch`` (the last one
    completed by :func:`full_batches`), ``accumulation`` micro-batches per step, capped by max_steps."""
    per_epoch = -(-rows_per_worker // micro_batch) if rows_per_worker > 0 else 0
    total = (per_epoch * epochs) // accumulation
    if max_steps is not None:
        total = min(total, max_steps) if total else max_steps
    return max(0, total)


def _rows(batch: dict) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _concat(parts: list[dict]) -> dict:
    import numpy as np

    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def full_batches(batches: Iterable[dict], micro: int) -> Iterator[dict]:
    """Micro-batches of exactly ``micro`` rows from one epoch's ``batches`` (dicts of numpy columns, any sizes).

    Rows keep their order; the last, partial micro-batch is completed with the epoch's first rows (cycled when
    the epoch holds fewer than ``micro`` rows), as torch's ``DistributedSampler`` pads: every row is trained on
    in every epoch and no row is dropped, and every rank yields the same number of micro-batches for the same
    number of rows (a rank that yielded one fewer would leave the others waiting in a collective)."""
    import numpy as np

    head: list[dict] = []  # the epoch's first rows (up to `micro`), for the wrap
    held, pending = 0, []
    for batch in batches:
        n = _rows(batch)
        if n == 0:
            continue
        if held < micro:
            head.append(_take(batch, slice(0, micro - held)))
            held += min(n, micro - held)
        pending.append(batch)
        have = sum(_rows(b) for b in pending)
        if have >= micro:
            joined = _concat(pending)
            cut = (have // micro) * micro
            for start in range(0, cut, micro):
                yield _take(joined, slice(start, start + micro))
            pending = [_take(joined, slice(cut, have))] if have > cut else []
    rest = sum(_rows(b) for b in pending)
    if rest:
        first = _concat(head)
        fill = np.resize(np.arange(_rows(first)), micro - rest)  # cycles when the epoch is shorter than `micro`
        yield _concat([_concat(pending), _take(first, fill)])


def permuted(rows: dict, seed: int, epoch: int, shuffle: bool) -> Iterator[dict]:
    """One epoch over rows held in memory: a permutation drawn from (seed, epoch), or their order when not
    shuffling; as one batch for :func:`full_batches`."""
    import numpy as np

    n = _rows(rows)
    if not shuffle:
        yield rows
        return
    order = np.random.default_rng([seed, epoch]).permutation(n)
    yield _take(rows, order)
