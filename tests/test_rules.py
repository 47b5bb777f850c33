"""Rules: exact keep masks, reasons and thresholds on hand-written score arrays."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from filtering.rules import (
    REASONS,
    RuleDecision,
    absolute_thresholds,
    apply_rules,
    count_reasons,
    quantile_thresholds,
)

NAN = float("nan")


def _cfg(**kw) -> SimpleNamespace:
    base = dict(mode="absolute", clip_t_min=0.3, dino_min=0.6, clip_t_quantile=0.5, dino_quantile=0.5)
    base.update(kw)
    return SimpleNamespace(**base)


def test_absolute_masks_and_reasons():
    clip_t = np.array([0.35, 0.30, 0.29, 0.31, 0.10, NAN, 0.50, 0.50], dtype=np.float32)
    dino = np.array([0.70, 0.60, 0.90, 0.59, 0.20, 0.90, NAN, 0.61], dtype=np.float32)
    d = absolute_thresholds(clip_t, dino, clip_t_min=0.3, dino_min=0.6)
    np.testing.assert_array_equal(d.keep, [True, True, False, False, False, False, False, True])
    assert d.keep.dtype == bool and d.reason.dtype == object
    assert list(d.reason) == [
        None,
        None,  # equal to both thresholds (as float32): kept
        "clip_t_below_threshold",
        "dino_below_threshold",
        "clip_t_and_dino_below_threshold",
        "score_missing",
        "score_missing",
        None,
    ]
    assert d.thresholds == {"clip_t_min": 0.3, "dino_min": 0.6}


def test_absolute_boundary_equality_is_kept_float64():
    d = absolute_thresholds(np.array([0.25]), np.array([-0.5]), clip_t_min=0.25, dino_min=-0.5)
    assert d.keep.tolist() == [True] and d.reason.tolist() == [None]


def test_nan_in_both_scores_is_score_missing():
    d = absolute_thresholds(np.array([NAN, NAN]), np.array([NAN, 0.0]), 0.3, 0.6)
    assert d.keep.tolist() == [False, False]
    assert d.reason.tolist() == ["score_missing", "score_missing"]


def test_quantile_keeps_top_half():
    clip_t = np.array([0.1, 0.2, 0.3, 0.4])
    dino = np.array([0.9, 0.9, 0.9, 0.9])
    d = quantile_thresholds(clip_t, dino, clip_t_quantile=0.5, dino_quantile=0.5)
    assert d.thresholds["clip_t_min"] == pytest.approx(np.quantile(clip_t, 0.5)) == pytest.approx(0.25)
    assert d.thresholds["dino_min"] == pytest.approx(0.9)
    assert d.keep.tolist() == [False, False, True, True]
    assert d.reason.tolist() == ["clip_t_below_threshold", "clip_t_below_threshold", None, None]


def test_quantile_thresholds_match_numpy_and_ignore_nan():
    clip_t = np.array([0.31, 0.05, 0.22, NAN, 0.40, 0.18, 0.27])
    dino = np.array([0.55, 0.80, 0.62, 0.70, 0.30, NAN, 0.66])
    d = quantile_thresholds(clip_t, dino, clip_t_quantile=0.25, dino_quantile=0.75)
    t_clip = np.quantile(clip_t[~np.isnan(clip_t)], 0.25)
    t_dino = np.quantile(dino[~np.isnan(dino)], 0.75)
    assert d.thresholds["clip_t_min"] == pytest.approx(t_clip, abs=1e-12)
    assert d.thresholds["dino_min"] == pytest.approx(t_dino, abs=1e-12)
    expected_keep = (clip_t >= t_clip) & (dino >= t_dino)  # NaN compares False
    np.testing.assert_array_equal(d.keep, expected_keep)
    # rows 3 and 5 carry a NaN
    assert d.reason[3] == "score_missing" and d.reason[5] == "score_missing"


def test_quantile_extremes():
    clip_t = np.array([0.1, 0.2, 0.3])
    dino = np.array([0.5, 0.6, 0.7])
    keep_all = quantile_thresholds(clip_t, dino, 0.0, 0.0)
    assert keep_all.keep.all()
    only_max = quantile_thresholds(clip_t, dino, 1.0, 1.0)
    assert only_max.keep.tolist() == [False, False, True]
    assert only_max.reason.tolist() == ["clip_t_and_dino_below_threshold"] * 2 + [None]


def test_quantile_all_nan_and_empty():
    d = quantile_thresholds(np.array([NAN, NAN]), np.array([0.5, 0.7]), 0.5, 0.5)
    assert np.isnan(d.thresholds["clip_t_min"])
    assert d.reason.tolist() == ["score_missing", "score_missing"]
    e = quantile_thresholds(np.array([]), np.array([]), 0.5, 0.5)
    assert e.keep.shape == (0,) and e.reason.shape == (0,)


def test_dispatch_by_mode():
    scores = {"clip_t": np.array([0.1, 0.2, 0.3, 0.4]), "dino": np.array([0.7, 0.7, 0.7, 0.7]),
              "clip_i": np.zeros(4)}
    absolute = apply_rules(scores, _cfg(mode="absolute", clip_t_min=0.3, dino_min=0.6))
    assert absolute.keep.tolist() == [False, False, True, True]
    assert absolute.thresholds == {"clip_t_min": 0.3, "dino_min": 0.6}
    quantile = apply_rules(scores, _cfg(mode="quantile", clip_t_quantile=0.75, dino_quantile=0.0,
                                        clip_t_min=0.0, dino_min=0.99))
    assert quantile.thresholds["clip_t_min"] == pytest.approx(np.quantile(scores["clip_t"], 0.75))
    assert quantile.keep.tolist() == [False, False, False, True]


def test_apply_rules_with_the_real_config_model():
    from pipeline.build_config import RulesConfig

    scores = {"clip_t": np.array([0.31, 0.29]), "dino": np.array([0.61, 0.61])}
    assert apply_rules(scores, RulesConfig()).keep.tolist() == [True, False]


def test_errors_name_the_field():
    scores = {"clip_t": np.array([0.5]), "dino": np.array([0.5])}
    with pytest.raises(ValueError, match="rules.mode='median'"):
        apply_rules(scores, _cfg(mode="median"))
    with pytest.raises(ValueError, match="dino"):
        apply_rules({"clip_t": np.array([0.5])}, _cfg())
    with pytest.raises(ValueError, match="score lengths differ"):
        absolute_thresholds(np.array([0.5, 0.5]), np.array([0.5]), 0.3, 0.6)
    with pytest.raises(ValueError, match="expected \\(N,\\)"):
        absolute_thresholds(np.zeros((2, 2)), np.zeros((2, 2)), 0.3, 0.6)
    with pytest.raises(ValueError, match="clip_t_min=nan"):
        absolute_thresholds(scores["clip_t"], scores["dino"], NAN, 0.6)
    with pytest.raises(ValueError, match="dino_quantile=1.5"):
        quantile_thresholds(scores["clip_t"], scores["dino"], 0.5, 1.5)


def test_count_reasons_sums_to_n():
    clip_t = np.array([0.35, 0.30, 0.29, 0.31, 0.10, NAN, 0.50])
    dino = np.array([0.70, 0.60, 0.90, 0.59, 0.20, 0.90, 0.10])
    d = absolute_thresholds(clip_t, dino, 0.3, 0.6)
    counts = count_reasons(d)
    assert counts == {
        "kept": 2,
        "clip_t_below_threshold": 1,
        "dino_below_threshold": 2,
        "clip_t_and_dino_below_threshold": 1,
        "score_missing": 1,
    }
    assert sum(counts.values()) == len(clip_t)
    assert list(counts)[1:] == list(REASONS)


def test_decision_is_frozen():
    d = absolute_thresholds(np.array([0.5]), np.array([0.7]), 0.3, 0.6)
    assert isinstance(d, RuleDecision)
    with pytest.raises(AttributeError):
        d.keep = np.array([False])  # type: ignore[misc]
