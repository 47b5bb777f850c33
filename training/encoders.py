"""The frozen encoders CAFE's trainers read images through, shared by the on-the-fly path and the cache.

Usage::

    enc = ConditionEncoders.load(models_cfg_like, want=("latents", "clip", "dino", "vision"))
    feats = enc.encode(input_images, target_images)        # dict of float32 tensors, one row per image pair

What is computed (one row per (input x, target y) pair):

===================  =================================================================================
key                  value
===================  =================================================================================
``latent_mean``      VAE posterior mean of y, unscaled (C, h, w)
``latent_std``       VAE posterior std of y (C, h, w); trainers sample ``(mean + std·n)·scaling`` with a
                     per-row generator, so cached and on-the-fly training see the same latents
``clip_target``      ``clip_cond`` image embedding of y, L2-normalised (clip_dim,): the diffusion model's CLIP
                     condition during training and the MLLM head's regression target
``dino_input``       ``dino_cond`` ``last_hidden_state`` of x (1 + patches, width): the DINO condition
``vision_input``     ``clip_cond`` hidden layer ``select_layer`` of x, patch tokens only (patches, width): the
                     MLLM's image features
===================  =================================================================================

Every encoder runs in its role's dtype under ``torch.no_grad`` and returns float32. The cache is keyed by
:func:`pipeline.train.encoder_fingerprint` (the roles' weight fingerprints + ``select_layer``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FEATURES = ("latent_mean", "latent_std", "clip_target", "dino_input", "vision_input")


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1] from uint8 (H, W, 3) arrays."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.uint8) for i in images])).permute(0, 3, 1, 2).float() / 255


def _processor_pixels(processor, pixels01: torch.Tensor) -> torch.Tensor:
    """The role's own image processor (resize, crop, normalise) over [0, 1] tensors → pixel_values."""
    arrays = [(p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for p in pixels01]
    return processor(images=arrays, return_tensors="pt").pixel_values


@dataclass
class ConditionEncoders:
    vae: object | None = None
    clip: object | None = None  # LoadedRole components (CLIPVisionModelWithProjection + processor)
    dino: object | None = None  # LoadedRole components (Dinov2Model + processor)
    select_layer: int = -2
    device: str = "cpu"

    @property
    def scaling(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def clip_dim(self) -> int:
        return int(self.clip.model.config.projection_dim)

    @property
    def vision_width(self) -> int:
        return int(self.clip.model.config.hidden_size)

    @property
    def dino_width(self) -> int:
        return int(self.dino.model.config.hidden_size)

    @torch.no_grad()
    def latent_dist(self, pixels01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (pixels01 * 2 - 1).to(self.device, self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    @torch.no_grad()
    def clip_embed(self, pixels01: torch.Tensor) -> torch.Tensor:
        pix = _processor_pixels(self.clip.processor, pixels01).to(self.device, self.clip.model.dtype)
        return F.normalize(self.clip.model(pixel_values=pix).image_embeds.float(), dim=-1).cpu()

    @torch.no_grad()
    def vision_features(self, pixels01: torch.Tensor) -> torch.Tensor:
        pix = _processor_pixels(self.clip.processor, pixels01).to(self.device, self.clip.model.dtype)
        out = self.clip.model.vision_model(pixel_values=pix, output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:].float().cpu()

    @torch.no_grad()
    def dino_tokens(self, pixels01: torch.Tensor) -> torch.Tensor:
        pix = _processor_pixels(self.dino.processor, pixels01).to(self.device, self.dino.model.dtype)
        return self.dino.model(pixel_values=pix).last_hidden_state.float().cpu()

    def encode(self, inputs: Sequence[np.ndarray] | None, targets: Sequence[np.ndarray] | None,
               want: Sequence[str] = FEATURES) -> dict[str, torch.Tensor]:
        """The features in ``want`` for a batch of (input, target) image pairs (uint8 HWC arrays)."""
        out: dict[str, torch.Tensor] = {}
        x = images_to_tensor(inputs) if inputs is not None else None
        y = images_to_tensor(targets) if targets is not None else None
        if "latent_mean" in want or "latent_std" in want:
            out["latent_mean"], out["latent_std"] = self.latent_dist(y)
        if "clip_target" in want:
            out["clip_target"] = self.clip_embed(y)
        if "dino_input" in want:
            out["dino_input"] = self.dino_tokens(x)
        if "vision_input" in want:
            out["vision_input"] = self.vision_features(x)
        return {k: v for k, v in out.items() if k in want}


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generators: Sequence[torch.Generator],
                   scaling: float) -> torch.Tensor:
    """``(mean + std·n)·scaling`` with n drawn from each row's own generator (order-independent)."""
    noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
    return (mean + std * noise) * scaling


def row_generator(seed: int, epoch: int, row_id: str, stream: str) -> torch.Generator:
    """A generator that depends only on (seed, epoch, row id, stream): the same wherever and in whatever batch the
    row is trained, so sharding over workers and resuming do not change a row's noise, timestep or drops."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{row_id}|{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
