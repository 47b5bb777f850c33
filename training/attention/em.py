"""EM concept masks (SPEC §4.4): one processor that captures cross-attention probabilities.

Usage::

    store = AttentionStore()
    with capturing(unet, store):                          # every attn2 layer records its probabilities
        unet(z_t, t, encoder_hidden_states=context)
    maps = store.aggregate(res=16, layers="all")         # (B, 16, 16, L): heads and layers averaged
    store.clear()

:class:`CaptureAttnProcessor` computes cross-attention the classic way (``attn.get_attention_scores`` then
``bmm``, as diffusers' ``AttnProcessor``) and hands the probabilities, averaged over heads, to the store. The
graph is kept, so the EM cross-attention loss trains the tokens through them. Capture off costs nothing: the
processors are installed only inside :func:`capturing`, and outside it the UNet runs its own (SDPA) processors.

Aggregation (seed 003: "averaged across all layers of the U-Net"): every captured layer's map (B, side, side, L)
is resized to ``res`` × ``res`` (bilinear; antialiased when shrinking) and the layers are averaged;
``layers=<int>`` keeps only the layers whose native resolution is that side (``layers=16`` at ``res=16`` is
Break-A-Scene's five 16×16 layers of SD 512 px). A layer's token axis is the text length L of the call.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from training.attention.ico import attention_in, attention_out, cross_attention_names, installed_processors


class AttentionStore:
    """Per-layer cross-attention probabilities of the last UNet call(s), averaged over heads: (B, N, L)."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}

    def put(self, name: str, probs: torch.Tensor) -> None:
        if name in self.maps:
            raise RuntimeError(f"layer {name} captured twice: clear() the store between UNet calls")
        self.maps[name] = probs

    def clear(self) -> None:
        self.maps = {}

    def sides(self) -> dict[str, int]:
        """Native spatial side of every captured layer (its maps are side × side)."""
        out = {}
        for name, p in self.maps.items():
            side = math.isqrt(p.shape[1])
            if side * side != p.shape[1]:
                raise ValueError(f"layer {name}: {p.shape[1]} query positions are not a square map")
            out[name] = side
        return out

    def aggregate(self, res: int, layers: str | int = "all") -> torch.Tensor:
        """(B, res, res, L) float32: heads (already) and the selected layers averaged, each resized to ``res``.

        Raises:
            ValueError: nothing was captured, or no layer has the native side ``layers``.
        """
        if not self.maps:
            raise ValueError("no cross-attention was captured: run the UNet inside capturing(unet, store)")
        sides = self.sides()
        if layers == "all":
            names = list(self.maps)
        else:
            names = [n for n, s in sides.items() if s == int(layers)]
            if not names:
                raise ValueError(f"layers={layers!r}: no cross-attention layer at {layers}×{layers}; "
                                 f"allowed: 'all' or one of {sorted(set(sides.values()))}")
        total = None
        for name in names:
            p, side = self.maps[name].float(), sides[name]  # (B, N, L)
            grid = p.transpose(1, 2).reshape(p.shape[0], p.shape[2], side, side)  # (B, L, side, side)
            if side != res:
                grid = F.interpolate(grid, size=(res, res), mode="bilinear", align_corners=False,
                                     antialias=side > res)
            total = grid if total is None else total + grid
        return (total / len(names)).permute(0, 2, 3, 1)  # (B, res, res, L)


class CaptureAttnProcessor:
    """Cross-attention that records its probabilities (mean over heads) in an :class:`AttentionStore`."""

    def __init__(self, name: str, store: AttentionStore):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        hidden_states, context, residual, shape4 = attention_in(attn, hidden_states, encoder_hidden_states,
                                                                attention_mask, temb)
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·H, N, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B·H, L, d)
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # (B·H, N, L)
        self.store.put(self.name, probs.view(batch, attn.heads, *probs.shape[1:]).mean(dim=1))  # (B, N, L)
        return attention_out(attn, torch.bmm(probs, value), residual, shape4)


@contextlib.contextmanager
def capturing(unet, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install a :class:`CaptureAttnProcessor` on every attn2 layer of ``unet`` for the block (then restore)."""
    names = cross_attention_names(unet)
    if not names:
        raise ValueError("EM: the UNet has no cross-attention (attn2) layers")
    with installed_processors(unet, {n: CaptureAttnProcessor(n, store) for n in names}):
        yield store
