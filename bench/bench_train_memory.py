"""What a training row costs in memory and bytes: gradient checkpointing's activation ratio, and the cache's
bytes per row and per trainer in each dtype.

    python bench/bench_train_memory.py [--micro N]

1. Activations: the bytes autograd keeps for the backward pass of one micro-batch (``saved_tensors_hooks``: every
   tensor saved for backward, counted once per save), with ``gradient_checkpointing`` off and on, for the MLLM (the
   frozen LLM is checkpointed) and the diffusion model (the UNet's blocks). On a GPU this is the activation part of
   the peak memory; here it is counted on the CPU with the world's models.
2. The cache: bytes per row of ``cafe cache``'s features in float32 / float16 / bfloat16, measured on world rows
   (Parquet, as written) and computed for the paper's shapes (DINOv2-G tokens, CLIP-L/336 patches, SD2 VAE
   moments), and the share each trainer reads (only its columns).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the features at paper scale (per row): name → shape (SD2 at 512 px, CLIP ViT-L/14@336 px, DINOv2-G/14 at 224 px)
PAPER_SHAPES = {"latent_mean": (4, 64, 64), "latent_std": (4, 64, 64), "clip_target": (768,),
                "dino_input": (257, 1536), "vision_input": (576, 1024)}


def activations(micro: int) -> dict:
    import torch

    from pipeline.train import recipe_class
    from tests import trainutil as tu

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = tu.write_dataset(Path(tmp) / "data", n=micro)
        batch = tu.numpy_batch(data)
        llm = tu.sensitive_llama(Path(tmp) / "llm")
        for model in ("mllm", "diffusion"):
            saved = {}
            for on in (False, True):
                section = SimpleNamespace(**vars(tu.sections()[model]), gradient_checkpointing=on)
                recipe = recipe_class(model)(section, tu.roles(llm if model == "mllm" else None)).setup("cpu")
                recipe.module_train_mode(recipe.module)
                inputs = recipe.prepare(batch, 0, 0)
                total = [0]

                def pack(t, total=total):
                    total[0] += t.numel() * t.element_size()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = recipe.module(**inputs)["loss"]
                loss.backward()
                saved[on] = total[0]
            out[model] = {"off_mb": saved[False] / 2**20, "on_mb": saved[True] / 2**20,
                          "ratio": saved[True] / saved[False]}
    return out


def cache_bytes(rows: int = 16) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.train import READS, _CacheEncoder
    from tests import trainutil as tu

    out = {"world": {}, "paper": {}}
    with tempfile.TemporaryDirectory() as tmp:
        batch = tu.numpy_batch(tu.write_dataset(Path(tmp) / "data", n=rows))
        for dtype in ("float32", "float16", "bfloat16"):
            enc = _CacheEncoder(tu.roles(), -2, "cpu", dtype)(batch)
            cols = {k: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v))
                    for k, v in enc.items() if isinstance(v, np.ndarray) and v.dtype != object}
            cols.update({k: pa.array(list(v)) for k, v in enc.items() if k not in cols})
            buf = io.BytesIO()
            pq.write_table(pa.table(cols), buf, compression="zstd")
            meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
            per_col = {}
            for rg in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(rg).column(c)
                    name = col.path_in_schema.split(".")[0]
                    per_col[name] = per_col.get(name, 0) + col.total_compressed_size
            total = sum(per_col.values())
            out["world"][dtype] = {"bytes_per_row": total / rows,
                                   **{f"{m}_reads": sum(per_col.get(c, 0) for c in READS[m]["cache"]) / total
                                      for m in ("mllm", "diffusion")}}
    for dtype, size in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        per = {k: int(np.prod(s)) * size for k, s in PAPER_SHAPES.items()}
        total = sum(per.values())
        out["paper"][dtype] = {"mb_per_row": total / 2**20, "tb_for_355k_rows": total * 355_000 / 1e12,
                               **{f"{m}_reads": sum(per.get(c, 0) for c in READS[m]["cache"]) / total
                                  for m in ("mllm", "diffusion")}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", type=int, default=8)
    args = ap.parse_args()
    import platform

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    for model, r in activations(args.micro).items():
        print(f"activations kept for backward, {model}, micro-batch {args.micro}: {r['off_mb']:.1f} MB without "
              f"checkpointing, {r['on_mb']:.1f} MB with: ratio {r['ratio']:.3f}")
    c = cache_bytes()
    for scope, rows in c.items():
        for dtype, r in rows.items():
            size = f"{r['bytes_per_row'] / 1024:.1f} KB/row (Parquet, zstd)" if scope == "world" else \
                f"{r['mb_per_row']:.2f} MB/row, {r['tb_for_355k_rows']:.2f} TB for 355 K rows"
            print(f"cache, {scope}, {dtype}: {size}; the diffusion trainer reads {r['diffusion_reads']:.0%}, "
                  f"the MLLM {r['mllm_reads']:.0%}")
    w, p = c["world"], c["paper"]
    print(f"ratios: bfloat16 / float32 bytes per row: world {w['bfloat16']['bytes_per_row'] / w['float32']['bytes_per_row']:.3f}, "
          f"paper {p['bfloat16']['mb_per_row'] / p['float32']['mb_per_row']:.3f}")


if __name__ == "__main__":
    main()
