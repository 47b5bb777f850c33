"""Retrain the world's expensive stages on one GPU, two processes at a time, and pack the result.

Usage (on a machine with CUDA; ``--scale 0.01`` runs the same flow on a CPU in a minute)::

    python bench/world_gpu_retrain.py OUT_DIR [--world models/world] [--deadline 540] [--threads 6]

The tiny models leave a GPU mostly idle, so the stages run side by side: one process trains ``t2i`` (the longest
stage), another ``clip_filter`` → ``clip_cond`` → ``dino_filter`` → ``dino_cond`` → ``llm`` and then measures
the gates with the *old* t2i (an early reading of the encoder and LLM gates). Their records are merged, and
``promptnet`` and the gates run on the result, exactly as ``cafe world make`` would (the stage keys do not
depend on the device, so the merged ``world.json`` is what a CPU ``cafe world make`` computes for the same code
and config). Writes ``OUT_DIR/world.tgz.partNN`` (the changed model folders, world.json and the gate files,
in pieces small enough to transfer), ``OUT_DIR/gpu_retrain.json`` and the two children's logs.

Unpack on the CPU side with ``cat OUT/world.tgz.part* | tar xz -C models/world``, then ``cafe world check``.

On the lent GPU machine (torch 2.11 preinstalled, no package index) the run used wheels carried in an ignored
folder: diffusers 0.42.1, open_clip_torch 3.3.0 with **ftfy and wcwidth** (open_clip imports ftfy), transformers
5.24.0, huggingface_hub, tokenizers, safetensors and their pure-Python dependencies; ``pip install --no-deps
--target /tmp/site`` then ``PYTHONPATH=/tmp/site:$PWD``. Carry ``models/world/_work/vae-<key>`` too (2.7 MB) so that
the VAE stage is not retrained; the pool (77 MB) is rendered there in about 40 s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.world.make import OUTPUTS  # noqa: E402

ENCODER_STAGES = ["clip_filter", "clip_cond", "dino_filter", "dino_cond", "llm"]
# every model stage's outputs (the make's own OUTPUTS table) and the state file; the assets are unchanged
PACKED = [o for stage, outs in OUTPUTS.items() if stage != "assets" for o in outs] + ["world.json"]


def _config(scale: float, threads: int):
    from dataclasses import replace

    from training.world.make import WorldConfig

    cfg = WorldConfig()
    if scale != 1.0:
        cfg = cfg.scaled(scale)
    return replace(cfg, threads=threads)


def child(world: str, stages: list[str], scale: float, threads: int) -> None:
    from training.world.make import make_world

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    make_world(world, _config(scale, threads), only=stages)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--world", default=str(REPO / "models" / "world"))
    ap.add_argument("--work", default="/tmp/world_gpu_retrain")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds; children still running then are "
                    "stopped and whatever finished is packed")
    ap.add_argument("--child", nargs=2, metavar=("WORLD", "STAGES"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1].split(","), args.scale, args.threads)
        return 0

    import torch

    from training.world.make import make_world

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    t_start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    a, b = work / "a", work / "b"
    shutil.copytree(args.world, a, ignore=shutil.ignore_patterns("pool-*.npz"))
    cfg = _config(args.scale, args.threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}", flush=True)

    # the pool (and the VAE, unless its folder came along) once, then a copy for the second process
    from training.world.make import WorldMaker

    maker = WorldMaker(a, cfg)
    if not maker._pool_path().is_file():  # the pool file is not in git: render it (plan() skips it without readers)
        maker.run(only=["pool"], force=True)
    make_world(a, cfg, only=["vae"])
    shutil.copytree(a, b)
    t_pool = time.perf_counter() - t_start

    cmd = [sys.executable, __file__, "x", "--scale", str(args.scale), "--threads", str(args.threads), "--child"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = {"t2i": open(out / "log_t2i.txt", "w"), "enc": open(out / "log_encoders.txt", "w")}
    procs = {
        "t2i": subprocess.Popen(cmd + [str(a), "t2i"], stdout=logs["t2i"], stderr=subprocess.STDOUT, env=env),
        "enc": subprocess.Popen(cmd + [str(b), ",".join(ENCODER_STAGES + ["gates"])], stdout=logs["enc"],
                                stderr=subprocess.STDOUT, env=env),
    }
    rc = {}
    while len(rc) < len(procs):
        for name, p in procs.items():
            if name not in rc and p.poll() is not None:
                rc[name] = p.returncode
                print(f"{name} finished rc={p.returncode} at {time.perf_counter() - t_start:.0f} s", flush=True)
        if time.perf_counter() - t_start > args.deadline:
            for name, p in procs.items():
                if name not in rc:
                    p.kill()
                    rc[name] = "killed"
                    print(f"{name} stopped at the deadline", flush=True)
        time.sleep(2)
    for f in logs.values():
        f.close()

    summary = {"device": device, "torch": torch.__version__, "pool_s": round(t_pool, 1), "children_rc": rc,
               "config": asdict(cfg)}
    if (b / "gates.json").is_file():
        summary["early_gates_old_t2i"] = {g["name"]: g["figure"] for g in json.loads((b / "gates.json").read_text())}
    if rc.get("enc") == 0:  # merge the encoder stages into a's world
        state_a, state_b = (json.loads((d / "world.json").read_text()) for d in (a, b))
        for stage in ENCODER_STAGES:
            state_a["stages"][stage] = state_b["stages"][stage]
            state_a.setdefault("devices", {})[stage] = state_b.get("devices", {}).get(stage)
        (a / "world.json").write_text(json.dumps(state_a, indent=2, default=list))
        for name in (o for stage in ENCODER_STAGES for o in OUTPUTS[stage]):
            shutil.rmtree(a / name, ignore_errors=True)
            shutil.copytree(b / name, a / name)
    if rc.get("t2i") == 0 and rc.get("enc") == 0:
        state = make_world(a, cfg)  # promptnet and the gates (everything else is done)
        summary["stages_s"] = {k: v.get("seconds") for k, v in state["stages"].items()}
        summary["gates"] = {g["name"]: [g["figure"], g["passed"]] for g in json.loads((a / "gates.json").read_text())}
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "gpu_retrain.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=1, default=str), flush=True)

    tgz = work / "world.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name in PACKED:
            if (a / name).exists():
                tar.add(a / name, arcname=name)
    data, part = tgz.read_bytes(), 15 * 2**20
    for i in range(0, len(data), part):
        (out / f"world.tgz.part{i // part:02d}").write_bytes(data[i: i + part])
    print(f"packed {len(data) / 2**20:.1f} MiB in {(len(data) + part - 1) // part} part(s); "
          f"{time.perf_counter() - t_start:.0f} s in all", flush=True)
    return 0 if summary.get("gates") else 1


if __name__ == "__main__":
    sys.exit(main())
