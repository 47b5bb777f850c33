"""ICO cross-attention (SPEC §4.1): the layer's own trained ``to_k``/``to_v`` copies, SOS key/value detached.

Usage::

    procs = ico_processors(unet)                       # {attn2 name: IcoAttnProcessor}, fp32 copies of to_k/to_v
    with installed_processors(unet, procs):            # previous processors restored on exit
        out = unet(x, t, encoder_hidden_states=ctx).sample

Custom-Diffusion style: every ``attn2`` keeps the base ``to_q``/``to_out`` and computes its keys and values
with this processor's float32 ``to_k``/``to_v`` (initialised from the base layer, which is never edited). The
key and value of row 0 of the text sequence (SOS) are detached, so no gradient reaches ``to_k``/``to_v``
through SOS (the authors' code does the same).

Attention is computed the classic way (``attn.get_attention_scores`` then ``bmm``, as diffusers'
``AttnProcessor``), not with ``scaled_dot_product_attention``: DBIM (:mod:`training.attention.dbim`) needs the
probabilities, and computing both with the same kernels makes DCI with λ = −∞ reproduce ICO sampling bit for
bit. :func:`attention_in` / :func:`attention_out` are the shared pre/post steps.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

#: suffix of the ``unet.attn_processors`` names of the cross-attention layers
CROSS_ATTENTION_SUFFIX = "attn2.processor"


def cross_attention_names(unet) -> list[str]:
    """Names (as in ``unet.attn_processors``) of every cross-attention (``attn2``) layer, in model order."""
    return [name for name in unet.attn_processors if name.endswith(CROSS_ATTENTION_SUFFIX)]


def attention_module(unet, name: str):
    """The diffusers ``Attention`` module whose processor is called ``name``."""
    return unet.get_submodule(name[: -len(".processor")])


@contextlib.contextmanager
def installed_processors(unet, processors: dict[str, object]):
    """Install ``processors`` (a subset of the layer names) for the block; always restore the previous ones."""
    previous = dict(unet.attn_processors)
    unknown = sorted(set(processors) - set(previous))
    if unknown:
        raise ValueError(f"processors: unknown attention layer names {unknown[:3]}; allowed: the UNet's "
                         "attn_processors keys")
    try:
        unet.set_attn_processor({**previous, **processors})
        yield
    finally:
        unet.set_attn_processor(previous)


def attention_in(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, temb: torch.Tensor | None):
    """Shared pre-processing of a cross-attention call (diffusers ``AttnProcessor``).

    Returns ``(hidden (B, N, C), context (B, L, D), residual, restore)`` where ``restore`` undoes the 4-D
    reshape at the end (:func:`attention_out`).
    """
    if encoder_hidden_states is None:
        raise ValueError("a cross-attention processor was called without encoder_hidden_states")
    if attention_mask is not None:
        raise ValueError("ICO/DBIM cross-attention does not take an attention mask")
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4 = None
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        shape4 = (b, c, h, w)
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    return hidden_states, encoder_hidden_states, residual, shape4


def attention_out(attn, out: torch.Tensor, residual: torch.Tensor, shape4) -> torch.Tensor:
    """Shared post-processing: per-head output (B·H, N, d) → ``to_out`` → residual/rescale."""
    hidden_states = attn.batch_to_head_dim(out)  # (B, N, H·d)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if shape4 is not None:
        b, c, h, w = shape4
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class IcoAttnProcessor(nn.Module):
    """Cross-attention with this module's float32 ``to_k``/``to_v`` (trained) and the base ``to_q``/``to_out``."""

    def __init__(self, cross_attention_dim: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.to_k = nn.Linear(cross_attention_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim, inner_dim, bias=bias)

    @classmethod
    def from_attention(cls, attn) -> "IcoAttnProcessor":
        """A float32 processor whose ``to_k``/``to_v`` are copies of ``attn``'s (the base layer is not touched)."""
        bias = attn.to_k.bias is not None
        if (attn.to_v.bias is not None) != bias:
            raise ValueError("ICO expects to_k and to_v to both have a bias or both to have none")
        proc = cls(attn.to_k.in_features, attn.to_k.out_features, bias=bias)
        with torch.no_grad():
            proc.to_k.weight.copy_(attn.to_k.weight.float())
            proc.to_v.weight.copy_(attn.to_v.weight.float())
            if bias:
                proc.to_k.bias.copy_(attn.to_k.bias.float())
                proc.to_v.bias.copy_(attn.to_v.bias.float())
        return proc.to(attn.to_k.weight.device)

    def key_value(self, context: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, L, inner) of ``context`` (B, L, D); row 0 (SOS) detached from the graph.

        The projection runs in the weights' float32 (or the autocast dtype inside ``torch.autocast``) and is
        returned in ``out_dtype`` (the query's dtype), so a half-precision base can use float32 weights.
        """
        x = context.to(self.to_k.weight.dtype)
        key = F.linear(x, self.to_k.weight, self.to_k.bias).to(out_dtype)
        value = F.linear(x, self.to_v.weight, self.to_v.bias).to(out_dtype)
        key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)  # SOS: no gradient into to_k
        value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)  # SOS: no gradient into to_v
        return key, value

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        hidden_states, context, residual, shape4 = attention_in(attn, hidden_states, encoder_hidden_states,
                                                                attention_mask, temb)
        query = attn.to_q(hidden_states)  # (B, N, H·d)
        key, value = self.key_value(context, query.dtype)  # (B, L, H·d)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))  # (B·H, ·, d)
        probs = attn.get_attention_scores(query, key, None)  # (B·H, N, L)
        out = torch.bmm(probs, value)  # (B·H, N, d)
        return attention_out(attn, out, residual, shape4)


def ico_processors(unet) -> dict[str, IcoAttnProcessor]:
    """A fresh :class:`IcoAttnProcessor` (to_k/to_v copied from the base) for every ``attn2`` of ``unet``."""
    names = cross_attention_names(unet)
    if not names:
        raise ValueError("ICO: the UNet has no cross-attention (attn2) layers")
    return {name: IcoAttnProcessor.from_attention(attention_module(unet, name)) for name in names}
