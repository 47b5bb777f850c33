"""CAFE assistant inference (SPEC §2 "Inference"): image x + user text → MLLM → (response, predicted CLIP
embedding) → conditioned diffusion with (that embedding, DINO patches of x) → image.

Usage::

    assistant = Assistant.load(roles, mllm_dir="outputs/train/mllm", diffusion_dir="outputs/train/diffusion")
    out = assistant.generate(image, "Can you generate an image for this circle on the left?", seed=0)
    out.response, out.image                                    # str, (H, W, 3) uint8
    assistant.generate(image, "", seed=0, clip_image=other)    # direct mode: CLIP of `other` replaces the MLLM

Sampling: the t2i role's scheduler (DDIM), classifier-free guidance with one scale on (both conditions) vs
(neither: zero inputs, the null condition the model was trained with), the DINO stream scaled by ``scale_dino``;
each request draws its initial latent from its own generator seeded by its seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from training.encoders import ConditionEncoders, images_to_tensor
from training.models.conditioned import ConditionedUNet
from training.models.mllm import CafeMLLM


@dataclass
class Generation:
    response: str
    image: np.ndarray
    clip_source: str  # "mllm" or "image"


class Assistant:
    def __init__(self, diffusion: ConditionedUNet, encoders: ConditionEncoders, vae, scheduler,
                 mllm: CafeMLLM | None = None, device: str = "cpu", max_new_tokens: int = 48):
        self.diffusion, self.encoders, self.vae, self.scheduler = diffusion, encoders, vae, scheduler
        self.mllm, self.device, self.max_new_tokens = mllm, torch.device(device), max_new_tokens
        self.scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")

    @classmethod
    def load(cls, roles: dict, mllm_dir: str | None, diffusion_dir: str, device: str = "cpu",
             max_new_tokens: int = 48) -> "Assistant":
        """``roles``: role → :class:`training.trainers.base.RoleRef` (t2i, clip_cond, dino_cond, llm)."""
        import json
        from pathlib import Path

        from training.trainers.base import load, load_encoders

        select_layer = -2
        if mllm_dir is not None:
            select_layer = json.loads((Path(mllm_dir) / "mllm.json").read_text()).get("select_layer", -2)
        t2i = load("t2i", roles["t2i"], device)
        enc = load_encoders(roles, device, ("latent_mean", "clip_target", "dino_input", "vision_input"),
                            select_layer=select_layer, t2i=t2i)
        dtype = t2i.components.unet.dtype
        diffusion = ConditionedUNet.load(diffusion_dir, dtype=dtype).to(device)
        mllm = None
        if mllm_dir is not None:
            llm = load("llm", roles["llm"], device)
            mllm = CafeMLLM(llm.components.model, llm.components.tokenizer, enc.vision_width, enc.clip_dim)
            mllm.load_trainable(mllm_dir)
            mllm = mllm.to(device).eval().requires_grad_(False)
        return cls(diffusion, enc, t2i.components.vae, t2i.components.scheduler, mllm, device, max_new_tokens)

    # -- diffusion --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, clip_embed: torch.Tensor, dino_tokens: torch.Tensor, seeds: Sequence[int], steps: int = 30,
               guidance: float = 3.0, scale_dino: float = 1.0, guidance_dino: float | None = None) -> list[np.ndarray]:
        """Images (H, W, 3) uint8 for a batch of conditions; row i's noise comes from ``seeds[i]`` alone.

        Guidance (D1): ``ε(∅,∅) + guidance·(ε(c,d) − ε(∅,∅))``; with ``guidance_dino``, separate scales:
        ``ε(∅,∅) + guidance·(ε(c,∅) − ε(∅,∅)) + guidance_dino·(ε(c,d) − ε(c,∅))`` (equal scales: the same)."""
        unet = self.diffusion.unet
        b = clip_embed.shape[0]
        size, ch = unet.config.sample_size, unet.config.in_channels
        latents = torch.stack([torch.randn(ch, size, size, generator=torch.Generator().manual_seed(int(s)))
                               for s in seeds]).to(self.device, unet.dtype)
        sched = self.scheduler
        sched.set_timesteps(steps)
        latents = latents * sched.init_noise_sigma
        clip = clip_embed.to(self.device, unet.dtype)
        dino = dino_tokens.to(self.device, unet.dtype)
        zc, zd = torch.zeros_like(clip), torch.zeros_like(dino)
        if guidance_dino is None:
            branches = [(zc, zd), (clip, dino)]
        else:
            branches = [(zc, zd), (clip, zd), (clip, dino)]
        clips, dinos = torch.cat([c for c, _ in branches]), torch.cat([d for _, d in branches])
        k = len(branches)
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * k), t)
            out = self.diffusion(x, t.expand(k * b).to(self.device), clips, dinos, scale_dino=scale_dino).chunk(k)
            if guidance_dino is None:
                eps = out[0] + guidance * (out[1] - out[0])
            else:
                eps = out[0] + guidance * (out[1] - out[0]) + guidance_dino * (out[2] - out[1])
            latents = sched.step(eps, t, latents, eta=0.0).prev_sample
        images = self.vae.decode((latents / self.scaling).to(self.vae.dtype)).sample
        images = ((images.float() + 1) / 2).clamp(0, 1)
        return list((images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())

    # -- the assistant ----------------------------------------------------------------------------

    def generate(self, image: np.ndarray, text: str, seed: int = 0, clip_image: np.ndarray | None = None,
                 steps: int = 30, guidance: float = 3.0, scale_dino: float = 1.0,
                 guidance_dino: float | None = None) -> Generation:
        return self.generate_batch([image], [text], [seed], None if clip_image is None else [clip_image], steps,
                                   guidance, scale_dino, guidance_dino=guidance_dino)[0]

    def generate_batch(self, images: Sequence[np.ndarray], texts: Sequence[str], seeds: Sequence[int],
                       clip_images: Sequence[np.ndarray] | None = None, steps: int = 30, guidance: float = 3.0,
                       scale_dino: float = 1.0, batch_size: int = 32,
                       guidance_dino: float | None = None) -> list[Generation]:
        """:meth:`generate` for many requests: the MLLM answers each request, the diffusion model samples in
        batches of ``batch_size`` (row i's noise still comes from ``seeds[i]`` alone)."""
        if not (len(images) == len(texts) == len(seeds)) or (clip_images is not None and len(clip_images) != len(images)):
            raise ValueError("images, texts, seeds (and clip_images) must have the same length")
        if clip_images is None and self.mllm is None:
            raise ValueError("no MLLM loaded: give clip_image (direct mode)")
        out: list[Generation] = []
        for start in range(0, len(images), batch_size):
            sl = slice(start, start + batch_size)
            imgs, txts = list(images[sl]), list(texts[sl])
            pixels = images_to_tensor(imgs)
            dino = self.encoders.dino_tokens(pixels)
            responses, clips, source = [], [], "image" if clip_images is not None else "mllm"
            if clip_images is not None:
                clip = self.encoders.clip_embed(images_to_tensor(list(clip_images[sl])))
            feats = None
            for i, text in enumerate(txts):
                if clip_images is None and not str(text).strip():
                    raise ValueError("the user text is empty")
                if self.mllm is not None and str(text).strip():
                    if feats is None:
                        feats = self.encoders.vision_features(pixels)
                    response, pred = self.mllm.respond(feats[i].to(self.device), text, self.max_new_tokens)
                    responses.append(response)
                    clips.append(pred.cpu())
                else:
                    responses.append("")
            if clip_images is None:
                clip = torch.stack(clips)
            samples = self.sample(clip, dino, list(seeds[sl]), steps, guidance, scale_dino, guidance_dino)
            out += [Generation(r, im, source) for r, im in zip(responses, samples)]
        return out
