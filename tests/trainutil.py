"""Helpers for the training tests: a small dataset in the build's published schema, made from world images,
and a single-process DeepSpeed setup (gloo over a file store: nothing listens on a port)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

WORLD = Path(__file__).resolve().parents[1] / "models" / "world"
PHRASES = ["on the left", "on the right", "in small size", "in outline style"]


def world_pairs(n: int, seed: int = 0):
    """n (id, input png, target png, user text, response) rows from world source images."""
    files = sorted((WORLD / "sources").rglob("*.png"))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(len(files), 2, replace=False)
        cls = files[a].parent.name
        phrase = PHRASES[i % len(PHRASES)]
        rows.append({"id": f"row{i:04d}", "input": files[a].read_bytes(), "target": files[b].read_bytes(),
                     "user": f"Can you generate an image for this {cls} {phrase}?",
                     "response": f"Here is the {cls} {phrase}."})
    return rows


def write_dataset(out: Path, n: int, seed: int = 0, shards: int = 1) -> Path:
    """``out/dataset/data/train-*.parquet`` in the published schema (the columns trainers read + ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data import schema

    rows = world_pairs(n, seed)
    data = out / "dataset" / "data"
    data.mkdir(parents=True, exist_ok=True)
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for s in range(shards):
        part = rows[s::shards]
        table = pa.table({
            schema.ID: [r["id"] for r in part],
            schema.CLASS: [r["user"].split()[-4] for r in part],
            schema.INSTRUCTION: ["x"] * len(part),
            schema.INPUT_IMAGE: pa.array([{"bytes": r["input"], "path": None} for r in part], type=img),
            schema.TARGET_IMAGE: pa.array([{"bytes": r["target"], "path": None} for r in part], type=img),
            schema.USER_TEXT: [r["user"] for r in part],
            schema.ASSISTANT_TEXT: [r["response"] for r in part],
        })
        pq.write_table(table, data / f"train-{s:06d}.parquet")
    return out


def numpy_batch(out: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((out / "dataset" / "data").glob("*.parquet")))
    return {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}


def roles(llm: str | None = None) -> dict:
    from training.trainers.base import RoleRef

    refs = {r: RoleRef(str(WORLD / r)) for r in ("t2i", "clip_cond", "dino_cond", "llm", "promptnet")}
    if llm:
        refs["llm"] = RoleRef(llm)
    return refs


def sections():
    return {"diffusion": SimpleNamespace(n_clip_tokens=1, drop_clip=0.1, drop_dino=0.1),
            "mllm": SimpleNamespace(lam=1.0, select_layer=-2),
            "promptnet": SimpleNamespace(prompt="A photo of holder")}


def init_single_process(tmp: Path) -> None:
    """One gloo rank over a file store, then DeepSpeed's init reuses the group."""
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def ds_config(micro: int, lr: float, stage: int = 2, warmup: int = 1) -> dict:
    from training.trainers import engine

    base = json.loads((Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    return engine.deepspeed_config(base, micro_batch=micro, accumulation=1, world_size=1, lr=lr, weight_decay=0.0,
                                   warmup_steps=warmup, grad_clip=1.0, bf16=False)


def sensitive_llama(out: Path, init_std: float = 0.4) -> str:
    """A random tiny Llama whose outputs depend on its inputs (a larger init than the world's near-uniform one),
    written in the llm layout with the world tokenizer: the MLLM's image tokens can steer it."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((WORLD / "llm" / "config.json").read_text())
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version",
                                                                       "dtype")})
    config.initializer_range = init_std
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (WORLD / "llm" / f).exists():
            shutil.copy(WORLD / "llm" / f, out / f)
    return str(out)


def reduce_rank(rank: int, world: int, store: str, out) -> None:
    """One gloo rank of a two-process test: rank r contributes {"loss": r + 1, "mse": 10·(r + 1)}."""
    import torch
    import torch.distributed as dist

    from training.trainers.engine import mean_over_ranks

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out.put((rank, mean_over_ranks({"loss": rank + 1.0, "mse": 10.0 * (rank + 1)}, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()
