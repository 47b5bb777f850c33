"""Per-concept jobs (issue 10): actor reuse, DCI sampling cost, Infusion generation cost.

Usage::

    python bench/bench_concepts.py            # all three, 3 repetitions
    python bench/bench_concepts.py --quick    # 1 repetition, fewer jobs/steps: checks the script works
    python bench/bench_concepts.py --only jobs|dci|dci-batch|infusion

Models: the synthetic world's ``models/world/t2i`` (32×32 images, 8×8 latents, v-prediction), CPU.

1. **Jobs.** ``--jobs`` ICO jobs (world subjects, 2 references each) as the shipped
   ``configs/concepts/tiny.yaml`` runs them (150 steps, 2 sample images and their CLIP/DINO metrics per job;
   ``--job-steps N`` instead trains N steps with no samples or metrics) run (A) on one reused :class:`pipeline.concepts.ConceptWorker` actor
   — what ``cafe concepts run`` does — and (B) one fresh process per job: a Ray task with ``max_calls=1`` (Ray
   starts a new worker process for every call) that imports the libraries, loads the base model and runs the same
   job. Both on the same local Ray cluster (2 CPUs), one job at a time; the cluster start is not timed, actor
   creation is (it is part of A's cost). Printed: wall seconds of each and B / A (target ≥ 3).
2. **DCI.** One prompt, ``--steps`` DDIM steps, η 1, CFG 6: :func:`training.methods.dci.sample_dci` with
   ``agg_time = 0.3`` (λ = 0) against :func:`training.methods.ico.sample` of the same ICO concept (target ≤ 1.25).
2b. **DCI, many seeds** (issue 23). 8 seeds of one prompt, ``--steps`` steps:
   :func:`training.methods.dci.sample_dci_batch` (one two-branch run, 3·8 rows per DCI step) against
   :func:`training.methods.dci.sample_dci` called once per seed; images per second of each (target ≥ 3×).
3. **Infusion.** One prompt, 50 DDIM steps, η 0, CFG 8: :func:`training.methods.infusion.sample` (F and C streams)
   against base generation (``ico.sample`` with no concept: the base UNet's own attention) (target ≤ 2.1).

Sampling rounds alternate the order (A B, B A, ...) and report medians. No timing is asserted anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, header, machine_lines, quiet_libraries, table  # noqa: E402

WORLD = REPO / "models" / "world"
SUBJECTS = sorted(p for p in (WORLD / "eval" / "subjects").iterdir() if p.is_dir())


def _cfg(tmp: Path, steps: int | None) -> dict:
    from pipeline.config import load_config

    overrides = [f"concepts.output={tmp}", f"models.root={WORLD}"]
    if steps is not None:
        overrides += [f"concepts.ico.steps={steps}", "concepts.samples_per_job=0"]
    cfg = load_config(REPO / "configs" / "concepts" / "tiny.yaml", overrides)
    return cfg.model_dump(mode="json")


def _jobs(cfg_json: dict, n: int) -> list[dict]:
    from pipeline.concept_jobs import parse_job
    from pipeline.config import load_config_dict

    cfg = load_config_dict(cfg_json)
    raws = [{"id": f"bench{i}", "method": "ico", "noun": SUBJECTS[i % len(SUBJECTS)].name.split("-")[1],
             "images": [str(p) for p in sorted(SUBJECTS[i % len(SUBJECTS)].glob("*.png"))[:2]], "seed": i}
            for i in range(n)]
    jobs = [parse_job(r, cfg, "bench", i) for i, r in enumerate(raws)]
    assert all(j.error is None for j in jobs), [j.error for j in jobs]
    return [j.to_json() for j in jobs]


def _one_fresh(cfg_json: dict, job: dict) -> dict:
    from pipeline.concepts import ConceptWorker

    return ConceptWorker(cfg_json).run(job)


def bench_jobs(n: int, steps: int, tmp: Path) -> dict:
    import ray

    from pipeline.concepts import ConceptWorker
    from pipeline.config import RayConfig
    from pipeline.local_ray import ray_session

    out = {}
    with ray_session(RayConfig(num_cpus=2)):
        for name in ("reused", "fresh"):
            cfg_json = _cfg(tmp / name, steps)
            jobs = _jobs(cfg_json, n)
            t0 = time.perf_counter()
            if name == "reused":
                actor = ray.remote(ConceptWorker).options(num_cpus=1).remote(cfg_json)
                results = [ray.get(actor.run.remote(j)) for j in jobs]
                ray.kill(actor)
            else:
                task = ray.remote(max_calls=1, num_cpus=1)(_one_fresh)
                results = [ray.get(task.remote(cfg_json, j)) for j in jobs]
            out[name] = time.perf_counter() - t0
            assert all(r["ok"] for r in results), results
            out[f"{name}_job_s"] = [round(r["duration_s"], 2) for r in results]
    out["ratio_fresh_over_reused"] = out["fresh"] / out["reused"]
    return out


def _time(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _alternate(a, b, reps: int) -> tuple[float, float]:
    ta, tb = [], []
    for r in range(reps):
        order = [(a, ta), (b, tb)] if r % 2 == 0 else [(b, tb), (a, ta)]
        for fn, acc in order:
            acc.extend(_time(fn, 1))
    return statistics.median(ta), statistics.median(tb)


def _world_t2i():
    from training.models.kit import load_role

    return load_role("t2i", WORLD / "t2i").components


def _subject_images(i: int):
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SUBJECTS[i].glob("*.png"))]


def bench_dci(steps: int, reps: int) -> dict:
    from training.methods import dci, ico

    t2i = _world_t2i()
    noun = SUBJECTS[0].name.split("-")[1]
    concept = ico.train_ico(t2i, _subject_images(0), noun, ico.IcoParams(steps=20, learning_rate=1e-3), seed=0)
    prompt = f"a {ico.concept_phrase(concept)} on the right"
    params = dci.DciParams(steps=steps, agg_time=0.3, lam=0.0, aux_nouns=("square", "star", "heart"))
    plain = lambda: ico.sample(t2i, concept, [prompt], [0], steps=steps, guidance=6.0, eta=1.0)  # noqa: E731
    dual = lambda: dci.sample_dci(t2i, concept, prompt, 0, params)  # noqa: E731
    plain(), dual()  # warm-up
    tp, td = _alternate(plain, dual, reps)
    return {"steps": steps, "plain_s": tp, "dci_s": td, "ratio_dci_over_plain": td / tp}


def bench_dci_batch(steps: int, reps: int, seeds: int = 8) -> dict:
    from training.methods import dci, ico

    t2i = _world_t2i()
    noun = SUBJECTS[0].name.split("-")[1]
    concept = ico.train_ico(t2i, _subject_images(0), noun, ico.IcoParams(steps=20, learning_rate=1e-3), seed=0)
    prompt = f"a {ico.concept_phrase(concept)} on the right"
    params = dci.DciParams(steps=steps, agg_time=0.3, lam=0.0, aux_nouns=("square", "star", "heart"))
    one = lambda: [dci.sample_dci(t2i, concept, prompt, s, params) for s in range(seeds)]  # noqa: E731
    batched = lambda: dci.sample_dci_batch(t2i, concept, prompt, list(range(seeds)), params)  # noqa: E731
    one(), batched()
    t1, tb = _alternate(one, batched, reps)
    return {"steps": steps, "seeds": seeds, "one_at_a_time_s": t1, "batched_s": tb,
            "images_per_s_one": seeds / t1, "images_per_s_batched": seeds / tb, "ratio": t1 / tb}


def bench_infusion(steps: int, reps: int) -> dict:
    from training.methods import ico, infusion

    t2i = _world_t2i()
    noun = SUBJECTS[0].name.split("-")[1]
    concept = infusion.train_infusion(t2i, _subject_images(0), noun,
                                      infusion.InfusionParams(steps=5, batch_size=2, grad_accum=1), seed=0)
    prompt = f"a {noun} on the right"
    base = lambda: ico.sample(t2i, None, [prompt], [0], steps=steps, guidance=8.0, eta=0.0)  # noqa: E731
    inf = lambda: infusion.sample(t2i, [concept], [prompt], [0], steps=steps, guidance=8.0, eta=0.0)  # noqa: E731
    base(), inf()
    tb, ti = _alternate(base, inf, reps)
    return {"steps": steps, "base_s": tb, "infusion_s": ti, "ratio_infusion_over_base": ti / tb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--job-steps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--only", choices=["jobs", "dci", "dci-batch", "infusion"])
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "bench_concepts.json"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.jobs, args.job_steps, args.steps = 1, 2, 10, 10
    quiet_libraries()
    import tempfile

    import torch

    torch.set_num_threads(2)
    header("Per-concept jobs: actor reuse, DCI, Infusion")
    print("\n".join(machine_lines()))
    results: dict = {"machine": machine_lines(), "args": vars(args)}
    rows = []
    if args.only in (None, "jobs"):
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_jobs(args.jobs, args.job_steps, Path(tmp))
        results["jobs"] = r
        what = f"{args.job_steps} steps" if args.job_steps else "configs/concepts/tiny.yaml"
        per_job = (r["fresh"] - r["reused"]) / args.jobs
        rows.append([f"{args.jobs} ICO jobs ({what}): fresh process per job / reused actor "
                     f"(saved per job: {per_job:.1f} s)",
                     f"{r['fresh']:.1f} s / {r['reused']:.1f} s", f"{r['ratio_fresh_over_reused']:.2f}", "≥ 3"])
    if args.only in (None, "dci"):
        r = bench_dci(args.steps, args.reps)
        results["dci"] = r
        rows.append([f"DCI / plain sampling ({args.steps} steps, agg_time 0.3)",
                     f"{r['dci_s']:.3f} s / {r['plain_s']:.3f} s", f"{r['ratio_dci_over_plain']:.2f}", "≤ 1.25"])
    if args.only in (None, "dci-batch"):
        r = bench_dci_batch(args.steps, args.reps)
        results["dci_batch"] = r
        rows.append([f"DCI, {r['seeds']} seeds: one run per seed / one batched run ({args.steps} steps; images/s "
                     f"{r['images_per_s_one']:.2f} → {r['images_per_s_batched']:.2f})",
                     f"{r['one_at_a_time_s']:.2f} s / {r['batched_s']:.2f} s", f"{r['ratio']:.2f}", "≥ 3"])
    if args.only in (None, "infusion"):
        r = bench_infusion(args.steps, args.reps)
        results["infusion"] = r
        rows.append([f"Infusion / base generation ({args.steps} steps)",
                     f"{r['infusion_s']:.3f} s / {r['base_s']:.3f} s", f"{r['ratio_infusion_over_base']:.2f}",
                     "≤ 2.1"])
    print(table(["measurement", "times", "ratio", "target"], rows))
    if not args.quick:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
