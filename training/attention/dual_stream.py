"""Decoupled two-stream cross-attention (SPEC D1, CAFE Eq. 1; IP-Adapter's decoupled attention).

``Attn(Q, K_clip, V_clip) + scale_dino · Attn(Q, K_dino, V_dino)``

The cross-attention context handed to the UNet is ``[clip tokens (n_clip) ; dino tokens]`` along the sequence
axis. The CLIP stream reuses the layer's own ``to_k``/``to_v``; the DINO stream has its own
``to_k_dino``/``to_v_dino`` (held by this processor, so they appear in the UNet's state dict under
``...attn2.processor.``), initialised from ``to_k``/``to_v``. With ``scale_dino == 0`` the DINO stream is not
computed at all, so the output cannot depend on the DINO tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


class DualStreamAttnProcessor(nn.Module):
    """Cross-attention over a CLIP stream and a DINO stream; ``scale_dino`` is an attribute (set per call)."""

    def __init__(self, cross_attention_dim: int, inner_dim: int, n_clip_tokens: int):
        super().__init__()
        self.n_clip_tokens = int(n_clip_tokens)
        self.scale_dino = 1.0
        self.to_k_dino = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_dino = nn.Linear(cross_attention_dim, inner_dim, bias=False)

    @classmethod
    def from_attention(cls, attn, n_clip_tokens: int) -> "DualStreamAttnProcessor":
        """A processor for ``attn`` (a diffusers ``Attention`` used as cross-attention), DINO k/v copied from it."""
        proc = cls(attn.to_k.in_features, attn.to_k.out_features, n_clip_tokens)
        if attn.to_k.bias is not None or attn.to_v.bias is not None:
            raise ValueError("dual-stream attention expects bias-free to_k/to_v (as in SD2's UNet)")
        with torch.no_grad():
            proc.to_k_dino.weight.copy_(attn.to_k.weight.float())
            proc.to_v_dino.weight.copy_(attn.to_v.weight.float())
        return proc.to(attn.to_k.weight.dtype)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("DualStreamAttnProcessor is a cross-attention processor: no context was given")
        if attention_mask is not None:
            raise ValueError("DualStreamAttnProcessor does not take an attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        clip_ctx = encoder_hidden_states[:, : self.n_clip_tokens]
        dino_ctx = encoder_hidden_states[:, self.n_clip_tokens:]

        query = _heads(attn.to_q(hidden_states), attn.heads)
        out = F.scaled_dot_product_attention(query, _heads(attn.to_k(clip_ctx), attn.heads),
                                             _heads(attn.to_v(clip_ctx), attn.heads))
        if self.scale_dino != 0.0:
            if dino_ctx.shape[1] == 0:
                raise ValueError("scale_dino != 0 but the context holds no DINO tokens")
            dino = F.scaled_dot_product_attention(query, _heads(self.to_k_dino(dino_ctx), attn.heads),
                                                  _heads(self.to_v_dino(dino_ctx), attn.heads))
            out = out + self.scale_dino * dino
        b, heads, n, d = out.shape
        hidden_states = out.transpose(1, 2).reshape(b, n, heads * d).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
