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

The mapping of the authors' released checkpoint onto these names is in ``docs/profusion_checkpoint_mapping.md``.

On disk (the ``promptnet`` role)::

    promptnet/config.json            {"unet_config": {...}, "clip_vision_width", "text_width", "proj_channels"}
    promptnet/promptnet.safetensors  this module's state dict
    promptnet/image_encoder/         transformers CLIPVisionModel + preprocessor_config.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PROMPTNET_WEIGHTS = "promptnet"


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


@dataclass
class PromptNetComponents:
    promptnet: PromptNet
    image_encoder: Any  # transformers CLIPVisionModel
    image_processor: Any


def save_promptnet(net: PromptNet, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(net.config, indent=2, default=list))
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
              str(out / f"{PROMPTNET_WEIGHTS}.safetensors"))


def write_tiny_promptnet(out: Path, seed: int, t2i_dir: Path) -> None:
    """Tiny PromptNet initialised from the tiny ``t2i`` UNet, plus a tiny CLIP vision encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from training.models.tiny import IMAGE_SIZE, OPENAI_MEAN, OPENAI_STD

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(t2i_dir / "unet", local_files_only=True, use_safetensors=True)
    enc = CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=48,
                                           intermediate_size=96, num_hidden_layers=2, num_attention_heads=2))
    text_width = unet.config.cross_attention_dim
    net = PromptNet.from_unet(unet, clip_vision_width=enc.config.hidden_size, text_width=text_width,
                              proj_channels=16)
    save_promptnet(net, out)
    enc.save_pretrained(out / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=True,
                       image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD), resample=3,
                       ).save_pretrained(out / "image_encoder")


def load_promptnet_dir(role: str, d: Path, dtype: torch.dtype):
    """Model-kit loader for the ``promptnet`` role (see :mod:`training.models.kit`)."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPVisionModel

    from training.models.kit import ModelLoadError, _compare_state, _hf_load, _library_call, _require, _weights

    _require(role, d, "config.json")
    table = _weights(role, d, PROMPTNET_WEIGHTS)
    try:
        cfg = json.loads((d / "config.json").read_text())
        net = PromptNet(cfg["unet_config"], cfg["clip_vision_width"], cfg["text_width"],
                        cfg.get("proj_channels", 128), cfg.get("latent_size"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(role, d / "config.json", f"invalid PromptNet config: {exc}") from None
    _compare_state(role, d, net, table)
    net.load_state_dict(load_file(str(d / f"{PROMPTNET_WEIGHTS}.safetensors")), strict=True)
    net = net.to(dtype).eval()
    enc_dir = d / "image_encoder"
    _require(role, enc_dir, "config.json", "preprocessor_config.json")
    _weights(role, enc_dir, "model")
    enc = _hf_load(role, enc_dir, CLIPVisionModel, dtype=dtype).eval()
    if enc.config.hidden_size != net.config["clip_vision_width"]:
        raise ModelLoadError(role, d, f"config/weights mismatch: image encoder width {enc.config.hidden_size} "
                             f"!= PromptNet clip_vision_width {net.config['clip_vision_width']}")
    processor = _library_call(role, enc_dir, AutoImageProcessor.from_pretrained, enc_dir, local_files_only=True)
    return PromptNetComponents(net, enc, processor), {"promptnet": net, "image_encoder": enc}


def smoke_forward_promptnet(c: PromptNetComponents) -> dict[str, tuple[int, ...]]:
    clip_size = c.image_encoder.config.image_size
    pix = clip_pixel_values(torch.zeros(1, 3, clip_size, clip_size), clip_size, c.image_processor.image_mean,
                            c.image_processor.image_std)
    hidden = c.image_encoder(pixel_values=pix.to(c.image_encoder.dtype)).last_hidden_state
    size = c.promptnet.latent_size
    lat = torch.zeros(1, c.promptnet.unet.config.in_channels, size, size, dtype=hidden.dtype)
    s = c.promptnet(lat, lat, torch.tensor([500]), hidden)
    return {"clip_hidden": tuple(hidden.shape), "s_star": tuple(s.shape)}


# ------------------------------------------------------------------------------------------------------
# converter for the authors' released checkpoint (drboog/ProFusion) — see docs/profusion_checkpoint_mapping.md
# ------------------------------------------------------------------------------------------------------

#: authors' key prefix → ours (longest prefixes first); residual projections are unused (res_scale = 0)
AUTHORS_KEY_MAP = (
    ("promptnet_cond_embedding.conv_in.", "cond_embedding.0."),
    ("promptnet_cond_embedding.conv_out.", "cond_embedding.2."),
    ("first_prompt_projection.", "prompt_projections.0."),
    ("down_prompt_projections.0.", "prompt_projections.1."),
    ("down_prompt_projections.1.", "prompt_projections.2."),
    ("down_prompt_projections.2.", "prompt_projections.3."),
    ("down_prompt_projections.3.", "prompt_projections.4."),
    ("mid_prompt_projection.", "prompt_projections.5."),
    ("region_prompt_output.", "prompt_out."),
    ("vision_embedding.", "vision_embedding."),
    ("conv_in.", "unet.conv_in."),
    ("time_embedding.", "unet.time_embedding."),
    ("down_blocks.", "unet.down_blocks."),
    ("mid_block.", "unet.mid_block."),
)
AUTHORS_DROPPED_PREFIXES = ("residual_projections.", "residual_projections_2.", "mid_residual_projection.",
                            "mid_residual_projection_2.")


def convert_authors_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the authors' PromptNet keys to ours; drop the unused residual projections; refuse unknown keys."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(AUTHORS_DROPPED_PREFIXES):
            continue
        for theirs, ours in AUTHORS_KEY_MAP:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown PromptNet keys in the authors' checkpoint, e.g. {unknown[:3]}")
    return out


def convert_authors_checkpoint(src: str | Path, t2i_dir: str | Path, image_encoder_dir: str | Path,
                               out_dir: str | Path) -> Path:
    """Explicit converter: the authors' PromptNet weights (+ a CLIP vision dir) → our ``promptnet`` role layout.

    ``src`` is a ``.safetensors`` file or a pickle checkpoint (``.bin``/``.pt``), the latter read with
    ``torch.load(weights_only=True)`` — this converter is the only place a pickle is ever opened.
    """
    import shutil

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    src = Path(src)
    state = load_file(str(src)) if src.suffix == ".safetensors" else torch.load(src, map_location="cpu",
                                                                                weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    unet_config = UNet2DConditionModel.load_config(str(Path(t2i_dir) / "unet"), local_files_only=True)
    vision = CLIPVisionConfig.from_pretrained(str(image_encoder_dir), local_files_only=True)
    net = PromptNet(unet_config, clip_vision_width=vision.hidden_size,
                    text_width=unet_config["cross_attention_dim"], proj_channels=128)
    net.load_state_dict(convert_authors_state_dict(state), strict=True)
    out = Path(out_dir)
    save_promptnet(net, out)
    shutil.copytree(image_encoder_dir, out / "image_encoder", dirs_exist_ok=True)
    return out
