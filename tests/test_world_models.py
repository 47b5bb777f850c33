"""The shipped world (models/world): every gate re-measured on the stored files, loaded through the model kit.

This is `cafe world check models/world` as a test: about a minute on the 2-core machine. The files are in git;
a missing file is a failure, never a skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

WORLD = Path(__file__).resolve().parents[1] / "models" / "world"


@pytest.fixture(scope="module")
def measured():
    from training.world.gates import measure_gates

    assert (WORLD / "gates.json").is_file(), "models/world is incomplete: run `cafe world make models/world`"
    return measure_gates(WORLD, progress=lambda m: None)


#: gates the shipped world misses (figures and reasons: docs/world.md, bench/RESULTS.md). The test below fails when
#: this set is wrong in either direction: a gate that starts passing must be moved out, a new miss is a regression.
KNOWN_FAILING: set[str] = set()  # the fourth world meets every gate


@pytest.mark.slow
def test_gate_outcomes_are_the_recorded_ones(measured):
    from training.world.gates import format_table

    failed = {g.name for g in measured if not g.passed}
    assert failed == KNOWN_FAILING, "\n" + format_table(measured)
    passing = {g.name for g in measured} - failed
    assert {"oracle", "t2i.class+colour", "vae.class+colour", "t2i.background", "t2i.position", "t2i.size",
            "clip.context_margin", "clip_cond.consistent",
            "dino_filter.margin", "dino_cond.margin"} <= passing


@pytest.mark.slow
def test_figures_match_the_recorded_gates(measured):
    """gates.json was written by `cafe world make` on the same files: re-measuring gives the same figures
    (CPU float results may differ in the last bits across thread counts: tolerance 0.02 on rates)."""
    recorded = {g["name"]: g for g in json.loads((WORLD / "gates.json").read_text())}
    for g in measured:
        assert g.name in recorded
        tol = 1e-3 if g.comparison == "<=" else 0.02
        assert abs(g.figure - recorded[g.name]["figure"]) <= tol, (g.name, g.figure, recorded[g.name]["figure"])


def test_world_config_points_at_the_shipped_world():
    from pipeline.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert Path(cfg.models.root) == Path("models/world") or Path(cfg.models.root).resolve() == WORLD
    for role in ("t2i", "clip_filter", "dino_filter", "clip_cond", "dino_cond", "promptnet", "llm", "dialogue_llm"):
        assert (WORLD / role).is_dir(), role
    assert Path(cfg.build.scoring.oracle) == Path("models/world/oracle")
    total = sum(p.stat().st_size for p in WORLD.rglob("*") if p.is_file() and "_work" not in p.parts)
    assert total <= 40 * 1024 * 1024, f"the world is {total / 2**20:.1f} MiB; the budget is 40 MB"
