"""The world's scene model (``models/world/t2i_scenes``): two-object scenes, prompts, the per-object reader, and
attention that localises.

The shipped model is measured here on evaluation scenes it never trained on; its recorded gates
(``t2i_scenes/gates.json``, written by ``cafe world make``) are pinned, and the attention figure must be far above
the t2i it was tuned from — the reason the model exists (EM concept masks read masks from these maps).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.world import domain as D
from training.world.scenes_t2i import (attention_iou, noun_column, object_phrase, scene_prompt,
                                       two_object_scene)

WORLD = Path(__file__).resolve().parents[1] / "models" / "world"


def test_two_object_scenes_are_seeded_distinct_and_described():
    a, b = two_object_scene(5), two_object_scene(5)
    assert a == b and two_object_scene(6) != a
    for seed in range(200):
        scene = two_object_scene(seed)
        classes = [o.instance.cls for o in scene.objects]
        positions = [o.position for o in scene.objects]
        assert len(set(classes)) == 2 and len(set(positions)) == 2
        assert positions == sorted(positions, key=D.POSITIONS.index)
        assert all(o.size == "small" for o in scene.objects)
    scene = two_object_scene(0)
    text = scene_prompt(scene)
    assert text == " and ".join(object_phrase(o) for o in scene.objects)
    assert all(D.phrase_attribute(D._PHRASE_OF[("position", o.position)]) == ("position", o.position)
               for o in scene.objects)
    import random

    seen = {scene_prompt(scene, random.Random(k)) for k in range(40)}
    assert len(seen) == 6          # two orders × with/without the background phrase, and the class words alone (2)
    assert all(w in D.VOCABULARY for t in seen for w in t.split())


def test_noun_column_finds_the_class_word():
    from training.world.t2i import tokenize
    from training.models.kit import load_role

    if not (WORLD / "t2i").is_dir():
        pytest.skip("models/world/t2i is not built")
    tok = load_role("t2i", WORLD / "t2i").components.tokenizer
    ids = tokenize(tok, ["a red star on the left and a blue circle in the center"])[0].tolist()
    assert noun_column(tok, ids, "star") == 3 and noun_column(tok, ids, "circle") == 10
    assert noun_column(tok, ids, "heart") is None


@pytest.fixture(scope="module")
def scene_models():
    if not (WORLD / "t2i_scenes" / "unet").is_dir():
        pytest.skip("models/world/t2i_scenes is not built")
    from training.models.kit import load_role

    torch.set_num_threads(2)
    return (load_role("t2i", WORLD / "t2i_scenes").components, load_role("t2i", WORLD / "t2i").components)


def test_the_scene_models_attention_localises_and_its_recorded_gates_hold(scene_models):
    scenes, base = scene_models
    recorded = {g["name"]: g for g in json.loads((WORLD / "t2i_scenes" / "gates.json").read_text())}
    # which gates the shipped model meets is pinned, so a regression (or a fix) shows: two_objects is missed (0.20:
    # the right-hand object's class is rarely right; see docs/world.md)
    assert {n for n, g in recorded.items() if g["passed"]} == {"t2i_scenes.attention_iou", "t2i_scenes.class+colour"}
    assert recorded["t2i_scenes.two_objects"]["figure"] > 0.1
    iou, per_object = attention_iou(scenes, n=16)
    base_iou, _ = attention_iou(base, n=16)
    assert len(per_object) == 32
    assert iou >= 0.5 and base_iou < 0.2, (iou, base_iou)
    # the first 16 of the gate's 64 scenes: same seeds, same computation — the figure is near the recorded one
    assert abs(iou - recorded["t2i_scenes.attention_iou"]["figure"]) < 0.1


def test_the_left_right_reader_reads_ground_truth_renders_and_catches_a_swap():
    from training.world.oracle import load_oracle
    from training.world.scenes_t2i import left_right_scene, read_left_right

    if not (WORLD / "oracle").is_dir():
        pytest.skip("models/world/oracle is not built")
    oracle = load_oracle(WORLD / "oracle", "cpu")
    scenes = [left_right_scene(k) for k in range(100)]
    images = np.stack([D.render(sc, k)[0] for k, sc in enumerate(scenes)])
    pairs = [tuple(o.instance for o in sc.objects) for sc in scenes]
    ok = read_left_right(oracle, images, pairs)
    assert ok.shape == (100, 2) and ok.all(axis=1).mean() >= 0.97
    swapped = read_left_right(oracle, images, [(b, a) for a, b in pairs])    # the objects in the wrong halves
    assert swapped.all(axis=1).mean() <= 0.05
