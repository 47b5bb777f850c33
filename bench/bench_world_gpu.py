"""`cafe world make` on a GPU: the same world, faster, with the same gate figures within tolerance.

Usage (on a machine with CUDA)::

    python bench/bench_world_gpu.py OUT_DIR

Trains the whole world from scratch with ``device="cuda"`` into ``OUT_DIR/world``, prints each stage's seconds
beside the run recorded in ``models/world/world.json``, and each gate figure beside the shipped one
(``models/world/gates.json``) with the difference. Writes ``OUT_DIR/gpu_world.json``. Exit 1 if a gate
fails or a figure differs from the CPU one by more than 0.05.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(out_dir: str) -> int:
    import torch

    from training.world.make import WorldConfig, make_world

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    out = Path(out_dir)
    t0 = time.perf_counter()
    state = make_world(out / "world", WorldConfig(device="cuda"))
    wall = time.perf_counter() - t0
    cpu_state = json.loads((REPO / "models" / "world" / "world.json").read_text())
    shipped = {g["name"]: g["figure"] for g in json.loads((REPO / "models" / "world" / "gates.json").read_text())}
    gpu = {g["name"]: g for g in json.loads((out / "world" / "gates.json").read_text())}
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}; wall {wall:.0f} s")
    print(f"{'stage':12s} {'gpu s':>8s} {'cpu s':>8s}")
    for stage, rec in state["stages"].items():
        cpu = cpu_state["stages"].get(stage, {}).get("seconds")
        print(f"{stage:12s} {rec['seconds']:8.1f} {cpu if cpu is not None else float('nan'):8.1f}")
    print(f"\n{'gate':24s} {'gpu':>8s} {'cpu':>8s} {'diff':>8s} ok")
    worst, failed = 0.0, []
    for name, g in gpu.items():
        diff = g["figure"] - shipped.get(name, float("nan"))
        if name != "clip_cond.consistent":
            worst = max(worst, abs(diff))
        if not g["passed"]:
            failed.append(name)
        print(f"{name:24s} {g['figure']:8.4f} {shipped.get(name, float('nan')):8.4f} {diff:+8.4f} "
              f"{'yes' if g['passed'] else 'NO'}")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "wall_s": round(wall, 1),
              "stages_s": {k: v["seconds"] for k, v in state["stages"].items()},
              "cpu_stages_s": {k: v.get("seconds") for k, v in cpu_state["stages"].items()},
              "gates": gpu, "max_abs_diff": worst, "failed": failed}
    (out / "gpu_world.json").write_text(json.dumps(result, indent=2))
    print(f"\nmax |gpu − cpu| over rate gates: {worst:.4f}; failed: {failed or 'none'}")
    return 1 if failed or worst > 0.05 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/out"))
