"""The loop's overheads: a no-op re-run of a finished `cafe pipeline run`, and round-1 (Eq. 4) generation under
Ray Data against the same generator in a plain loop.

    python bench/bench_loop.py [--config configs/tiny.yaml] [--rows 96]

Needs a finished `cafe pipeline run CONFIG` (`make run`). Prints:

1. ``noop``: wall seconds of `cafe pipeline plan` and of `cafe pipeline run` on the finished output (a subprocess
   each, interpreter start included), and whether torch or Ray was imported (target: ≤ 5 s, neither).
2. ``round1``: rows/s of `cafe build` round 1 (Eq. 4 from the round-0 weights; the Ray Data graph: sources,
   generation, CLIP/DINO scoring, rules, dialogue, sink; Ray start and actor start-up excluded: the build's
   ``pipeline_wall``) against a plain in-process loop of the same generator over the same rows (generation only,
   so the ratio understates Ray Data's throughput). Ratio = Ray rows/s ÷ plain rows/s (target ≥ 0.9).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def noop(config: str) -> dict:
    out = {}
    for verb in ("plan", "run"):
        code = ("import sys, time; t = time.perf_counter(); from pipeline.cli import main; "
                f"rc = main(['pipeline', '{verb}', '{config}']); "
                "print('IMPORTED', 'torch' in sys.modules, 'ray' in sys.modules)")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        out[verb] = {"seconds": round(time.perf_counter() - t0, 2), "rc": p.returncode,
                     "imported_torch_ray": p.stdout.strip().splitlines()[-1]}
        if verb == "run" and "ran 0" not in p.stdout:
            raise SystemExit(f"the loop of {config} is not finished: {p.stdout[-500:]}")
    return out


def round1(config: str, rows: int) -> dict:
    import numpy as np
    from PIL import Image

    from pipeline.build import run_build
    from pipeline.loop.cafe import LoopContext
    from pipeline.loop.graph import outputs_of
    from pipeline.stages import choose_phrases
    from training.assistant import Assistant
    from training.data.ids import row_id, stable_int
    from training.methods.self_distill import SelfDistillGenerator
    from training.models.kit import load_from_config
    from pipeline.train import role_refs

    ctx = LoopContext.load(config)
    cfg = ctx.cfg
    diffusion = outputs_of(ctx.state, "train-diffusion-r0")["weights"]
    per_source = cfg.build.instructions.per_source
    n_sources = max(1, rows // per_source)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    src_root = tmp / "sources"
    files = sorted(Path(cfg.build.sources.path).rglob("*.png"))[:n_sources]
    for f in files:
        (src_root / f.parent.name).mkdir(parents=True, exist_ok=True)
        (src_root / f.parent.name / f.name).write_bytes(f.read_bytes())
    sets = ["build.round=1", f"build.distill.diffusion={diffusion}", f"build.sources.path={src_root}",
            "build.sources.exclude=[]"]
    rcfg = ctx.derived(sets)
    result = run_build(rcfg, out_dir=tmp / "ray")
    n = result.manifest["counts"]["candidates"]
    ray_rps = n / result.manifest["timings_s"]["pipeline_wall"]

    d = rcfg.build.distill
    assistant = Assistant.load(role_refs(rcfg), None, diffusion, device="cpu")
    t2i = load_from_config(rcfg.models, "t2i")
    gen = SelfDistillGenerator(assistant, t2i.components, d.mode, d.scale_dino, d.alpha, d.num_inference_steps,
                               d.guidance_scale, d.reference_guidance_scale)
    work = []
    for f in files:
        sid = f"{f.parent.name}/{f.name}"
        img = np.asarray(Image.open(f).convert("RGB"))
        for p in choose_phrases(sid, rcfg.build.instructions.phrases, per_source, rcfg.run.seed):
            work.append((img, f"a {f.parent.name} {p}", stable_int("row", 0, row_id(1, sid, p))))
    t0 = time.perf_counter()
    bs = rcfg.build.profusion.batch_size
    for i in range(0, len(work), bs):
        part = work[i: i + bs]
        gen.sample([w[0] for w in part], [w[1] for w in part], [w[1] for w in part], [w[2] for w in part])
    plain_rps = len(work) / (time.perf_counter() - t0)
    return {"rows": n, "ray_rows_per_s": round(ray_rps, 2), "plain_rows_per_s": round(plain_rps, 2),
            "ratio": round(ray_rps / plain_rps, 3), "ray_pipeline_wall_s": result.manifest["timings_s"]["pipeline_wall"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--skip-round1", action="store_true")
    args = ap.parse_args()
    res = {"noop": noop(args.config)}
    print(json.dumps(res, indent=2), flush=True)
    if not args.skip_round1:
        res["round1"] = round1(args.config, args.rows)
        print(json.dumps(res["round1"], indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "bench_loop.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
