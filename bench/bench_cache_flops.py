"""Where the embedding cache pays: FLOPs per training row, the frozen encoders against the training step, at the
synthetic world's sizes and at the paper's (counted, not timed), next to a measured epoch speed-up on the world.

Usage::

    python bench/bench_cache_flops.py                  # counts (seconds) + the measured world epoch (≈ 1 min)
    python bench/bench_cache_flops.py --no-measure     # counts only
    python bench/bench_cache_flops.py --measure-paper  # + paper-scale seconds on this machine (~15 GB, minutes)
    python bench/bench_cache_flops.py --json OUT.json

Why: ``bench/bench_train.py`` measures the cache's epoch speed-up on the world's tiny models, where the encoders are
a quarter of the step; that figure says nothing about the paper's models. No paper-scale weights can exist here,
and on 2 CPU cores a paper-scale step takes minutes, so this script *counts* the work instead:
``torch.utils.flop_counter.FlopCounterMode`` over the real library classes built on the ``meta`` device (shapes
only, no memory, no weights: the FLOPs of a random model are those of the real one). Counted per row:

* **encoders** (what ``cafe cache`` computes once and an uncached epoch recomputes every time), as
  :class:`training.encoders.ConditionEncoders` runs them: VAE ``encode`` of the target y, ``clip_cond`` image
  embedding of y, ``dino_cond`` patch tokens of the input x; for the MLLM, ``clip_cond``'s hidden states of x;
* **diffusion step**: forward + backward of :class:`training.models.conditioned.ConditionedUNet` (the recipe's
  model: the whole UNet trains, SPEC §2) on one row, v/ε MSE; also the variant where only the conditioner trains
  (UNet frozen: no weight gradients for it; not the paper's recipe, shown for the trade-off);
* **MLLM step**: forward + backward of the frozen LLM over (image tokens, a 40-token prompt + response, the query
  token), weight gradients only for V/H/token (the LLM's activation gradients are still computed).

The predicted speed-up is (encoders + step) / step: what caching saves if time follows FLOPs. What FLOPs leave out
(elementwise ops, norms, image decoding and resizing, the optimiser update, data loading) is why the world's
*measured* speed-up (``--measure``: :func:`bench_train.bench_epoch`, same process) is printed beside its count.

Configurations (random weights; the classes and shapes of the checkpoints ``configs/paper.yaml`` names):
SD2-base UNet (865.9 M parameters, 64×64 latents) and VAE (512 px), CLIP ViT-L/14@336 with a 768-d projection,
DINOv2-giant/14 at 224 px (1.14 B), Llama-2-13B with 576 image tokens (LLaVA-1.5's 24×24 patches at 336 px).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _benchutil as U  # noqa: E402

TEXT_TOKENS = 40  # prompt + response tokens of one MLLM row (the world's dialogues are 30-45 tokens)


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def paper_models(device: str = "meta", llm: bool = True):
    """SD2-base UNet + VAE, CLIP ViT-L/14@336 (+ projection), DINOv2-giant, Llama-2-13B: on the meta device (or
    materialised with random weights on ``device``, without the LLM)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model,
                              LlamaConfig, LlamaForCausalLM)

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
            patch_size=14, projection_dim=768))
        dino = Dinov2Model(Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                                        use_swiglu_ffn=True, image_size=518, patch_size=14))
        llm = LlamaForCausalLM(LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                           num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)) \
            if llm else None
    return {"name": "paper scale", "unet": unet, "vae": vae, "clip": clip, "dino": dino, "llm": llm,
            "image": 512, "clip_px": 336, "dino_px": 224}


def world_models(world: Path):
    """The synthetic world's roles (``models/world``), built from their own config files on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model,
                              LlamaConfig, LlamaForCausalLM)

    from training.world import domain as D

    def px(role: str) -> int:
        p = json.loads((world / role / "preprocessor_config.json").read_text())
        return int((p.get("crop_size") if p.get("do_center_crop") else p["size"])["height"])

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(world / "t2i" / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(world / "t2i" / "vae"))
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(world / "clip_cond"))
        dino = Dinov2Model(Dinov2Config.from_pretrained(world / "dino_cond"))
        llm = LlamaForCausalLM(LlamaConfig.from_pretrained(world / "llm"))
    return {"name": "synthetic world", "unet": unet, "vae": vae, "clip": clip, "dino": dino, "llm": llm,
            "image": D.IMAGE_SIZE, "clip_px": px("clip_cond"), "dino_px": px("dino_cond")}


def count(m: dict) -> dict:
    """FLOPs per row of every piece (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from training.models.conditioned import ConditionedUNet

    meta = lambda *shape: torch.randn(*shape, device="meta")  # noqa: E731
    clip, dino, vae, llm = m["clip"], m["dino"], m["vae"], m["llm"]
    out = {"name": m["name"]}
    with torch.no_grad():
        out["enc_vae"] = _count(lambda: vae.encode(meta(1, 3, m["image"], m["image"])).latent_dist.mean)
        out["enc_clip"] = _count(lambda: clip(pixel_values=meta(1, 3, m["clip_px"], m["clip_px"])).image_embeds)
        out["enc_dino"] = _count(lambda: dino(pixel_values=meta(1, 3, m["dino_px"], m["dino_px"])).last_hidden_state)
        out["enc_vision"] = _count(lambda: clip.vision_model(pixel_values=meta(1, 3, m["clip_px"], m["clip_px"]),
                                                             output_hidden_states=True).hidden_states[-2])
    n_dino = (m["dino_px"] // dino.config.patch_size) ** 2 + 1
    n_img = (m["clip_px"] // clip.config.patch_size) ** 2
    with torch.device("meta"):  # the new layers (projections, DINO k/v) on the meta device too
        model = ConditionedUNet.from_unet(m["unet"], clip.config.projection_dim, dino.config.hidden_size)
    lat = m["image"] // 2 ** (len(vae.config.block_out_channels) - 1)
    c = m["unet"].config.in_channels

    def step():
        pred = model(meta(1, c, lat, lat), torch.tensor([500], device="meta"), meta(1, clip.config.projection_dim),
                     meta(1, n_dino, dino.config.hidden_size))
        F.mse_loss(pred, meta(*pred.shape)).backward()

    model.requires_grad_(True)
    out["step_full"] = _count(step)
    model.requires_grad_(False)
    for name in ("clip_proj", "clip_norm", "dino_proj"):
        getattr(model, name).requires_grad_(True)
    for proc in model.dual_processors().values():
        proc.requires_grad_(True)
    out["step_conditioner"] = _count(step)

    hidden = llm.config.hidden_size
    llm.requires_grad_(False)
    v = torch.nn.Linear(clip.config.hidden_size, hidden, device="meta")
    h = torch.nn.Linear(hidden, clip.config.projection_dim, device="meta")

    def mllm_step():
        seq = torch.cat([v(meta(1, n_img, clip.config.hidden_size)), meta(1, TEXT_TOKENS + 1, hidden)], dim=1)
        o = llm(inputs_embeds=seq, output_hidden_states=True)
        (o.logits.float().mean() + h(o.hidden_states[-1][:, -1]).pow(2).mean()).backward()

    out["step_mllm"] = _count(mllm_step)
    out["params_unet"] = sum(p.numel() for p in m["unet"].parameters())
    enc = out["enc_vae"] + out["enc_clip"] + out["enc_dino"]
    out["enc_diffusion"] = enc
    out["speedup_full"] = (enc + out["step_full"]) / out["step_full"]
    out["speedup_conditioner"] = (enc + out["step_conditioner"]) / out["step_conditioner"]
    out["speedup_mllm"] = (out["enc_vision"] + out["step_mllm"]) / out["step_mllm"]
    return out


def measure_world(reps: int, rows: int) -> dict:
    """The measured cached / uncached epoch on the world (``bench_train.bench_epoch``, micro-batch 16)."""
    import bench_train as BT

    with tempfile.TemporaryDirectory(prefix="cafe-bench-flops-") as tmp:
        ep = BT.bench_epoch(Path(tmp), reps, rows)
    return {"uncached_s": ep["u"], "cached_s": ep["c"], "speedup": ep["u"] / ep["c"], "others": ep["others"],
            "rows": rows, "reps": reps}


def measure_paper(reps: int) -> dict:
    """Seconds per row at paper scale on this machine (random weights, float32, batch 1): the three encoders
    (``torch.no_grad``) against forward + backward of the conditioned SD2 UNet, whole UNet trainable; the optimiser
    update is left out (at the paper's batch of 64 its cost per row is small). Medians of ``reps`` after one
    warm-up call each."""
    import gc
    import statistics

    import torch
    import torch.nn.functional as F

    from training.models.conditioned import ConditionedUNet

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t0 = time.perf_counter()
    m = paper_models("cpu", llm=False)
    for k in ("unet", "vae", "clip", "dino"):
        m[k].eval()
    built = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, 512, 512, generator=g) * 2 - 1
    out = {"built_s": built}
    with torch.no_grad():
        out["enc_vae_s"] = timed(lambda: m["vae"].encode(y).latent_dist.mean)
        out["enc_clip_s"] = timed(lambda: m["clip"](pixel_values=torch.randn(1, 3, 336, 336, generator=g)).image_embeds)
        out["enc_dino_s"] = timed(lambda: m["dino"](pixel_values=torch.randn(1, 3, 224, 224, generator=g)).last_hidden_state)
    clip_dim, dino_width = m["clip"].config.projection_dim, m["dino"].config.hidden_size
    del m["vae"], m["clip"], m["dino"]
    gc.collect()
    model = ConditionedUNet.from_unet(m.pop("unet"), clip_dim, dino_width).float().requires_grad_(True)

    def step():
        pred = model(torch.randn(1, 4, 64, 64, generator=g), torch.tensor([500]), torch.randn(1, clip_dim, generator=g),
                     torch.randn(1, 257, dino_width, generator=g))
        F.mse_loss(pred, torch.randn(pred.shape, generator=g)).backward()
        model.zero_grad(set_to_none=True)

    out["step_s"] = timed(step)
    out["enc_s"] = out["enc_vae_s"] + out["enc_clip_s"] + out["enc_dino_s"]
    out["speedup"] = (out["enc_s"] + out["step_s"]) / out["step_s"]
    out["reps"] = reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-measure", action="store_true", help="counts only (skip the measured world epoch)")
    ap.add_argument("--reps", type=int, default=3, help="epochs of each kind in the world measurement")
    ap.add_argument("--rows", type=int, default=64, help="rows of the world measurement's epoch")
    ap.add_argument("--measure-paper", action="store_true",
                    help="also time the paper-scale encoders and step on this machine (float32, batch 1; ~15 GB RAM, "
                    "several minutes on 2 cores)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    U.quiet_libraries()
    U.header("bench_cache_flops: encoder vs training-step FLOPs per row (meta device), world and paper scale")
    t0 = time.perf_counter()
    res = [count(world_models(ROOT / "models" / "world")), count(paper_models())]
    print(f"counted in {time.perf_counter() - t0:.1f} s")
    tf = lambda x: f"{x / 1e9:.3f} GF" if x < 1e11 else f"{x / 1e12:.2f} TF"  # noqa: E731
    rows = []
    for key, label in [("enc_vae", "VAE encode of y"), ("enc_clip", "clip_cond embedding of y"),
                       ("enc_dino", "dino_cond tokens of x"), ("enc_diffusion", "diffusion encoders, total"),
                       ("step_full", "diffusion step, whole UNet trains (SPEC)"),
                       ("step_conditioner", "diffusion step, conditioner only"),
                       ("enc_vision", "MLLM vision features of x"), ("step_mllm", "MLLM step (frozen LLM)")]:
        rows.append([label] + [tf(r[key]) for r in res])
    for key, label in [("speedup_full", "predicted cache speed-up, diffusion (SPEC recipe)"),
                       ("speedup_conditioner", "predicted cache speed-up, diffusion (conditioner only)"),
                       ("speedup_mllm", "predicted cache speed-up, MLLM")]:
        rows.append([label] + [f"{r[key]:.2f}" for r in res])
    report = {"counts": res}
    if not args.no_measure:
        meas = measure_world(args.reps, args.rows)
        report["world_measured"] = meas
        rows.append(["measured cache speed-up, diffusion (world epoch)", f"{meas['speedup']:.2f}", "—"])
    if args.measure_paper:
        mp = measure_paper(args.reps)
        report["paper_measured"] = mp
        rows.append(["measured s/row here: encoders / step (paper: float32, batch 1)", "—",
                     f"{mp['enc_s']:.1f} / {mp['step_s']:.1f}"])
        rows.append(["measured cache speed-up, diffusion (paper scale, this machine)", "—", f"{mp['speedup']:.2f}"])
    print()
    print(U.table(["per training row", res[0]["name"], res[1]["name"]], rows))
    w, p = res
    print(f"RESULT  predicted diffusion cache speed-up (FLOPs): world {w['speedup_full']:.2f}, paper scale "
          f"{p['speedup_full']:.2f} (whole UNet trains), {p['speedup_conditioner']:.2f} (conditioner only); "
          f"MLLM {p['speedup_mllm']:.3f} at paper scale; target >= 2.0")
    if "world_measured" in report:
        m = report["world_measured"]
        print(f"RESULT  measured world epoch uncached / cached = {m['speedup']:.2f} ({m['uncached_s']:.2f} vs "
              f"{m['cached_s']:.2f} s, medians of {m['reps']}; other processes {m['others']:.2f} CPUs at most)")
    if "paper_measured" in report:
        m = report["paper_measured"]
        print(f"RESULT  measured at paper scale on this machine: encoders {m['enc_s']:.1f} s (VAE {m['enc_vae_s']:.1f}, "
              f"CLIP {m['enc_clip_s']:.1f}, DINO {m['enc_dino_s']:.1f}) vs step {m['step_s']:.1f} s per row -> "
              f"speed-up {m['speedup']:.2f} (medians of {m['reps']})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
