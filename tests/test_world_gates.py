"""The gate computations on hand-made cases (the measured figures are in test_world_models.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from training.world.gates import Gate, attribute_rates, margin_stats, oracle_agreement, retrieval_top1


def test_retrieval_top1_counts_nearest_label():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    g_lab = np.array([0, 1, 2])
    queries = np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.2], [0.9, 0.8]])
    q_lab = np.array([0, 1, 2, 1])  # the last one is nearer gallery 0 (0.9 > 0.8): wrong
    assert retrieval_top1(queries, gallery, q_lab, g_lab) == pytest.approx(0.75)


def test_attribute_rates():
    truth = {"class": np.array([0, 1, 2, 3]), "colour": np.array([0, 0, 1, 1]), "size": np.array([1, 1, 1, 1])}
    pred = {"class": np.array([0, 1, 2, 0]), "colour": np.array([0, 1, 1, 1]), "size": np.array([1, 1, 0, 1])}
    r = attribute_rates(pred, truth)
    assert r["class"] == 0.75 and r["colour"] == 0.75 and r["size"] == 0.75
    assert r["class+colour"] == 0.5  # rows 0 and 2
    assert r["all"] == 0.25  # row 0 only


def test_margin_stats_same_vs_other_instance():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    inst = np.array([0, 0, 1, 1])
    cls = np.array([5, 5, 5, 5])
    same, other, won = margin_stats(emb, inst, cls)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert same == pytest.approx(float(unit[0] @ unit[1]))
    assert other == pytest.approx(np.mean([unit[i] @ unit[j] for i in (0, 1) for j in (2, 3)]))
    assert won == 1.0
    # swap the identities: every image is now closer to the other instance
    _, _, won = margin_stats(emb, np.array([0, 1, 0, 1]), cls)
    assert won == 0.0


def test_oracle_agreement_precision_recall():
    kept = np.array([1, 1, 1, 0, 0, 0], bool)
    good = np.array([1, 1, 0, 1, 0, 0], bool)
    a = oracle_agreement(kept, good)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert a["agreement"] == pytest.approx(4 / 6) and a["kept_and_good"] == 2
    empty = oracle_agreement(np.zeros(3, bool), np.zeros(3, bool))
    assert math.isnan(empty["precision"]) and math.isnan(empty["recall"]) and empty["agreement"] == 1.0


def test_gate_pass_rules():
    assert Gate("a", 0.9, 0.9, 0.1).passed and not Gate("a", 0.89, 0.9, 0.1).passed
    assert not Gate("a", 0.5, 0.5, 0.5, ">").passed and Gate("a", 0.51, 0.5, 0.5, ">").passed
    assert Gate("a", 1e-4, 1e-3, float("nan"), "<=").passed
    assert not Gate("a", float("nan"), 0.0, 0.0).passed
