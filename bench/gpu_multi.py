"""The GPU checks of multi-GPU training and GPU inference, as one script for a lent GPU machine.

    DS_ACCELERATOR=cuda python bench/gpu_multi.py OUT_DIR [--steps 3]

1. ``cafe train diffusion`` (ZeRO-2) and ``cafe train mllm`` (ZeRO-3, LLM loaded partitioned) through Ray Train
   with NCCL on every visible GPU (two or more: the collectives of a multi-rank step run on the GPUs; with one
   GPU the run is one rank and says so), bf16, a few steps each: losses, seconds, peak GPU memory, each rank's
   share of the frozen LLM.
2. ``cafe generate`` in batch mode on a GPU actor (``num_gpus_per_actor: 1``) against the same requests on the
   CPU: seconds per request and the device each ran on.

Writes ``OUT_DIR/gpu_multi.json`` and prints a summary. Uses the world's models (models/world); no network.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)


def _cfg(out: Path, data: Path, gpus: int, **train):
    from pipeline.config import load_config_dict

    section = {"data": {"datasets": [str(data)], "cache": "off"}, "storage_path": str(out / "runs"),
               "output_dir": str(out / "models"), "log_dir": str(out / "tb"), "checkpoint": {"every_steps": 0},
               "workers": {"num_workers": max(1, gpus), "use_gpu": gpus > 0, "cpus_per_worker": 2},
               "deepspeed": {"precision": "bf16"}, **train}
    return load_config_dict({"run": {"name": "gpu"}, "ray": {"num_cpus": 8}, "models": {"root": "models/world"},
                             "train": section})


def train(out: Path, data: Path, gpus: int, steps: int) -> dict:
    from pipeline.train import train_model

    res = {}
    for model, stage in (("diffusion", 2), ("mllm", 3)):
        cfg = _cfg(out, data, gpus, deepspeed={"precision": "bf16",
                                                       "config": f"configs/deepspeed/zero{stage}.json"},
                   **{model: {"micro_batch_size": 4, "max_steps": steps, "epochs": 1000, "lr": 1e-4,
                              "gradient_checkpointing": True}})
        t0 = time.perf_counter()
        s = train_model(cfg, model, echo=print)
        res[model] = {"world_size": max(1, gpus), "zero": stage, "steps": s.steps,
                      "losses": [m["loss"] for m in s.losses], "seconds": time.perf_counter() - t0,
                      "gpu_mem_gb": max((m.get("gpu_mem_gb", 0) for m in s.losses), default=None),
                      "frozen_share": s.frozen_share, "output": s.output}
    return res


def generate(out: Path, n: int) -> dict:
    import pyarrow.parquet as pq

    from pipeline.generate import generate_batch

    sources = sorted((ROOT / "models/world/sources").rglob("*.png"))[:n]
    reqs = out / "requests.jsonl"
    reqs.write_text("".join(json.dumps({"id": f"q{i}", "image": str(p), "seed": i,
                                        "text": "Can you generate an image for this object on the left?"}) + "\n"
                            for i, p in enumerate(sources)))
    res = {}
    import torch

    # (a GPU actor on a machine without one would wait for a GPU forever: without CUDA only the CPU side runs)
    for device, gpus in ((("cuda", 1),) if torch.cuda.is_available() else ()) + (("cpu", 0),):
        cfg = _cfg(out, out / "data", 0,  # the models the training part exported to out/models
                   generate={"num_gpus_per_actor": gpus, "device": device, "num_inference_steps": 30, "batch_size": 8})
        t0 = time.perf_counter()
        summary = generate_batch(cfg, str(reqs), str(out / f"generate-{device}"))
        rows = pq.read_table(summary.results).to_pylist()
        res[device] = {"requests": summary.requests, "failed": summary.failed, "seconds": time.perf_counter() - t0,
                       "errors": sorted({r["error"] for r in rows if r["error"]})[:3]}
    if "cuda" in res:
        res["speedup_cuda_over_cpu"] = res["cpu"]["seconds"] / max(res["cuda"]["seconds"], 1e-9)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    args = ap.parse_args()
    import torch

    from tests import trainutil as tu

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    data = tu.write_dataset(out / "data", n=32, shards=4)
    report = {"gpus": gpus, "device": torch.cuda.get_device_name(0) if gpus else None}
    if gpus < 2:
        report["note"] = f"{gpus} GPU(s): training ran on one rank; the two-rank NCCL step was not exercised"
    report["train"] = train(out, data, gpus, args.steps)
    report["generate"] = generate(out, args.requests)
    (out / "gpu_multi.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
