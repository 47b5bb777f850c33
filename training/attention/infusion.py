"""Infusion cross-attention (SPEC §4.3, D6): a foundational (F) and a customized (C) stream in one batch.

Usage::

    procs = {name: InfusionAttnProcessor.from_attention(attn, deltas[name], "post_v")
             for name, attn in cross_attention_layers(unet).items()}
    with installed(unet, procs, InfusionRouting.build(n_f=2, pair=[0, 1], share_maps=[True, True],
                                                       slots=[(0, 5, 0), (1, 5, 0)])):
        out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([ctx, ctx])).sample   # [F rows ; C rows]

Batch layout of one UNet call: ``[F rows (n_f) ; C rows (n_c)]``. C row ``j`` is paired with F row
``pair[j]`` and carries that row's text: the processors read the context of the F rows only (a C row's own
context rows are not read), so a C row is "its F row's prompt + Δ at its slots".

Paper mode (:class:`InfusionAttnProcessor`), per attn2 layer l with heads h:

* F rows: ``P_F = softmax(Q_F K^T / √d)`` (softmax in float32), output ``P_F V`` (ordinary attention, computed
  explicitly because C needs the maps);
* a C row with ``share_maps`` uses its F row's maps: output ``P_F (V + Σ_s e_{pos_s} r_{k_s}^T)``, computed as
  ``P_F V + Σ_s P_F[:, pos_s] r_{k_s}^T`` (so Δ = 0 gives F's output bit for bit); a C row without
  ``share_maps`` (the customized stream's unconditional CFG branch, as P2P edits only the conditional half)
  uses its own queries: ``P_C = softmax(Q_C K^T/√d)``, output ``P_C (V + Σ_s e_{pos_s} r_{k_s}^T)``;
* the value residual of concept k is ``r_k = Δ_k`` (``post_v``, Δ ∈ R^{inner_dim}, added after ``to_v``) or
  ``r_k = W_v Δ_k`` (``pre_v``, Δ ∈ R^{text width}, added to the token's context vector before ``to_v``, after
  the layer's ``norm_cross`` if any; ``to_v(x + Δ) − to_v(x) = W_v Δ`` for a linear ``to_v`` with or without bias).

Code-compat mode (:class:`InfusionKVAttnProcessor`, SPEC §4.3 ``mode: code_compat``): the released code's
xformers path: residuals on both K and V at the concept token of the C rows, C attends with its own queries
(no map replacement). The released code's plain half borrows the customized half's queries and is discarded;
here the F rows run ordinary attention on their own queries instead (C's output does not depend on them).

Self-attention (attn1) is untouched. Each processor is an ``nn.Module`` holding only its Δ (``delta``:
(K, dim) paper, (K, 2, dim) code-compat; K = number of concepts); the routing of a call is the attribute
``routing`` (set by :func:`installed`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.params import INFUSION_PLACEMENTS as PLACEMENTS  # noqa: E402  (one definition)


@dataclass(frozen=True)
class InfusionRouting:
    """The layout of one UNet call's batch ``[F rows (n_f) ; C rows (len(pair))]``.

    Attributes:
        n_f: number of F rows (first in the batch).
        pair: (n_c,) long — the F row each C row is paired with (whose text and, when shared, maps it uses).
        share_maps: (n_c,) bool — C row uses its F row's attention maps (paper mode); else its own queries.
        slot_rows, slot_pos, slot_concept: (S,) long — slot s adds concept ``slot_concept[s]``'s Δ at token
            ``slot_pos[s]`` of C row ``slot_rows[s]``.
    """

    n_f: int
    pair: torch.Tensor
    share_maps: torch.Tensor
    slot_rows: torch.Tensor
    slot_pos: torch.Tensor
    slot_concept: torch.Tensor

    @classmethod
    def build(cls, n_f: int, pair: Sequence[int], share_maps: Sequence[bool],
              slots: Sequence[tuple[int, int, int]] = (), device: str | torch.device = "cpu") -> "InfusionRouting":
        """Routing from plain lists; ``slots`` are ``(c_row, token position, concept index)`` triples."""
        if len(pair) != len(share_maps):
            raise ValueError(f"pair ({len(pair)}) and share_maps ({len(share_maps)}) must have the same length")
        if any(not 0 <= p < n_f for p in pair):
            raise ValueError(f"pair entries must index the F rows 0..{n_f - 1}, got {list(pair)}")
        if any(not 0 <= r < len(pair) for r, _, _ in slots):
            raise ValueError(f"slot rows must index the C rows 0..{len(pair) - 1}, got {list(slots)}")
        if len({(r, p) for r, p, _ in slots}) != len(slots):
            raise ValueError(f"two slots at the same (row, position): {list(slots)}")
        long = dict(dtype=torch.long, device=device)
        rows, pos, conc = (zip(*slots) if slots else ((), (), ()))
        return cls(int(n_f), torch.tensor(list(pair), **long), torch.tensor(list(share_maps), dtype=torch.bool,
                                                                            device=device),
                   torch.tensor(list(rows), **long), torch.tensor(list(pos), **long), torch.tensor(list(conc), **long))

    @property
    def n_c(self) -> int:
        return int(self.pair.numel())


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, heads, N, d_head)


def _probs(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T · scale) over tokens, in float32, returned in q's dtype: (B, heads, N, L).

    With ``attn.upcast_attention`` (some SD2.x configs, against fp16 overflow) the scores are computed in float32
    too, as diffusers' ``get_attention_scores`` does."""
    if getattr(attn, "upcast_attention", False):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        return scores.softmax(dim=-1).to(q.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
    return scores.float().softmax(dim=-1).to(q.dtype)


def _value_residual(attn, delta: torch.Tensor, placement: str, proj: str = "to_v") -> torch.Tensor:
    """Per-concept residual after the projection: (K, inner_dim). ``pre_v``: ``W Δ`` (no bias: it cancels)."""
    if placement == "post_v":
        return delta
    weight = getattr(attn, proj).weight
    return F.linear(delta.to(weight.dtype), weight)


class _Preamble:
    """diffusers' processor preamble/epilogue (spatial/group norm, 4-D inputs, residual, rescale)."""

    def __init__(self, attn, hidden_states, temb):
        self.attn, self.residual = attn, hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        self.input_ndim = hidden_states.ndim
        if self.input_ndim == 4:
            b, c, h, w = hidden_states.shape
            self.chw = (c, h, w)
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self.hidden_states = hidden_states

    def finish(self, out: torch.Tensor) -> torch.Tensor:  # out: (B, heads, N, d_head)
        attn = self.attn
        b, heads, n, d = out.shape
        hidden_states = out.transpose(1, 2).reshape(b, n, heads * d)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if self.input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, *self.chw)
        if attn.residual_connection:
            hidden_states = hidden_states + self.residual
        return hidden_states / attn.rescale_output_factor


def _check_call(name: str, routing: InfusionRouting | None, hidden_states, encoder_hidden_states, attention_mask):
    if routing is None:
        raise ValueError(f"{name}: no routing set (install it with training.attention.infusion.installed)")
    if encoder_hidden_states is None:
        raise ValueError(f"{name} is a cross-attention processor: no context was given")
    if attention_mask is not None:
        raise ValueError(f"{name} does not take an attention mask")
    if hidden_states.shape[0] != routing.n_f + routing.n_c:
        raise ValueError(f"{name}: batch of {hidden_states.shape[0]} rows, routing expects "
                         f"{routing.n_f} F + {routing.n_c} C rows")


class InfusionAttnProcessor(nn.Module):
    """Paper-mode Infusion cross-attention: C rows use F's maps; Δ on the value of each concept token."""

    def __init__(self, num_concepts: int, dim: int, placement: str = "post_v"):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not supported; allowed: {PLACEMENTS}")
        self.placement = placement
        self.delta = nn.Parameter(torch.zeros(num_concepts, dim))  # (K, dim) float32
        self.routing: InfusionRouting | None = None

    @staticmethod
    def delta_dim(attn, placement: str) -> int:
        """Δ width for ``attn``: inner_dim (``post_v``) or the context (text) width (``pre_v``)."""
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not supported; allowed: {PLACEMENTS}")
        return attn.to_v.out_features if placement == "post_v" else attn.to_v.in_features

    @classmethod
    def from_attention(cls, attn, delta: torch.Tensor | None = None, placement: str = "post_v",
                       num_concepts: int = 1) -> "InfusionAttnProcessor":
        """A processor for ``attn``; Δ zeros (K = ``num_concepts``) or a copy of ``delta`` (K, dim) in float32."""
        dim = cls.delta_dim(attn, placement)
        if delta is not None:
            if delta.ndim != 2 or delta.shape[1] != dim:
                raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit this layer: expected (K, {dim}) "
                                 f"for placement {placement!r}")
            num_concepts = delta.shape[0]
        proc = cls(num_concepts, dim, placement).to(attn.to_v.weight.device)
        if delta is not None:
            with torch.no_grad():
                proc.delta.copy_(delta.float())
        return proc

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        routing = self.routing
        _check_call(type(self).__name__, routing, hidden_states, encoder_hidden_states, attention_mask)
        pre = _Preamble(attn, hidden_states, temb)
        n_f, heads = routing.n_f, attn.heads
        ctx = encoder_hidden_states[:n_f]  # C rows carry their F row's text
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q = _heads(attn.to_q(pre.hidden_states), heads)  # (n_f + n_c, heads, N, d)
        k = _heads(attn.to_k(ctx), heads)  # (n_f, heads, L, d)
        v = _heads(attn.to_v(ctx), heads)
        probs_f = _probs(attn, q[:n_f], k)  # (n_f, heads, N, L); F rows never depend on Δ
        out_f = torch.matmul(probs_f, v)  # (n_f, heads, N, d)
        if routing.n_c == 0:
            return pre.finish(out_f)
        pair = routing.pair
        probs_c = probs_f[pair]  # (n_c, heads, N, L)
        out_c = out_f[pair]
        own = torch.nonzero(~routing.share_maps).flatten()
        if own.numel():
            own_probs = _probs(attn, q[n_f + own], k[pair[own]])
            probs_c = probs_c.index_copy(0, own, own_probs)
            out_c = out_c.index_copy(0, own, torch.matmul(own_probs, v[pair[own]]))
        if routing.slot_rows.numel():
            r = _value_residual(attn, self.delta, self.placement)  # (K, inner)
            s = routing.slot_rows.numel()
            p = probs_c[routing.slot_rows, :, :, routing.slot_pos]  # (S, heads, N): maps of the concept tokens
            contrib = p.unsqueeze(-1) * r[routing.slot_concept].view(s, heads, 1, -1)  # (S, heads, N, d)
            add = torch.zeros(out_c.shape, dtype=contrib.dtype, device=contrib.device)
            out_c = out_c + add.index_add(0, routing.slot_rows, contrib).to(out_c.dtype)
        return pre.finish(torch.cat([out_f, out_c]))


class InfusionKVAttnProcessor(nn.Module):
    """Code-compat Infusion cross-attention: K and V residuals at the concept token of the C rows, own maps."""

    def __init__(self, num_concepts: int, dim: int, placement: str = "post_v"):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not supported; allowed: {PLACEMENTS}")
        self.placement = placement
        self.delta = nn.Parameter(torch.zeros(num_concepts, 2, dim))  # (K, [key, value], dim) float32
        self.routing: InfusionRouting | None = None

    @classmethod
    def from_attention(cls, attn, delta: torch.Tensor | None = None, placement: str = "post_v",
                       num_concepts: int = 1) -> "InfusionKVAttnProcessor":
        """A processor for ``attn``; Δ zeros or a copy of ``delta`` (K, 2, dim) in float32."""
        dim = InfusionAttnProcessor.delta_dim(attn, placement)
        if attn.to_k.out_features != attn.to_v.out_features or attn.to_k.in_features != attn.to_v.in_features:
            raise ValueError("code_compat needs to_k and to_v of the same shape")
        if delta is not None:
            if delta.ndim != 3 or delta.shape[1:] != (2, dim):
                raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit this layer: expected "
                                 f"(K, 2, {dim}) for placement {placement!r}")
            num_concepts = delta.shape[0]
        proc = cls(num_concepts, dim, placement).to(attn.to_v.weight.device)
        if delta is not None:
            with torch.no_grad():
                proc.delta.copy_(delta.float())
        return proc

    def _residual_rows(self, attn, base: torch.Tensor, routing: InfusionRouting, which: int) -> torch.Tensor:
        """``base`` (n_c, L, inner) plus concept residuals at the slots (``which``: 0 key, 1 value)."""
        if not routing.slot_rows.numel():
            return base
        proj = "to_k" if which == 0 else "to_v"
        r = _value_residual(attn, self.delta[:, which], self.placement, proj)  # (K, inner)
        n_c, length, inner = base.shape
        flat = routing.slot_rows * length + routing.slot_pos  # (S,)
        add = torch.zeros(n_c * length, inner, dtype=r.dtype, device=r.device)
        add = add.index_add(0, flat, r[routing.slot_concept])
        return base + add.view(n_c, length, inner).to(base.dtype)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        routing = self.routing
        _check_call(type(self).__name__, routing, hidden_states, encoder_hidden_states, attention_mask)
        pre = _Preamble(attn, hidden_states, temb)
        n_f, heads = routing.n_f, attn.heads
        ctx = encoder_hidden_states[:n_f]
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q = _heads(attn.to_q(pre.hidden_states), heads)  # (n_f + n_c, heads, N, d)
        key, value = attn.to_k(ctx), attn.to_v(ctx)  # (n_f, L, inner)
        k, v = _heads(key, heads), _heads(value, heads)
        out_f = torch.matmul(_probs(attn, q[:n_f], k), v)  # (n_f, heads, N, d)
        if routing.n_c == 0:
            return pre.finish(out_f)
        k_c = _heads(self._residual_rows(attn, key[routing.pair], routing, 0), heads)  # (n_c, heads, L, d)
        v_c = _heads(self._residual_rows(attn, value[routing.pair], routing, 1), heads)
        out_c = torch.matmul(_probs(attn, q[n_f:], k_c), v_c)
        return pre.finish(torch.cat([out_f, out_c]))


def cross_attention_layers(unet) -> dict[str, nn.Module]:
    """Every cross-attention (``attn2``) module of ``unet``, keyed by its module path (sorted)."""
    names = sorted(n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor"))
    modules = dict(unet.named_modules())
    return {n: modules[n] for n in names}


@contextlib.contextmanager
def installed(unet, processors: Mapping[str, nn.Module], routing: InfusionRouting | None = None) -> Iterator[None]:
    """Install ``processors`` (keyed by attn2 module path) for the duration; always restore the previous ones.

    ``routing`` (optional) is set on every processor; it can be changed inside the block with :func:`route`.
    """
    previous = unet.attn_processors
    missing = set(processors) - {n[: -len(".processor")] for n in previous}
    if missing:
        raise ValueError(f"no attention layers named {sorted(missing)} in this UNet")
    new = dict(previous)
    new.update({f"{n}.processor": p for n, p in processors.items()})
    route(processors, routing)
    unet.set_attn_processor(new)
    try:
        yield
    finally:
        unet.set_attn_processor(previous)
        route(processors, None)


def route(processors: Mapping[str, nn.Module], routing: InfusionRouting | None) -> None:
    """Set the routing of the next UNet calls on every processor."""
    for p in processors.values():
        p.routing = routing
