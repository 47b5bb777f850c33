"""One bf16 training step of each CAFE model on a GPU through DeepSpeed (ZeRO-2, one rank), then a few more timed.

    python bench/gpu_train_step.py [OUT_JSON]

Prints per model: the loss (finite?), the module's dtype under DeepSpeed bf16, the dtype of the optimizer's
master copy of the trained weights (must be float32), step time and peak GPU memory. ``tests/test_train_gpu.py``
runs it under the ``gpu`` marker. Needs CUDA; the world models in models/world; no Ray.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def master_dtype(engine) -> str | None:
    opt = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        groups = getattr(opt, name, None)
        if groups:
            return str(groups[0].dtype).replace("torch.", "")
    return None


def run(steps: int = 5) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import torch.distributed as dist

    import numpy as np

    from tests import trainutil as tu
    from training.data import schema
    from training.trainers.diffusion import DiffusionRecipe
    from training.trainers.mllm import MLLMRecipe
    from training.trainers.promptnet import PromptNetRecipe

    classes = {"diffusion": DiffusionRecipe, "mllm": MLLMRecipe, "promptnet": PromptNetRecipe}
    from training.trainers import engine

    tmp = Path(tempfile.mkdtemp(prefix="gpu-step-"))
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    rows = tu.world_pairs(8)  # the published dataset's columns, without pyarrow
    batch = {schema.ID: np.array([r["id"] for r in rows], dtype=object),
             schema.INPUT_IMAGE: np.array([{"bytes": r["input"], "path": None} for r in rows], dtype=object),
             schema.TARGET_IMAGE: np.array([{"bytes": r["target"], "path": None} for r in rows], dtype=object),
             schema.USER_TEXT: np.array([r["user"] for r in rows], dtype=object),
             schema.ASSISTANT_TEXT: np.array([r["response"] for r in rows], dtype=object)}
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    for model in ("diffusion", "mllm", "promptnet"):
        torch.cuda.reset_peak_memory_stats()
        recipe = classes[model](tu.sections()[model], tu.roles()).setup("cuda")
        base = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
        cfg = engine.deepspeed_config(base, micro_batch=8, accumulation=1, world_size=1, lr=1e-4, weight_decay=0.0,
                                      warmup_steps=1, grad_clip=1.0, bf16=True)
        eng, _ = engine.initialize(recipe, cfg)
        losses, times = [], []
        for i in range(1 + steps):
            inputs = recipe.prepare(batch, i, 0)
            inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                      for k, v in inputs.items()}
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = eng(**inputs)
            eng.backward(out["loss"])
            eng.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(out["loss"]))
        trained = [p for p in eng.module.parameters() if p.requires_grad]
        results[model] = {
            "losses": [round(x, 5) for x in losses], "finite": all(map(lambda x: x == x and abs(x) < 1e9, losses)),
            "module_dtype": str(trained[0].dtype).replace("torch.", ""), "master_dtype": master_dtype(eng),
            "first_step_ms": round(times[0] * 1e3, 1),
            "step_ms_median": round(sorted(times[1:])[len(times[1:]) // 2] * 1e3, 1),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        }
        print(model, results[model], flush=True)
        del eng, recipe
        torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    res = run()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
