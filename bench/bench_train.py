"""CAFE training (issue 9): a DeepSpeed ZeRO-2 step vs a plain PyTorch step, and a diffusion epoch with the
embedding cache vs without it.

Usage::

    python bench/bench_train.py             # 3 repetitions of each measurement
    python bench/bench_train.py --reps 5    # more repetitions (medians over them)
    python bench/bench_train.py --quick     # 1 repetition, few steps: checks that the script works

Models: the synthetic world's roles under ``models/world`` (``tests.trainutil.roles``: t2i, clip_cond, dino_cond,
llm, promptnet); the diffusion recipe (:class:`training.trainers.diffusion.DiffusionRecipe`, 1 CLIP token, both
conditions dropped with p = 0.1). Data: ``tests.trainutil.write_dataset`` (rows made of world source images, in
the build's published schema). One process, no Ray; ``torch.set_num_threads(2)``.

Measured, all in one run:

1. **Step.** One micro-batch of 16 rows (``write_dataset(n=16)``) turned into model inputs once with
   ``recipe.prepare`` (encoding is not timed). Two recipes set up separately (fresh, identical models):
   (A) plain PyTorch: ``torch.optim.AdamW(trainable, lr=1e-4)``, forward, backward, ``clip_grad_norm_(1.0)``,
   ``step``, ``zero_grad``; (B) the DeepSpeed ZeRO-2 engine of ``training.trainers.engine.initialize`` over
   ``configs/deepspeed/zero2.json`` (``tests.trainutil.ds_config``: micro 16, lr 1e-4, clip 1.0, fp32; a single
   gloo rank over a file store), per step ``eng(**inputs)``, ``eng.backward(loss)``, ``eng.step()``. The engine's
   set-up (DeepSpeed's JIT op build included, if any) is timed apart and not counted. Each engine takes
   ``--warmup`` untimed steps, then ``--reps`` rounds of ``--steps`` timed steps of A and of B, the order
   alternating between rounds (A B, B A, A B, ...). Printed: per-step ms (median over the steps of a round, and
   over all timed steps), and the ratio B / A (target <= 1.10).
2. **Epoch.** A dataset of 64 rows (``write_dataset(n=64)``) in 4 micro-batches of 16, each micro-batch
   ``prepare`` + one plain AdamW step (as in 1A). Uncached: ``prepare`` on the image batch (PNG decode, VAE,
   CLIP and DINO encoders; recipe set up with its encoders). Cached: the cache columns computed once per
   micro-batch with ``pipeline.train._CacheEncoder`` (what ``cafe cache`` runs; timed apart, the one-off cost),
   then ``prepare`` on the cache batch (recipe set up with ``encoders=False``). ``--reps`` epochs of each, the
   order alternating. Printed: epoch seconds (median), prepare vs step seconds inside the epoch, and the speedup
   uncached / cached (target >= 2). Also the largest difference between the inputs the two paths prepare for the
   same rows (they should agree: the cache holds what the encoders compute).

Each round also prints how many CPUs *other* processes used while it ran (``/proc/stat`` busy time minus this
process's own CPU time, per second of wall): on the 2-core machine a round with others above ~0.2 CPUs is
contended (two torch threads then straggle badly) and its figures are not to be recorded. No timing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace as NS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as U  # noqa: E402  (repo on sys.path)

TARGET_STEP_RATIO, TARGET_CACHE_SPEEDUP = 1.10, 2.0
MICRO, LR = 16, 1e-4


class Others:
    """CPU seconds that *other* processes used while a block ran (``/proc/stat`` busy time minus this process's
    own CPU time), as a number of CPUs: near 0 on a quiet machine; a block with others > 0.2 is contended."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:  # pragma: no cover - not Linux
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def cpus(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / max(wall, 1e-9)


def section():
    return NS(n_clip_tokens=1, drop_clip=0.1, drop_dino=0.1)


def make_recipe(encoders: bool = True):
    from tests import trainutil as tu
    from training.trainers.diffusion import DiffusionRecipe

    return DiffusionRecipe(section(), tu.roles()).setup("cpu", encoders=encoders)


class PlainStep:
    """One plain PyTorch optimizer step over a recipe's module."""

    def __init__(self, recipe):
        import torch

        self.module = recipe.module
        recipe.module_train_mode(self.module)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR)

    def __call__(self, inputs: dict) -> float:
        import torch

        out = self.module(**inputs)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad()
        return float(out["loss"].detach())


class DeepSpeedStep:
    """One DeepSpeed engine step (ZeRO-2, one rank) over a recipe's module."""

    def __init__(self, recipe, tmp: Path):
        from tests import trainutil as tu
        from training.trainers import engine

        tu.init_single_process(tmp)
        t0 = time.perf_counter()
        self.engine, _ = engine.initialize(recipe, tu.ds_config(micro=MICRO, lr=LR, stage=2))
        self.init_s = time.perf_counter() - t0
        self.engine.train()
        recipe.module_train_mode(self.engine.module)

    def __call__(self, inputs: dict) -> float:
        out = self.engine(**inputs)
        self.engine.backward(out["loss"])
        self.engine.step()
        return float(out["loss"].detach())


def timed_steps(step, inputs: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = step(inputs)
        times.append(time.perf_counter() - t0)
        if loss != loss:  # NaN
            raise RuntimeError("loss is NaN")
    return times


def bench_step(tmp: Path, reps: int, steps: int, warmup: int) -> dict:
    from tests import trainutil as tu

    out = tu.write_dataset(tmp / "step", n=MICRO)
    batch = tu.numpy_batch(out)
    t0 = time.perf_counter()
    rec_a = make_recipe(encoders=True)
    setup_a = time.perf_counter() - t0
    inputs = rec_a.prepare(batch, 0, 0)
    t0 = time.perf_counter()
    rec_b = make_recipe(encoders=False)  # the same model; the inputs are already prepared
    setup_b = time.perf_counter() - t0
    n_train = sum(p.numel() for p in rec_a.module.parameters() if p.requires_grad)
    a = PlainStep(rec_a)
    first_a = float(rec_a.module(**inputs)["loss"].detach())  # same weights, same inputs: same loss
    first_b = float(rec_b.module(**inputs)["loss"].detach())
    b = DeepSpeedStep(rec_b, tmp)
    print(f"step: {n_train / 1e6:.2f} M trainable parameters; recipes set up in {setup_a:.1f} s (with encoders) "
          f"and {setup_b:.1f} s; DeepSpeed initialize {b.init_s:.1f} s (not counted)")
    print(f"step: first loss before any step, plain {first_a:.6f} vs engine module {first_b:.6f}")
    timed_steps(a, inputs, warmup)
    timed_steps(b, inputs, warmup)
    rounds = []
    for r in range(reps):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        got, others = {}, Others()
        for name in order:
            got[name] = timed_steps(a if name == "A" else b, inputs, steps)
        got["others"] = others.cpus()
        rounds.append(got)
        ma, mb = statistics.median(got["A"]) * 1e3, statistics.median(got["B"]) * 1e3
        print(f"step round {r + 1} ({' then '.join(order)}): plain {ma:.1f} ms, DeepSpeed {mb:.1f} ms, "
              f"ratio {mb / ma:.3f}; other processes used {U.fmt_s(got['others'])} CPUs meanwhile")
    all_a = [t for g in rounds for t in g["A"]]
    all_b = [t for g in rounds for t in g["B"]]
    return {"rounds": rounds, "a_ms": statistics.median(all_a) * 1e3, "b_ms": statistics.median(all_b) * 1e3,
            "a_mean_ms": statistics.fmean(all_a) * 1e3, "b_mean_ms": statistics.fmean(all_b) * 1e3,
            "init_s": b.init_s, "steps": steps, "warmup": warmup, "n_train": n_train,
            "others": max((g["others"] or 0.0) for g in rounds)}


def split(batch: dict, size: int) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i: i + size] for k, v in batch.items()} for i in range(0, n, size)]


def epoch(recipe, step: PlainStep, batches: list[dict], ep: int) -> tuple[float, float]:
    """(prepare seconds, step seconds) over one pass of ``batches``."""
    prep = stp = 0.0
    for batch in batches:
        t0 = time.perf_counter()
        inputs = recipe.prepare(batch, ep, 0)
        t1 = time.perf_counter()
        step(inputs)
        t2 = time.perf_counter()
        prep, stp = prep + t1 - t0, stp + t2 - t1
    return prep, stp


def bench_epoch(tmp: Path, reps: int, rows: int) -> dict:
    from pipeline.train import _CacheEncoder
    from tests import trainutil as tu

    out = tu.write_dataset(tmp / "epoch", n=rows)
    image_batches = split(tu.numpy_batch(out), MICRO)
    t0 = time.perf_counter()
    enc = _CacheEncoder(tu.roles(), -2, "cpu")
    cache_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache_batches = [enc(b) for b in image_batches]
    cache_s = time.perf_counter() - t0
    del enc
    print(f"epoch: {rows} rows in {len(image_batches)} micro-batches of {MICRO}; cache encoders loaded in "
          f"{cache_load:.1f} s, cache columns computed in {cache_s:.2f} s (one-off, not in the epochs)")
    rec_u, rec_c = make_recipe(encoders=True), make_recipe(encoders=False)
    # the two paths prepare the same inputs for the same rows (cache = what the encoders compute)
    diff = 0.0
    for bi, bc in zip(image_batches, cache_batches):
        iu, ic = rec_u.prepare(bi, 0, 0), rec_c.prepare(bc, 0, 0)
        for k in iu:
            diff = max(diff, float((iu[k].float() - ic[k].float()).abs().max()))
    print(f"epoch: largest |uncached - cached| over the prepared inputs: {diff:.3g}")
    step_u, step_c = PlainStep(rec_u), PlainStep(rec_c)
    step_u(rec_u.prepare(image_batches[0], 0, 0))  # warm-up: one step each (allocator, AdamW state)
    step_c(rec_c.prepare(cache_batches[0], 0, 0))
    res = {"u": [], "c": [], "u_prep": [], "u_step": [], "c_prep": [], "c_step": []}
    others_max = 0.0
    for r in range(reps):
        order = ("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")
        line, others = [], Others()
        for name in order:
            if name == "uncached":
                p, s = epoch(rec_u, step_u, image_batches, r + 1)
                res["u"].append(p + s), res["u_prep"].append(p), res["u_step"].append(s)
            else:
                p, s = epoch(rec_c, step_c, cache_batches, r + 1)
                res["c"].append(p + s), res["c_prep"].append(p), res["c_step"].append(s)
            line.append(f"{name} {p + s:.2f} s (prepare {p:.2f} + step {s:.2f})")
        o = others.cpus()
        others_max = max(others_max, o or 0.0)
        print(f"epoch round {r + 1}: " + ", ".join(line) + f", speedup {res['u'][-1] / res['c'][-1]:.2f}; "
              f"other processes used {U.fmt_s(o)} CPUs meanwhile")
    med = {k: statistics.median(v) for k, v in res.items()}
    med.update(others=others_max, cache_s=cache_s, cache_load=cache_load, diff=diff, rows=rows,
               batches=len(image_batches))
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="rounds of the step comparison and epochs of each kind")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per engine per round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per engine first")
    ap.add_argument("--rows", type=int, default=64, help="rows in the epoch's dataset (in micro-batches of --micro)")
    ap.add_argument("--micro", type=int, default=16, help="micro-batch rows of the step comparison and the epoch "
                    "(the DeepSpeed bookkeeping per step is fixed, so its share shrinks as the step grows)")
    ap.add_argument("--quick", action="store_true", help="1 rep, 5 steps, 32 rows: figures meaningless")
    args = ap.parse_args()
    global MICRO
    MICRO = args.micro
    if args.quick:
        args.reps, args.steps, args.warmup, args.rows = 1, 5, 1, 32

    import importlib.metadata as md
    import logging

    import torch

    torch.set_num_threads(2)
    U.quiet_libraries()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    U.header("bench_train: DeepSpeed ZeRO-2 step vs plain PyTorch step; diffusion epoch cached vs uncached")
    print(f"deepspeed:    {md.version('deepspeed')}; one process, gloo world size 1, torch threads "
          f"{torch.get_num_threads()}")
    print(f"config:       diffusion recipe on models/world; micro-batch {MICRO}; step: {args.warmup} warm-up + "
          f"{args.reps} x {args.steps} timed steps per engine; epoch: {args.rows} rows, {args.reps} epochs each")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cafe-bench-train-") as tmp:
        st = bench_step(Path(tmp), args.reps, args.steps, args.warmup)
        ep = bench_epoch(Path(tmp), args.reps, args.rows)
        # ends the single-rank group DeepSpeed uses
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    step_ratio = st["b_ms"] / st["a_ms"]
    round_ratios = [statistics.median(g["B"]) / statistics.median(g["A"]) for g in st["rounds"]]
    speedup = ep["u"] / ep["c"]
    print()
    print(U.table(
        ["figure", "value", "target", "met?"],
        [["plain PyTorch step (ms, median)", f"{st['a_ms']:.1f}", "", ""],
         ["DeepSpeed ZeRO-2 step (ms, median)", f"{st['b_ms']:.1f}", "", ""],
         ["DeepSpeed / plain step (medians)", f"{step_ratio:.3f}", f"<= {TARGET_STEP_RATIO:.2f}",
          "yes" if step_ratio <= TARGET_STEP_RATIO else "NO"],
         ["DeepSpeed / plain step (per round)", " / ".join(f"{x:.3f}" for x in round_ratios), "", ""],
         ["DeepSpeed / plain step (means)", f"{st['b_mean_ms'] / st['a_mean_ms']:.3f}", "", ""],
         ["DeepSpeed initialize (s, not counted)", f"{st['init_s']:.1f}", "", ""],
         [f"uncached epoch, {ep['rows']} rows (s, median)", f"{ep['u']:.2f}", "", ""],
         ["  of which prepare / step (s)", f"{ep['u_prep']:.2f} / {ep['u_step']:.2f}", "", ""],
         [f"cached epoch, {ep['rows']} rows (s, median)", f"{ep['c']:.2f}", "", ""],
         ["  of which prepare / step (s)", f"{ep['c_prep']:.2f} / {ep['c_step']:.2f}", "", ""],
         ["speedup uncached / cached", f"{speedup:.2f}", f">= {TARGET_CACHE_SPEEDUP:.1f}",
          "yes" if speedup >= TARGET_CACHE_SPEEDUP else "NO"],
         [f"cache columns, {ep['rows']} rows, one-off (s)", f"{ep['cache_s']:.2f} (+ {ep['cache_load']:.1f} load)",
          "", ""],
         ["largest |uncached - cached| prepared input", f"{ep['diff']:.3g}", "0 (same features)", ""],
         ["other processes' CPUs, busiest round", f"step {st['others']:.2f} · epoch {ep['others']:.2f}", "~0",
          "quiet" if max(st["others"], ep["others"]) <= 0.2 else "NO: contended, figures unreliable"]]))
    print(f"RESULT  DeepSpeed ZeRO-2 step / plain PyTorch step = {step_ratio:.3f} ({st['b_ms']:.1f} vs "
          f"{st['a_ms']:.1f} ms, medians of {args.reps} x {st['steps']} steps; target <= {TARGET_STEP_RATIO:.2f})")
    print(f"RESULT  diffusion epoch uncached / cached = {speedup:.2f} ({ep['u']:.2f} vs {ep['c']:.2f} s, medians of "
          f"{args.reps}; target >= {TARGET_CACHE_SPEEDUP:.1f}); the cache itself: {ep['cache_s']:.2f} s once")
    load1, load5, _ = os.getloadavg()
    print(f"total wall {time.perf_counter() - t_all:.0f} s; load average at the end {load1:.2f} (1 min), "
          f"{load5:.2f} (5 min)")


if __name__ == "__main__":
    main()
