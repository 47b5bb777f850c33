"""DBIM — the aggregation step of DCI (SPEC §4.2 steps 1–5), as a cross-attention processor.

Usage::

    config = DbimConfig(concept_rows=(1,), aux_rows=(2,), concept_real=..., aux_real=..., concept_tokens=T_c,
                        aux_noun_tokens=aux_idx, lam=0.0)
    procs = {name: DbimAttnProcessor(config, kv=ico_layer) for name, ico_layer in concept_layers.items()}
    with installed_processors(unet, procs):
        out = unet(torch.cat([x, x, x_aux]), t, encoder_hidden_states=torch.cat([uncond, c, c_aux])).sample

Per head, on the post-softmax probabilities ``P`` (B, H, N, L) of every ``attn2`` (N pixels, L tokens):

1. ``S = softmax_tokens(10 · P[..., real tokens])`` separately for the concept and the auxiliary rows (SOS,
   EOS and padding excluded: they get S = 0);
2. ``a_c = Σ_{j∈T_c} S_c[..., j]``, ``a_a = 1 − Σ_{j∈aux noun} S_a[..., j]``;
3. ``m_c = 500 · softmax_pixels(10 · a_c)``, ``m_a = 500 · softmax_pixels(10 · a_a)``;
4. ``[M_c, M_a] = softmax_branch([m_c, λ · m_a])``;
5. ``O_c ← M_c ⊙ O_c + M_a ⊙ O_a`` on the per-head attention output before ``to_out``.

Unconditional and auxiliary rows are returned bit-for-bit unchanged. The masks are computed in float32 whatever
the compute dtype (``500 · softmax`` over 4096 pixels underflows in float16). λ = −∞ gives ``M_c = 1``,
``M_a = 0`` exactly, so the concept row is unchanged; λ = +∞ gives ``M_c = 0``, ``M_a = 1`` (the limits —
the plain formula would produce NaN there).

The processor holds no weights of its own; with ``kv`` (an :class:`~training.attention.ico.IcoAttnProcessor`)
it computes keys and values with the concept's trained ``to_k``/``to_v``, otherwise with the base layer's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from training.attention.ico import IcoAttnProcessor, attention_in, attention_out

TOKEN_TEMPERATURE = 10.0  # step 1: softmax(10 · P)
PIXEL_TEMPERATURE = 10.0  # step 3: softmax(10 · a)
PIXEL_SCALE = 500.0  # step 3: 500 · softmax


@dataclass(frozen=True)
class DbimConfig:
    """Which batch rows are branches and which token positions matter (one DCI call).

    Attributes:
        concept_rows: batch indices of the concept rows, paired one-to-one with ``aux_rows``.
        aux_rows: batch indices of the auxiliary rows.
        concept_real: (L,) bool, the concept prompt's real tokens (not SOS/EOS/padding).
        aux_real: (L,) bool, the auxiliary prompt's real tokens.
        concept_tokens: T_c, positions of the V tokens and the noun in the concept prompt.
        aux_noun_tokens: positions of the auxiliary noun in the auxiliary prompt.
        lam: injection ratio λ (finite, or ±inf for the limits).
    """

    concept_rows: tuple[int, ...]
    aux_rows: tuple[int, ...]
    concept_real: torch.Tensor
    aux_real: torch.Tensor
    concept_tokens: tuple[int, ...]
    aux_noun_tokens: tuple[int, ...]
    lam: float = 0.0

    def __post_init__(self):
        if len(self.concept_rows) != len(self.aux_rows):
            raise ValueError(f"DbimConfig: concept_rows {self.concept_rows} and aux_rows {self.aux_rows} must pair "
                             "one-to-one")
        if math.isnan(self.lam):
            raise ValueError("DbimConfig.lam: NaN is not allowed (a float, or ±inf)")
        for field, tokens, real in (("concept_tokens", self.concept_tokens, self.concept_real),
                                    ("aux_noun_tokens", self.aux_noun_tokens, self.aux_real)):
            if not tokens or not all(0 <= j < real.numel() and bool(real[j]) for j in tokens):
                raise ValueError(f"DbimConfig.{field}: {tokens} must be non-empty positions of real tokens")


def _token_share(probs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Step 1: softmax over the real tokens of ``10 · probs`` (R, H, N, L) → (R, H, N, L), 0 off the real ones."""
    logits = (TOKEN_TEMPERATURE * probs.float()).masked_fill(~real.to(probs.device), float("-inf"))
    return logits.softmax(dim=-1)


def dbim_masks(probs_c: torch.Tensor, probs_a: torch.Tensor, config: DbimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1–4: the aggregation masks ``(M_c, M_a)``, each (R, H, N) float32, from (R, H, N, L) probabilities."""
    s_c = _token_share(probs_c, config.concept_real)
    s_a = _token_share(probs_a, config.aux_real)
    a_c = s_c[..., list(config.concept_tokens)].sum(-1)  # (R, H, N)
    a_a = 1.0 - s_a[..., list(config.aux_noun_tokens)].sum(-1)  # (R, H, N)
    m_c = PIXEL_SCALE * (PIXEL_TEMPERATURE * a_c).softmax(dim=-1)  # softmax over pixels
    m_a = PIXEL_SCALE * (PIXEL_TEMPERATURE * a_a).softmax(dim=-1)
    if math.isinf(config.lam):  # the limits of softmax([m_c, λ·m_a]) (m_a > 0)
        concept_wins = config.lam < 0
        return (torch.full_like(m_c, float(concept_wins)), torch.full_like(m_a, float(not concept_wins)))
    masks = torch.stack([m_c, config.lam * m_a]).softmax(dim=0)  # (2, R, H, N): softmax over branches
    return masks[0], masks[1]


def dbim_aggregate(probs: torch.Tensor, out: torch.Tensor, config: DbimConfig) -> torch.Tensor:
    """Step 5 on a whole batch: ``probs`` (B, H, N, L), per-head ``out`` (B, H, N, d) → new ``out``.

    Only the concept rows change: ``O_c ← M_c ⊙ O_c + M_a ⊙ O_a`` (computed in float32, returned in
    ``out.dtype``); every other row is the input tensor's row, bit for bit.
    """
    rc, ra = list(config.concept_rows), list(config.aux_rows)
    m_c, m_a = dbim_masks(probs[rc], probs[ra], config)  # (R, H, N)
    mixed = m_c[..., None] * out[rc].float() + m_a[..., None] * out[ra].float()  # (R, H, N, d)
    result = out.clone()
    result[rc] = mixed.to(out.dtype)
    return result


class DbimAttnProcessor(nn.Module):
    """Cross-attention that applies DBIM to the concept rows; keys/values from ``kv`` (ICO) or the base layer."""

    def __init__(self, config: DbimConfig, kv: IcoAttnProcessor | None = None):
        super().__init__()
        self.config = config
        self.kv = kv

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        hidden_states, context, residual, shape4 = attention_in(attn, hidden_states, encoder_hidden_states,
                                                                attention_mask, temb)
        query = attn.to_q(hidden_states)  # (B, N, H·d)
        if self.kv is not None:
            key, value = self.kv.key_value(context, query.dtype)
        else:
            key, value = attn.to_k(context), attn.to_v(context)
        b, n = query.shape[:2]
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))  # (B·H, ·, d)
        probs = attn.get_attention_scores(query, key, None)  # (B·H, N, L)
        out = torch.bmm(probs, value)  # (B·H, N, d)
        h = attn.heads
        out = dbim_aggregate(probs.view(b, h, n, -1), out.view(b, h, n, -1), self.config).view(b * h, n, -1)
        return attention_out(attn, out, residual, shape4)
