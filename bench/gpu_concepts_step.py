"""Real-size sampling cost of DCI and Infusion on a GPU: an SD-1.5-shaped base (random weights: no hub here).

    python bench/gpu_concepts_step.py [--steps 50] [--size 512] [--json OUT]          # needs CUDA
    python bench/gpu_concepts_step.py --device cpu --small --steps 4                  # checks the script on CPU

The base is diffusers' SD-1.5 UNet configuration (block widths 320/640/1280/1280, cross-attention 768, 16 attn2
layers), the SD VAE configuration and a 12-layer, 768-wide CLIP text encoder (vocabulary of the project's tiny
offline tokenizer, 77 positions), all in float16 on the GPU with random weights: the compute is the real model's,
the images are noise. One ICO concept (1 training step) and one Infusion concept (1 step) are trained on it so
that the processors are installed. Timed, median of ``--reps`` after a warm-up, one prompt each:

* ``ico.sample`` (plain ICO sampling, η 1, CFG 6) against ``dci.sample_dci`` (agg_time 0.3, λ 0), same steps;
* base generation (``ico.sample`` with no concept, η 0, CFG 8) against ``infusion.sample`` (F + C streams).

Prints seconds per run, milliseconds per DDIM step and the ratios (targets: DCI/plain ≤ 1.25, Infusion/base ≤ 2.1),
and peak GPU memory. ``--small`` uses a small UNet (for the CPU check only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_base(device: str, dtype, small: bool, size: int):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from training.models.kit import T2IComponents
    from training.models.tiny import build_clip_tokenizer

    torch.manual_seed(0)
    tok = build_clip_tokenizer(max_length=77)
    if small:
        unet = UNet2DConditionModel(sample_size=size // 8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                    attention_head_dim=8, norm_num_groups=16)
        vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77))
    else:
        unet = UNet2DConditionModel(sample_size=size // 8, block_out_channels=(320, 640, 1280, 1280),
                                    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    for m in (unet, vae, text):
        m.to(device, dtype).eval().requires_grad_(False)
    return T2IComponents(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched)


def _median_time(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    import numpy as np
    import torch

    from training.methods import dci, ico, infusion

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --small to check the script)")
    size = 64 if args.small else args.size
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    t2i = build_base(args.device, dtype, args.small, size)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2)]
    concept = ico.train_ico(t2i, refs, "cat", ico.IcoParams(steps=1, batch_size=1, prior_weight=0.0), seed=0,
                            device=args.device)
    inf = infusion.train_infusion(t2i, refs, "cat", infusion.InfusionParams(steps=1, batch_size=1, grad_accum=1),
                                  seed=0, device=args.device)
    prompt = f"a photo of {ico.concept_phrase(concept)} on the beach"
    n = args.steps
    plain = _median_time(lambda: ico.sample(t2i, concept, [prompt], [0], steps=n, guidance=6.0, eta=1.0,
                                            device=args.device), args.reps, sync)
    dual = _median_time(lambda: dci.sample_dci(t2i, concept, prompt, 0, dci.DciParams(steps=n, aux_nouns=("dog",)),
                                               device=args.device), args.reps, sync)
    base = _median_time(lambda: ico.sample(t2i, None, ["a photo of a cat on the beach"], [0], steps=n, guidance=8.0,
                                           eta=0.0, device=args.device), args.reps, sync)
    cust = _median_time(lambda: infusion.sample(t2i, [inf], ["a photo of a cat on the beach"], [0], steps=n,
                                                guidance=8.0, eta=0.0, device=args.device), args.reps, sync)
    out = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "base": "small" if args.small else f"SD-1.5-shaped UNet, {size}px, {dtype}",
        "steps": n,
        "ico_plain_s": plain, "dci_s": dual, "ratio_dci_over_plain": dual / plain,
        "base_s": base, "infusion_s": cust, "ratio_infusion_over_base": cust / base,
        "ms_per_step": {"plain": 1e3 * plain / n, "dci": 1e3 * dual / n, "base": 1e3 * base / n,
                        "infusion": 1e3 * cust / n},
        "peak_gpu_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if args.device.startswith("cuda") else None,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
