"""CAFE's conditioned diffusion model (SPEC §2, D1): the t2i UNet without its text encoder, conditioned by the
CLIP global image embedding and DINOv2 patch tokens through two cross-attention streams.

Usage::

    model = ConditionedUNet.from_unet(t2i.unet, clip_dim=768, dino_width=1536)
    eps = model(z_t, t, clip_embed, dino_tokens, scale_dino=1.0)      # (B, C, h, w)
    model.save("out/diffusion")                                        # unet/ (diffusers) + conditioner
    model = ConditionedUNet.load("out/diffusion")

* CLIP stream: ``clip_proj`` (Linear + LayerNorm, IP-Adapter's image projection) maps the embedding to
  ``n_clip_tokens`` tokens of cross-attention width, read by each attn2's own ``to_k``/``to_v``.
* DINO stream: ``dino_proj`` (Linear) maps each patch token (CLS included) to cross-attention width, read by
  ``to_k_dino``/``to_v_dino`` of :class:`~training.attention.dual_stream.DualStreamAttnProcessor`.
* Null conditions (classifier-free guidance, training drops) are **zero inputs**: a zero CLIP embedding, zero
  DINO tokens (:func:`drop_conditions`).

On disk (a directory)::

    unet/                    diffusers UNet2DConditionModel folder (config.json + safetensors): loadable by diffusers
    conditioner.safetensors  clip_proj.*, dino_proj.*, <attn2 layer>.to_k_dino / to_v_dino weights
    conditioner.json         {clip_dim, dino_width, n_clip_tokens, ...}
    ip_adapter.safetensors   the same weights for plain diffusers: each attn2's DINO k/v as the state dict of
                             diffusers' IPAdapterAttnProcessor2_0 (``<processor>.to_k_ip.0.weight``), the
                             projections as ``image_proj.*`` (loading snippet: docs/training.md)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from training.attention.dual_stream import DualStreamAttnProcessor

CONDITIONER_WEIGHTS = "conditioner.safetensors"
CONDITIONER_CONFIG = "conditioner.json"
IP_ADAPTER_WEIGHTS = "ip_adapter.safetensors"  # the conditioner for plain diffusers (IPAdapterAttnProcessor2_0)


class ConditionedUNet(nn.Module):
    def __init__(self, unet, clip_dim: int, dino_width: int, n_clip_tokens: int = 1):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet = unet
        cross = int(unet.config.cross_attention_dim)
        self.config = {"clip_dim": int(clip_dim), "dino_width": int(dino_width), "n_clip_tokens": int(n_clip_tokens),
                       "cross_attention_dim": cross}
        self.clip_proj = nn.Linear(clip_dim, n_clip_tokens * cross)
        self.clip_norm = nn.LayerNorm(cross)
        self.dino_proj = nn.Linear(dino_width, cross)
        procs = {}
        modules = dict(unet.named_modules())
        for name in unet.attn_processors:
            layer = name[: -len(".processor")]
            if layer.endswith("attn2"):
                procs[name] = DualStreamAttnProcessor.from_attention(modules[layer], n_clip_tokens)
            else:
                procs[name] = AttnProcessor2_0()
        if not any(isinstance(p, DualStreamAttnProcessor) for p in procs.values()):
            raise ValueError("the UNet has no cross-attention (attn2) layers to condition")
        unet.set_attn_processor(procs)
        self.to(unet.dtype)

    @classmethod
    def from_unet(cls, unet, clip_dim: int, dino_width: int, n_clip_tokens: int = 1) -> "ConditionedUNet":
        return cls(unet, clip_dim, dino_width, n_clip_tokens)

    @property
    def n_clip_tokens(self) -> int:
        return self.config["n_clip_tokens"]

    def dual_processors(self) -> dict[str, DualStreamAttnProcessor]:
        return {n: p for n, p in self.unet.attn_processors.items() if isinstance(p, DualStreamAttnProcessor)}

    def set_scale_dino(self, scale: float) -> None:
        for p in self.dual_processors().values():
            p.scale_dino = float(scale)

    def context(self, clip_embed: torch.Tensor, dino_tokens: torch.Tensor) -> torch.Tensor:
        """The cross-attention context (B, n_clip + N, cross): projected CLIP tokens then DINO tokens."""
        b = clip_embed.shape[0]
        clip_tokens = self.clip_norm(self.clip_proj(clip_embed).view(b, self.n_clip_tokens, -1))
        return torch.cat([clip_tokens, self.dino_proj(dino_tokens)], dim=1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, clip_embed: torch.Tensor, dino_tokens: torch.Tensor,
                scale_dino: float | None = None) -> torch.Tensor:
        if scale_dino is not None:
            self.set_scale_dino(scale_dino)
        ctx = self.context(clip_embed.to(self.clip_proj.weight.dtype), dino_tokens.to(self.dino_proj.weight.dtype))
        return self.unet(z_t, t, encoder_hidden_states=ctx).sample

    # -- weights ----------------------------------------------------------------------------------

    def conditioner_state(self) -> dict[str, torch.Tensor]:
        """Every weight that is not the diffusers UNet's own: projections + per-layer DINO k/v."""
        state = {f"clip_proj.{k}": v for k, v in self.clip_proj.state_dict().items()}
        state.update({f"clip_norm.{k}": v for k, v in self.clip_norm.state_dict().items()})
        state.update({f"dino_proj.{k}": v for k, v in self.dino_proj.state_dict().items()})
        for name, proc in self.dual_processors().items():
            for k, v in proc.state_dict().items():
                state[f"{name}.{k}"] = v
        return state

    def save(self, out: str | os.PathLike) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        procs = self.unet.attn_processors
        self.unet.set_attn_processor(AttnProcessor2_0())  # the plain UNet's state dict, loadable by diffusers
        try:
            self.unet.save_pretrained(out / "unet", safe_serialization=True)
        finally:
            self.unet.set_attn_processor(procs)
        save_file({k: v.detach().contiguous() for k, v in self.conditioner_state().items()},
                  str(out / CONDITIONER_WEIGHTS))
        (out / CONDITIONER_CONFIG).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.ip_adapter_state().items()}, str(out / IP_ADAPTER_WEIGHTS))

    def ip_adapter_state(self) -> dict[str, torch.Tensor]:
        """The same weights in the layout plain diffusers loads (``IP_ADAPTER_WEIGHTS``, docs/training.md): the DINO
        stream of each attn2 as the state dict of diffusers' ``IPAdapterAttnProcessor2_0`` (``to_k_ip.0``,
        ``to_v_ip.0``) under the processor's name, and the projections under ``image_proj.``. With the UNet called
        as ``unet(z, t, encoder_hidden_states=(clip_tokens, [dino_tokens]))`` and each processor's ``scale`` =
        ``scale_dino``, its output equals this model's (tested)."""
        state = {f"image_proj.{k}": v for k, v in self.conditioner_state().items()
                 if k.split(".")[0] in ("clip_proj", "clip_norm", "dino_proj")}
        for name, proc in self.dual_processors().items():
            state[f"{name}.to_k_ip.0.weight"] = proc.to_k_dino.weight
            state[f"{name}.to_v_ip.0.weight"] = proc.to_v_dino.weight
        return state

    def load_conditioner(self, state: dict[str, torch.Tensor]) -> None:
        own = self.conditioner_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"conditioner weights do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            for k, v in own.items():
                if v.shape != state[k].shape:
                    raise ValueError(f"conditioner weight {k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}")
                v.copy_(state[k].to(v.dtype))

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "ConditionedUNet":
        """Load a directory written by :meth:`save` (safetensors only, shapes checked)."""
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        from training.models.kit import ModelLoadError, _check_safetensors, _hf_load, _require, _weights

        d = Path(path)
        _require("diffusion", d, CONDITIONER_CONFIG)
        _require("diffusion", d / "unet", "config.json")
        _weights("diffusion", d / "unet", "diffusion_pytorch_model")
        _check_safetensors("diffusion", d / CONDITIONER_WEIGHTS)
        unet = _hf_load("diffusion", d / "unet", UNet2DConditionModel, torch_dtype=dtype)
        try:
            cfg = json.loads((d / CONDITIONER_CONFIG).read_text())
            model = cls(unet, cfg["clip_dim"], cfg["dino_width"], cfg["n_clip_tokens"])
            model.load_conditioner(load_file(str(d / CONDITIONER_WEIGHTS)))
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise ModelLoadError("diffusion", d, f"invalid conditioned model: {exc}") from None
        return model.to(dtype).eval().requires_grad_(False)


def drop_conditions(clip_embed: torch.Tensor, dino_tokens: torch.Tensor, drop_clip: torch.Tensor,
                    drop_dino: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the rows whose condition is dropped (``drop_*``: (B,) bool) — the null condition is zeros."""
    keep_c = (~drop_clip).to(clip_embed.dtype).view(-1, *([1] * (clip_embed.ndim - 1)))
    keep_d = (~drop_dino).to(dino_tokens.dtype).view(-1, *([1] * (dino_tokens.ndim - 1)))
    return clip_embed * keep_c, dino_tokens * keep_d
