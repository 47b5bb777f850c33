"""Diagnostic on a GPU: can the conditioned diffusion model keep identity (DINO stream) and follow the instruction
(CLIP stream) when round-0 data are ideal and training is long enough?

    python bench/world_conditioned_gpu.py [OUT_JSON] [--steps 6000] [--rows 4096]

Ideal round-0 pairs are rendered from the world's ground truth: an instance in context A as input, and the same
instance with the instruction applied as the target, training split only. The conditioned UNet (`DiffusionRecipe`)
trains with plain AdamW: fp32 weights under bf16 autocast, features encoded once. Every `--eval-every` steps the
direct mode runs on the world's eval set: CLIP of the world t2i's image for the instruction, DINO of the reference,
132 prompts × 2 seeds, judged by the oracle. No Ray, no DeepSpeed, no pyarrow: a device-only study.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ideal_batch(n: int, seed: int = 0) -> dict:
    import numpy as np

    from training.data import schema
    from training.world.assistant_eval import ideal_pairs

    ids, xs, ys = [], [], []
    for _, _, x, y in ideal_pairs(n, seed):
        xs.append(x)
        ys.append(y)
        ids.append(f"ideal{len(ids):06d}")
    return {schema.ID: np.array(ids, dtype=object), schema.INPUT_IMAGE: np.array(xs), schema.TARGET_IMAGE: np.array(ys)}


def main() -> None:
    import numpy as np
    import torch

    from tests import trainutil as tu
    from training.assistant import Assistant
    from training.encoders import FEATURES
    from training.trainers.base import load
    from training.trainers.diffusion import DiffusionRecipe
    from training.world import domain as D
    from training.world.assistant_eval import eval_rows
    from training.world.oracle import load_oracle
    from training.world.t2i import generate

    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=2000)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    roles = tu.roles()
    recipe = DiffusionRecipe(SimpleNamespace(n_clip_tokens=1, drop_clip=0.1, drop_dino=0.1), roles).setup(dev)
    data = ideal_batch(a.rows)
    feats = {k: [] for k in ("latent_mean", "latent_std", "clip_target", "dino_input")}
    for s in range(0, a.rows, 256):
        f = recipe.encoders.encode(list(data["input_image"][s:s + 256]), list(data["target_image"][s:s + 256]),
                                   tuple(feats))
        for k in feats:
            feats[k].append(f[k])
    feats = {k: torch.cat(v).numpy() for k, v in feats.items()}
    print(f"data + features: {a.rows} rows in {time.time() - t0:.0f} s", flush=True)
    params = [p for p in recipe.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    oracle = load_oracle(ROOT / "models" / "world" / "oracle", device=dev)
    t2i = load("t2i", roles["t2i"], dev)
    rows = eval_rows(ROOT / "models" / "world" / "eval")
    refs = [r["image"] for r in rows]
    prompts = [f"a {r['class']} {r['phrase']}" for r in rows]
    instances = {i.id: i for i in D.all_instances()}
    results = {"rows": a.rows, "batch": a.batch, "lr": a.lr, "device": torch.cuda.get_device_name(0) if dev == "cuda"
               else "cpu", "evals": []}
    gen = torch.Generator().manual_seed(0)

    def evaluate(step: int) -> None:
        assistant = Assistant(recipe.module.model, recipe.encoders, t2i.components.vae, t2i.components.scheduler,
                              None, dev)
        recipe.module.eval()
        out = {"step": step}
        for scale in (1.0, 2.0):
            ident, instr = [], []
            for seed in (0, 1):
                with torch.no_grad():
                    t2i_images = generate(t2i.components, prompts, [seed * 100_003 + i for i in range(len(rows))], 20)
                    clip = recipe.encoders.clip_embed(torch.from_numpy(np.stack(t2i_images)).permute(0, 3, 1, 2).float()
                                                      / 255)
                    dino = recipe.encoders.dino_tokens(torch.from_numpy(np.stack(refs)).permute(0, 3, 1, 2).float() / 255)
                    images = assistant.sample(clip, dino, [seed] * len(rows), 20, 2.5, scale)
                read = oracle.predict_names(np.stack(images))
                for i, r in enumerate(rows):
                    lab = instances[r["subject"]].labels()
                    ident.append(all(read[k][i] == lab[k] for k in D.IDENTITY_ATTRIBUTES))
                    instr.append(read[r["attribute"]][i] == r["value"])
            out[f"scale_dino_{scale:g}"] = {"identity": float(np.mean(ident)), "instruction": float(np.mean(instr)),
                                            "both": float(np.mean(np.array(ident) & np.array(instr))), "n": len(ident)}
        out["seconds"] = round(time.time() - t0, 1)
        results["evals"].append(out)
        print(json.dumps(out), flush=True)
        recipe.module.train()

    recipe.module.train()
    losses = []
    for step in range(1, a.steps + 1):
        idx = torch.randint(a.rows, (a.batch,), generator=gen).numpy()
        batch = {"id": data["id"][idx], **{k: v[idx] for k, v in feats.items()}}
        inputs = recipe.prepare(batch, step, 0)  # the step as "epoch": fresh draws every step
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = recipe.module(**inputs)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 500 == 0:
            print(f"step {step} loss {np.mean(losses[-500:]):.4f} {time.time() - t0:.0f} s", flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            evaluate(step)
    results["loss_per_500"] = [round(float(np.mean(losses[i:i + 500])), 4) for i in range(0, len(losses), 500)]
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
