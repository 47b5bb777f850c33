"""EM concept masks: what DenseCRF costs at the paper's resolution, and what attention capture costs a step.

    python bench/bench_em.py [--repeats 3]

1. DenseCRF (``training.methods.em.crf_labels``: pydensecrf, CutLER's parameters, 10 iterations) on a 512×512
   image for K = 2 and K = 4 token labels (+ background), from 16×16 maps: seconds per call (median of repeats).
   With ``reestimate_every: 1`` (seed 003) a 400-step stage 2 runs it 400 times per image.
2. A stage-2 training step (masked diffusion + attention loss, backward to the tokens) with capture on (the
   EM processor on every attn2) vs the same step with capture off (the UNet's own SDPA processors, masked diffusion
   loss only): the ratio (target ≤ 1.15), on the world's t2i and on an SD-shaped UNet at 64×64 latents with
   random weights (one step each; no hub weights here).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.attention.em import AttentionStore, capturing  # noqa: E402
from training.methods.em import EmParams, attention_loss, crf_labels, label_probabilities, masked_diffusion_loss  # noqa: E402


def bench_crf(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    image = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    out = {}
    for k in (2, 4):
        maps = (rng.random((k, 16, 16)) > 0.7).astype(np.float32)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            crf_labels(image, label_probabilities(maps, (512, 512)), EmParams())
            times.append(time.perf_counter() - t0)
        out[k] = statistics.median(times)
    return out


def _step(unet, ctx, cols, res, capture: bool, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    z = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    target = torch.randn(z.shape, generator=g)
    mask = torch.ones(1, 1, size, size)
    rows = torch.nn.Parameter(ctx.clone())
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        store = AttentionStore()
        if capture:
            with capturing(unet, store):
                pred = unet(z, torch.tensor([500]), encoder_hidden_states=rows).sample
        else:
            pred = unet(z, torch.tensor([500]), encoder_hidden_states=rows).sample
        loss = masked_diffusion_loss(pred, target, mask)
        if capture:
            agg = store.aggregate(res)
            loss = loss + 0.01 * attention_loss([agg[0, :, :, c] for c in cols], [torch.ones(res, res)] * len(cols), 1)
        torch.autograd.grad(loss, [rows])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_capture(repeats: int) -> list[tuple[str, float, float]]:
    from diffusers import UNet2DConditionModel

    from training.models.kit import load_role

    rows = []
    world = load_role("t2i", ROOT / "models/world/t2i", dtype="float32").components
    ctx = world.text_encoder(world.tokenizer(["a photo of a star and a heart"], padding="max_length",
                                             return_tensors="pt").input_ids)[0].detach()
    world.unet.requires_grad_(False)
    off = _step(world.unet, ctx, [4, 7], 8, False, repeats)
    on = _step(world.unet, ctx, [4, 7], 8, True, repeats)
    rows.append(("world t2i (8×8 latents)", off, on))
    sd = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                              use_linear_projection=True, block_out_channels=(320, 640, 1280, 1280)).eval()
    sd.requires_grad_(False)
    ctx = torch.randn(1, 77, 1024)
    off = _step(sd, ctx, [5, 8], 16, False, max(1, repeats // 3))
    on = _step(sd, ctx, [5, 8], 16, True, max(1, repeats // 3))
    rows.append(("SD2-shaped UNet (64×64 latents, random weights)", off, on))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    crf = bench_crf(args.repeats)
    print("DenseCRF at 512×512 (10 iterations, CutLER's parameters):")
    for k, s in crf.items():
        print(f"  K = {k}: {s:.2f} s per call")
    print("stage-2 step (forward + backward to the tokens), capture off vs on:")
    for name, off, on in bench_capture(args.repeats):
        print(f"  {name}: off {off:.3f} s, on {on:.3f} s, ratio {on / off:.2f}")


if __name__ == "__main__":
    main()
