"""Keep/drop rules on stored score columns (SPEC §1.4): pure functions, numpy only.

Usage::

    decision = apply_rules({"clip_t": clip_t, "dino": dino}, cfg.rules)
    kept = table.filter(decision.keep)
    report["filter"] = count_reasons(decision)

Scorers compute, rules decide: the score columns (:mod:`filtering.scorers`) always stay on the row, so these
functions can be re-applied later (``refilter``) with other thresholds without re-scoring.

Two modes:

* ``absolute`` — keep a row iff ``clip_t >= clip_t_min`` and ``dino >= dino_min``. The paper's values are
  CLIP-T ≥ 0.3 (CLIP ViT-B/32, image vs. the filled instruction ``"a {class} {phrase}"``) and DINO ≥ 0.6
  (DINO ViT-S/16 CLS, target vs. source). A value equal to its threshold is kept.
* ``quantile`` — the thresholds are the ``np.nanquantile`` of each score over the rows passed in, then the
  absolute rule applies (rows at or above the quantile are kept). Meant for ``refilter`` over a whole
  dataset; applied during a build it would see one chunk at a time and give per-chunk thresholds.

A NaN score (either column) drops the row with reason ``score_missing``; it is never compared.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CLIP_T",
    "DINO",
    "REASONS",
    "RuleDecision",
    "absolute_thresholds",
    "apply_rules",
    "count_reasons",
    "quantile_thresholds",
]

# Score column names the rules read. filtering.scorers re-exports these (this module stays numpy-only, so
# the names are defined here rather than imported from the torch-importing scorers module).
CLIP_T = "clip_t"
DINO = "dino"

KEPT = "kept"
CLIP_T_BELOW = "clip_t_below_threshold"
DINO_BELOW = "dino_below_threshold"
BOTH_BELOW = "clip_t_and_dino_below_threshold"
SCORE_MISSING = "score_missing"
#: every reason a dropped row can carry, in report order
REASONS: tuple[str, ...] = (CLIP_T_BELOW, DINO_BELOW, BOTH_BELOW, SCORE_MISSING)

MODES: tuple[str, ...] = ("absolute", "quantile")


@dataclass(frozen=True)
class RuleDecision:
    """The outcome of a rule over N rows.

    Attributes:
        keep: ``(N,)`` bool; True for rows that pass.
        reason: ``(N,)`` object; ``None`` for kept rows, else one of :data:`REASONS`.
        thresholds: The thresholds actually used: ``{"clip_t_min": float, "dino_min": float}`` (in quantile
            mode, the computed quantiles; NaN when a score had no finite value).
    """

    keep: np.ndarray
    reason: np.ndarray
    thresholds: dict[str, float]


def absolute_thresholds(
    clip_t: np.ndarray, dino: np.ndarray, clip_t_min: float, dino_min: float
) -> RuleDecision:
    """Keep rows whose CLIP-T and DINO scores are both at or above fixed thresholds.

    Usage: ``decision = absolute_thresholds(clip_t, dino, clip_t_min=0.3, dino_min=0.6)``

    Args:
        clip_t: ``(N,)`` CLIP-T scores (target image vs. the filled instruction).
        dino: ``(N,)`` DINO scores (target vs. source CLS cosine).
        clip_t_min: Keep iff ``clip_t >= clip_t_min`` (paper: 0.3).
        dino_min: Keep iff ``dino >= dino_min`` (paper: 0.6).

    Returns:
        The decision. Reasons: ``score_missing`` when either score is NaN, else
        ``clip_t_and_dino_below_threshold``, ``clip_t_below_threshold`` or ``dino_below_threshold``.

    Raises:
        ValueError: If the arrays are not 1-D of equal length, or a threshold is not a finite number.
    """
    clip_t, dino = _scores(clip_t, dino)
    for name, value in (("clip_t_min", clip_t_min), ("dino_min", dino_min)):
        if not np.isfinite(_as_float(name, value)):
            raise ValueError(f"{name}={value!r}; must be a finite number")
    return _decide(clip_t, dino, float(clip_t_min), float(dino_min))


def quantile_thresholds(
    clip_t: np.ndarray, dino: np.ndarray, clip_t_quantile: float, dino_quantile: float
) -> RuleDecision:
    """Keep rows at or above a quantile of each score, computed over the rows passed in.

    Usage: ``decision = quantile_thresholds(clip_t, dino, clip_t_quantile=0.5, dino_quantile=0.5)``

    The thresholds are ``np.nanquantile(score, q)`` (numpy's default linear interpolation, NaN rows
    ignored), then :func:`absolute_thresholds`' rule applies. Because the quantile is taken over exactly the
    rows given, this mode is meant for ``refilter`` over a whole dataset; during a build it would be applied
    per chunk, giving per-chunk thresholds.

    Args:
        clip_t: ``(N,)`` CLIP-T scores.
        dino: ``(N,)`` DINO scores.
        clip_t_quantile: Quantile in ``[0, 1]`` of ``clip_t`` used as its threshold.
        dino_quantile: Quantile in ``[0, 1]`` of ``dino`` used as its threshold.

    Returns:
        The decision, with the computed thresholds in ``thresholds`` (NaN for a score with no finite value;
        every row is then ``score_missing`` anyway).

    Raises:
        ValueError: If the arrays are not 1-D of equal length, or a quantile is outside ``[0, 1]``.
    """
    clip_t, dino = _scores(clip_t, dino)
    for name, q in (("clip_t_quantile", clip_t_quantile), ("dino_quantile", dino_quantile)):
        if not 0.0 <= _as_float(name, q) <= 1.0:
            raise ValueError(f"{name}={q!r}; must be in [0, 1]")
    return _decide(clip_t, dino, _nanquantile(clip_t, float(clip_t_quantile)),
                   _nanquantile(dino, float(dino_quantile)))


def apply_rules(scores: dict[str, np.ndarray], cfg: Any) -> RuleDecision:
    """Apply the configured rule to score columns.

    Usage: ``decision = apply_rules({"clip_t": ..., "dino": ...}, cfg.rules)``

    Args:
        scores: Column name → ``(N,)`` scores; must hold ``"clip_t"`` and ``"dino"`` (other columns, e.g.
            ``"clip_i"``, are ignored).
        cfg: A ``RulesConfig``-like object (duck-typed; ``filtering`` does not import ``pipeline``) with
            ``mode`` (``"absolute"`` | ``"quantile"``), ``clip_t_min``, ``dino_min``, ``clip_t_quantile``
            and ``dino_quantile``.

    Returns:
        The decision of :func:`absolute_thresholds` or :func:`quantile_thresholds`.

    Raises:
        ValueError: For an unknown mode or a missing score column.
    """
    missing = [c for c in (CLIP_T, DINO) if c not in scores]
    if missing:
        raise ValueError(f"apply_rules: score column(s) {missing} missing; got {sorted(scores)}")
    mode = cfg.mode
    if mode == "absolute":
        return absolute_thresholds(scores[CLIP_T], scores[DINO], cfg.clip_t_min, cfg.dino_min)
    if mode == "quantile":
        return quantile_thresholds(scores[CLIP_T], scores[DINO], cfg.clip_t_quantile, cfg.dino_quantile)
    raise ValueError(f"rules.mode={mode!r}; allowed: {', '.join(MODES)}")


def count_reasons(decision: RuleDecision) -> dict[str, int]:
    """Count kept rows and each drop reason.

    Usage: ``report["filter"] = count_reasons(decision)``

    Args:
        decision: A rule's decision.

    Returns:
        ``{"kept": n, <each of REASONS>: n}`` (zeros included, in :data:`REASONS` order); the values sum to
        the number of rows.
    """
    counts = {KEPT: int(np.count_nonzero(decision.keep))}
    counts.update({r: 0 for r in REASONS})
    for r in decision.reason[~np.asarray(decision.keep, dtype=bool)]:
        counts[r] = counts.get(r, 0) + 1
    return counts


# --- helpers ---------------------------------------------------------------------------------------


def _decide(clip_t: np.ndarray, dino: np.ndarray, clip_t_min: float, dino_min: float) -> RuleDecision:
    missing = np.isnan(clip_t) | np.isnan(dino)
    with np.errstate(invalid="ignore"):  # NaN comparisons are masked by `missing` below
        clip_low = ~missing & ~(clip_t >= clip_t_min)
        dino_low = ~missing & ~(dino >= dino_min)
    keep = ~(missing | clip_low | dino_low)
    reason = np.full(clip_t.shape, None, dtype=object)
    reason[clip_low & ~dino_low] = CLIP_T_BELOW
    reason[dino_low & ~clip_low] = DINO_BELOW
    reason[clip_low & dino_low] = BOTH_BELOW
    reason[missing] = SCORE_MISSING
    return RuleDecision(keep=keep, reason=reason, thresholds={"clip_t_min": clip_t_min, "dino_min": dino_min})


def _scores(clip_t: np.ndarray, dino: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both score columns as float64 ``(N,)`` arrays (float32 scores compare exactly after widening)."""
    out = []
    for name, values in ((CLIP_T, clip_t), (DINO, dino)):
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"{name} scores have shape {arr.shape}; expected (N,)")
        out.append(arr)
    if out[0].shape != out[1].shape:
        raise ValueError(f"score lengths differ: {CLIP_T} {out[0].shape[0]}, {DINO} {out[1].shape[0]}")
    return out[0], out[1]


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}; must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}; must be a number") from None


def _nanquantile(values: np.ndarray, q: float) -> float:
    """``np.nanquantile`` that returns NaN (no warning) when no value is finite."""
    if not np.any(~np.isnan(values)):
        return float("nan")
    return float(np.nanquantile(values, q))
