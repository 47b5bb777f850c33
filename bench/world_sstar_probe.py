"""Can one pseudo-word carry a world identity? Textual inversion of S* straight into the world t2i (no PromptNet).

    python bench/world_sstar_probe.py [--sources 12] [--steps 300] [--lr 5e-3] [--padding max_length]

For N training identities (one source image each), optimise one token embedding S* (initialised from the class
word's embedding) so that the frozen world t2i denoises the image under "a photo of holder" (S* in the holder
slot); then sample "a holder {phrase}" for 4 phrases (classifier-free guidance, the t2i's DDIM) and let the oracle
read identity (class, colour, mark) and the instruction. This bounds what PromptNet can reach through the text
pathway: if an S* optimised per image cannot keep identity, no PromptNet can.

Writes ``bench/results/world_sstar_probe.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHRASES = ["on the left", "in large size", "on a striped background", "in outline style"]
ATTR = {"on the left": ("position", "left"), "in large size": ("size", "large"),
        "on a striped background": ("background", "striped"), "in outline style": ("style", "outline")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=12)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=2.5)
    ap.add_argument("--padding", choices=["none", "max_length"], default="max_length")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_sstar_probe.json"))
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from pipeline.config import load_config
    from training.methods.profusion import ProFusionGenerator
    from training.models.kit import load_from_config
    from training.world import domain as D
    from training.world.oracle import load_oracle

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = load_config(str(ROOT / "configs/tiny.yaml"))
    t2i = load_from_config(cfg.models, "t2i")
    pn = load_from_config(cfg.models, "promptnet")
    gen = ProFusionGenerator(t2i.components, pn.components, cfg.build.profusion)
    unet, sched = gen.unet, gen.scheduler
    for p in list(unet.parameters()) + list(gen.text_encoder.parameters()):
        p.requires_grad_(False)
    emb_table = gen.text_encoder.get_input_embeddings().weight
    from world_round0_identity import training_sources  # bench/ is on sys.path as the script's folder

    files = training_sources(args.sources)
    oracle = load_oracle(ROOT / "models/world/oracle")
    instances = {i.id: i for i in D.all_instances()}
    pad = args.padding == "max_length"
    ident, instr, final_losses = [], [], []
    t0 = time.perf_counter()
    for k, f in enumerate(files):
        src = np.asarray(Image.open(f).convert("RGB"))
        inst = instances[f.name.split("__")[0]]
        with torch.no_grad():
            latent = gen._encode_latents(gen._to_tensor([src]), None).float()  # (1, 4, h, w)
        cls_id = gen.tokenizer(inst.cls, add_special_tokens=False).input_ids[0]
        s_star = torch.nn.Parameter(emb_table[cls_id].detach().clone().float()[None, None])  # (1, 1, D)
        opt = torch.optim.Adam([s_star], lr=args.lr)
        g = torch.Generator().manual_seed(k)
        losses = []
        for _ in range(args.steps):
            noise = torch.randn((args.batch, *latent.shape[1:]), generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
            z_t = sched.add_noise(latent.expand(args.batch, -1, -1, -1), noise, t)
            hidden = gen.encode(["a photo of holder"] * args.batch, s_star.expand(args.batch, -1, -1), pad=pad)
            out = unet(z_t, t, encoder_hidden_states=hidden).sample
            target = noise if gen.prediction_type == "epsilon" else sched.get_velocity(latent, noise, t)
            loss = F.mse_loss(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        final_losses.append(float(np.mean(losses[-50:])))
        with torch.no_grad():
            b = len(PHRASES)
            cond = gen.encode([f"a holder {p}" for p in PHRASES], s_star.detach().expand(b, -1, -1))
            uncond = gen.encode([""] * b)
            x = torch.stack([torch.randn(latent.shape[1:], generator=torch.Generator().manual_seed(1000 * k + j))
                             for j in range(b)]) * sched.init_noise_sigma
            sched.set_timesteps(20)
            for t in sched.timesteps:
                u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                x = sched.step(u + args.guidance * (c - u), t, x).prev_sample
            imgs = ((gen.vae.decode(x / gen.scaling).sample.float() + 1) / 2).clamp(0, 1)
            imgs = (imgs * 255).round().byte().permute(0, 2, 3, 1).numpy()
        read = oracle.predict_names(imgs)
        want = inst.labels()
        for j, p in enumerate(PHRASES):
            ident.append(all(read[a][j] == want[a] for a in D.IDENTITY_ATTRIBUTES))
            attr, value = ATTR[p]
            instr.append(read[attr][j] == value)
        print(f"{f.name}: loss {final_losses[-1]:.4f}, identity {sum(ident[-b:])}/{b}, "
              f"read {[read[a][0] for a in D.IDENTITY_ATTRIBUTES]} want {[want[a] for a in D.IDENTITY_ATTRIBUTES]}",
              flush=True)
    n = len(ident)
    p_id, p_in = float(np.mean(ident)), float(np.mean(instr))
    res = {"args": vars(args), "identity": [p_id, math.sqrt(p_id * (1 - p_id) / n)],
           "instruction": [p_in, math.sqrt(p_in * (1 - p_in) / n)], "n": n, "final_loss": final_losses,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({k: v for k, v in res.items() if k != "final_loss"}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
