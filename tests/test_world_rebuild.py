"""`cafe world make` from scratch reproduces the shipped world's gate figures.

About 12 min on one H100 (CUDA is used when visible); about 110 min on the 2-core CPU machine (every stage
timed there separately; docs/world.md). Marked ``rebuild``: deselected by `make test`, run by `make test-rebuild`.
Tolerance: the same gates pass as in the shipped ``gates.json`` and each rate is within 0.05 of the shipped figure
(training is deterministic for a given device and thread count; other thread counts or a GPU change float
rounding, which moves the figures slightly — the shipped world's CLIP and DINO towers were trained on an H100 and
its VAE and t2i on the 2-core CPU; the H100-trained figures re-measured on the CPU were identical to the fourth
decimal).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

WORLD = Path(__file__).resolve().parents[1] / "models" / "world"


@pytest.mark.rebuild
@pytest.mark.slow
def test_make_world_reproduces_the_shipped_figures(tmp_path):
    from training.world.make import WorldConfig, make_world

    state = make_world(tmp_path, WorldConfig(threads=2))
    assert "gates" in state["stages"]
    shipped_gates = json.loads((WORLD / "gates.json").read_text())
    rebuilt_gates = json.loads((tmp_path / "gates.json").read_text())
    assert {g["name"] for g in rebuilt_gates if g["passed"]} == {g["name"] for g in shipped_gates if g["passed"]}
    shipped = {g["name"]: g["figure"] for g in shipped_gates}
    rebuilt = {g["name"]: g["figure"] for g in rebuilt_gates}
    assert rebuilt.keys() == shipped.keys()
    for name, figure in rebuilt.items():
        tol = 1e-3 if name == "clip_cond.consistent" else 0.05
        assert abs(figure - shipped[name]) <= tol, (name, figure, shipped[name])
