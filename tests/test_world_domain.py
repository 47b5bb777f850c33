"""The synthetic world's domain: determinism, exact masks, disjoint splits, the phrase vocabulary, the oracle."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.world import domain as D

WORLD = Path(__file__).resolve().parents[1] / "models" / "world"


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_bytes_other_seed_other_image():
    scene = D.random_multi_scene(3)
    a, ma = D.render(scene, 11)
    b, mb = D.render(scene, 11)
    assert _png(a) == _png(b) and all(np.array_equal(x, y) for x, y in zip(ma, mb))
    c, _ = D.render(scene, 12)
    assert not np.array_equal(a, c)  # the seed moves the jitter
    imgs1, lab1 = D.render_pairs(D.sample_pairs(20, 4, "all"), 4)
    imgs2, lab2 = D.render_pairs(D.sample_pairs(20, 4, "all"), 4)
    assert imgs1.tobytes() == imgs2.tobytes() and all(np.array_equal(lab1[k], lab2[k]) for k in lab1)


@pytest.mark.parametrize("cls", ["circle", "square", "cross", "star"])
@pytest.mark.parametrize("size", D.SIZES)
def test_mask_area_matches_analytic_area(cls, size):
    inst = D.Instance(cls, "blue", "none")
    for seed in range(3):
        scene = D.Scene.single(inst, D.Context("light gray", "center", size, "solid"))
        pl = D.layout(scene, seed)[0]
        area = D.shape_area(cls, pl.r)
        _, (cover,) = D.render(scene, seed, coverage=True)
        _, (mask,) = D.render(scene, seed)
        # coverage is sampled on the 4x grid: within 2 % of the analytic area
        assert cover.sum() == pytest.approx(area, rel=0.02)
        # the binary mask (>= half covered) errs only along the boundary: within half a pixel per edge pixel
        perimeter = 2 * math.pi * pl.r * (1.6 if cls in ("star", "cross") else 1.15)
        assert abs(int(mask.sum()) - area) <= 0.5 * perimeter
        assert mask.dtype == bool and mask.shape == (D.IMAGE_SIZE, D.IMAGE_SIZE)


def test_multi_object_masks_are_disjoint_and_visible():
    for k in range(20):
        scene = D.random_multi_scene(k)
        _, masks = D.render(scene, k)
        assert len(masks) == len(scene.objects) and 2 <= len(masks) <= 3
        total = np.sum(masks, axis=0)
        assert total.max() <= 1  # a pixel belongs to at most one object
        assert all(m.sum() > 10 for m in masks)


def test_mask_marks_the_object_colour():
    inst = D.Instance("square", "red", "none")
    image, (mask,) = D.render(D.Scene.single(inst, D.Context("dark gray", "left", "large", "solid")), 0)
    inside = image[mask].astype(int)
    assert np.all(np.abs(inside.mean(0) - np.array(D.COLOURS["red"])) < 25)
    assert abs(image[~mask].mean() - 70) < 8  # the dark gray background, plus antialiased edge pixels


def test_held_out_split_is_disjoint_and_covers_every_instance():
    train = set(D.sample_pairs(3000, 1, "train"))
    held = set(D.sample_pairs(600, 1, "held_out"))
    assert train and held and not train & held
    assert all(D.is_held_out(i, c) for i, c in held) and not any(D.is_held_out(i, c) for i, c in train)
    flags = [D.is_held_out(i, c) for i in D.all_instances() for c in D.all_contexts()]
    assert 0.12 < np.mean(flags) < 0.18
    for inst in D.all_instances():  # every instance is seen in training and tested in unseen contexts
        f = [D.is_held_out(inst, c) for c in D.all_contexts()]
        assert any(f) and not all(f)


def test_phrases_map_back_and_captions_use_the_vocabulary():
    for phrase, (attr, value) in D.PHRASES.items():
        assert D.phrase_attribute(phrase) == (attr, value)
        assert D.phrase_attribute("  " + phrase.replace(" ", "  ") + " ") == (attr, value)
    with pytest.raises(KeyError):
        D.phrase_attribute("on the beach")
    import random

    rng = random.Random(0)
    for inst, ctx in D.sample_pairs(200, 2, "all"):
        for text in (D.caption(inst, ctx), D.training_caption(inst, ctx, rng)):
            assert inst.cls in text.split()
            assert set(text.split()) <= set(D.VOCABULARY)
    inst, ctx = D.Instance("star", "red", "white dot"), D.Context("striped", "left", "small", "outline")
    assert D.caption(inst, ctx) == ("a red star with a white dot on a striped background on the left in small size "
                                    "in outline style")
    assert D.instance_from_id(inst.id) == inst


def test_world_tokenizer_has_one_token_per_vocabulary_word():
    from training.models.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer(32, D.VOCABULARY, 0)
    for word in D.VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_unknown_attribute_values_are_refused():
    with pytest.raises(ValueError, match="unknown colour"):
        D.Instance("star", "pink", "none")
    with pytest.raises(ValueError, match="1 to 3 objects"):
        D.Scene("light gray", ())


def test_shipped_oracle_reads_ground_truth_renders():
    """The oracle (shipped in models/world) on a seeded sample of fresh renders: every attribute ≥ 0.98."""
    from training.world.oracle import accuracy, load_oracle

    assert (WORLD / "oracle" / "model.safetensors").is_file(), "models/world/oracle is missing: run cafe world make"
    oracle = load_oracle(WORLD / "oracle")
    images, labels = D.render_pairs(D.sample_pairs(600, 777, "all"), 777)
    acc = accuracy(oracle.predict(images), labels)
    assert acc["all"] >= 0.98, acc
