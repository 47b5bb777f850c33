"""ProFusion's PromptNet (SPEC §4.5): (reference latent, z_t, t, CLIP vision tokens) → one pseudo-word S*.

Usage::

    net = PromptNet.from_unet(unet, clip_vision_width=1280, text_width=1024)
    s_star = net(ref_latent, z_t, t, clip_hidden)          # (B, 1, text_width)

Structure (all diffusers blocks, nothing re-implemented):

* the encoder half of the diffusion UNet — ``unet.conv_in``, ``unet.time_proj``, ``unet.time_embedding``,
  ``unet.down_blocks``, ``unet.mid_block`` — held in a ``UNet2DConditionModel`` whose up half is deleted,
  initialised from the text-to-image UNet;
* ``cond_embedding``: conv3×3 → SiLU → conv3×3 on the noisy latent z_t, added to ``conv_in(reference latent)``;
* ``vision_embedding``: linear from the CLIP-vision width to the cross-attention width; its input is the
  full CLIP vision ``last_hidden_state`` (CLS + patches, no post-LN), used as the cross-attention context;
* ``prompt_projections``: one conv per feature map (after conv_in, after every down block, after the mid
  block) to ``proj_channels`` at the mid block's grid; kernel = stride = (map size / mid size), which gives
  the authors' 8, 4, 2, 1, 1, 1 for SD2-base (64×64 latents) and is derived for any other size;
* ``prompt_out``: conv with kernel = stride = mid size over the concatenation → one token of text width.

The kernels are fixed for one latent size (:attr:`PromptNet.latent_size`); :meth:`PromptNet.forward` refuses
any other size with a ``ValueError`` rather than crop (a larger latent would floor to the same one token, or
give several tokens). The CLIP input is made by :func:`clip_pixel_values` as the authors make it: a bicubic
resize **without** antialiasing, then OpenAI mean/std.

This module is the model only. Its on-disk layout (the ``promptnet`` role), saver and loader are in
:mod:`training.models.kit`; the tiny writer is in :mod:`training.models.tiny`; the converter of the authors'
released checkpoint is :mod:`training.models.convert_promptnet` (key mapping in
``docs/profusion_checkpoint_mapping.md``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def clip_pixel_values(pixels01: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """PromptNet's CLIP-vision input, as the authors build it (``Resize(224, BICUBIC)`` on a tensor, then
    ``Normalize(OpenAI mean, std)``): a bicubic resize to ``size``×``size`` with **no antialiasing** and no
    clamping of the bicubic overshoot. (transformers' ``CLIPImageProcessor`` resizes with PIL, which
    antialiases on downsampling, so it is not used here.)

    Args:
        pixels01: (B, 3, H, W) in [0, 1], any float dtype; square images (the sources are).
        size: the vision encoder's input size (224 for ViT-H/14).
        mean, std: per-channel normalisation (3 floats each).

    Returns: (B, 3, size, size) float32.
    """
    x = pixels01.float()  # bicubic in float32: half-precision interpolation is not what the authors ran
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    mean_t = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class PromptNet(nn.Module):
    def __init__(self, unet_config: dict, clip_vision_width: int, text_width: int, proj_channels: int = 128,
                 latent_size: int | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = {
            "unet_config": {k: v for k, v in dict(unet_config).items() if not k.startswith("_")},
            "clip_vision_width": clip_vision_width,
            "text_width": text_width,
            "proj_channels": proj_channels,
            "latent_size": latent_size,
        }
        unet = UNet2DConditionModel(**self.config["unet_config"])
        # encoder half only: drop the decoder so its weights are neither stored nor trained
        unet.up_blocks = nn.ModuleList()
        unet.conv_norm_out = None
        unet.conv_act = None
        unet.conv_out = None
        self.unet = unet
        c_in = unet.config.block_out_channels[0]
        latent_ch = unet.config.in_channels
        self.cond_embedding = nn.Sequential(
            nn.Conv2d(latent_ch, c_in, 3, padding=1), nn.SiLU(), nn.Conv2d(c_in, c_in, 3, padding=1)
        )
        self.vision_embedding = nn.Linear(clip_vision_width, unet.config.cross_attention_dim)

        size = latent_size or unet.config.sample_size
        sizes, channels = [size], [c_in]
        for block in unet.down_blocks:
            if getattr(block, "downsamplers", None):
                size //= 2
            sizes.append(size)
            channels.append(block.resnets[-1].out_channels)
        sizes.append(size)
        channels.append(unet.config.block_out_channels[-1])
        grid = sizes[-1]
        for s in sizes:
            if s % grid:
                raise ValueError(f"PromptNet: feature size {s} is not a multiple of the mid-block size {grid}")
        self.prompt_projections = nn.ModuleList(
            nn.Conv2d(c, proj_channels, kernel_size=s // grid, stride=s // grid) for c, s in zip(channels, sizes)
        )
        self.prompt_out = nn.Conv2d(proj_channels * len(sizes), text_width, kernel_size=grid, stride=grid)
        self.kernels = [s // grid for s in sizes] + [grid]

    @property
    def latent_size(self) -> int:
        """The one latent side length (h = w) for which the kernels give exactly one S* token."""
        return int(self.config["latent_size"] or self.unet.config.sample_size)

    @classmethod
    def from_unet(cls, unet, clip_vision_width: int, text_width: int, proj_channels: int = 128) -> "PromptNet":
        """Build and initialise the encoder half from a text-to-image UNet (SPEC §4.5)."""
        net = cls(dict(unet.config), clip_vision_width, text_width, proj_channels)
        missing, _ = net.unet.load_state_dict(
            {k: v for k, v in unet.state_dict().items() if not k.startswith(("up_blocks", "conv_norm_out", "conv_out"))},
            strict=False,
        )
        if missing:
            raise RuntimeError(f"PromptNet.from_unet: encoder weights missing from the UNet: {missing[:3]}")
        return net

    def forward(self, ref_latent: torch.Tensor, z_t: torch.Tensor, timestep: torch.Tensor,
                clip_hidden: torch.Tensor) -> torch.Tensor:
        """Args: ref_latent, z_t (B, C, h, w); timestep (B,) or scalar; clip_hidden (B, 1+P, clip_width).

        Returns: S* of shape (B, 1, text_width).

        Raises: ValueError if the latents are not latent_size × latent_size (no silent crop).
        """
        size = self.latent_size
        for name, lat in (("ref_latent", ref_latent), ("z_t", z_t)):
            if tuple(lat.shape[-2:]) != (size, size):
                raise ValueError(f"PromptNet: {name} is {lat.shape[-2]}×{lat.shape[-1]}; this PromptNet's kernels "
                                 f"{self.kernels} give exactly one S* token only for {size}×{size} latents")
        u = self.unet
        b = ref_latent.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(ref_latent.device).reshape(-1).expand(b)
        emb = u.time_embedding(u.time_proj(t).to(ref_latent.dtype))  # (B, time_dim)
        context = self.vision_embedding(clip_hidden)  # (B, 1+P, cross_dim)
        h = u.conv_in(ref_latent) + self.cond_embedding(z_t)
        feats = [self.prompt_projections[0](h)]
        for i, block in enumerate(u.down_blocks):
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            feats.append(self.prompt_projections[i + 1](h))
        h = u.mid_block(h, emb, encoder_hidden_states=context)
        feats.append(self.prompt_projections[-1](h))
        s = self.prompt_out(torch.cat(feats, dim=1))  # (B, text_width, 1, 1)
        return s.flatten(2).transpose(1, 2)
