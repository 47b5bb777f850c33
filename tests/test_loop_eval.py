"""`cafe eval`'s metrics against independent computations on hand-made sets."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.trainutil import WORLD


def _img(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def embedders():
    from training.embedders import ClipEmbedder, DinoEmbedder

    return ClipEmbedder(str(WORLD / "clip_filter")), DinoEmbedder(str(WORLD / "dino_filter"))


def test_dreambench_equals_mean_pairwise_cosines_per_subject(embedders):
    from pipeline.loop.evaluate import dreambench

    clip, dino = embedders
    files = sorted((WORLD / "sources").rglob("*.png"))
    gen = [_img(f) for f in files[:5]]
    meta = [{"subject": s, "class": c, "phrase": p} for s, c, p in
            (("s1", "circle", "on the left"), ("s1", "circle", "in large size"), ("s2", "star", "on the right"),
             ("s2", "star", "in small size"), ("s2", "star", "on a striped background"))]
    refs = {"s1": [_img(f) for f in files[10:12]], "s2": [_img(f) for f in files[20:23]]}
    got = dreambench(clip, dino, gen, meta, refs)

    def cos(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    pil = lambda xs: [Image.fromarray(x) for x in xs]  # noqa: E731
    for name, emb in (("dino", dino), ("clip_i", clip)):
        g = emb.embed_images(pil(gen)).numpy()
        per_subject = []
        for s, idx in (("s1", [0, 1]), ("s2", [2, 3, 4])):
            r = emb.embed_images(pil(refs[s])).numpy()
            per_subject.append(np.mean([cos(g[i], r[j]) for i in idx for j in range(len(r))]))
        assert got[name]["mean"] == pytest.approx(np.mean(per_subject), abs=1e-4)
        assert got[name]["se"] == pytest.approx(np.std(per_subject, ddof=1) / np.sqrt(2), abs=1e-4)
    g = clip.embed_images(pil(gen)).numpy()
    t = clip.embed_texts([f"a {m['class']} {m['phrase']}" for m in meta]).numpy()
    per = [cos(g[i], t[i]) for i in range(5)]
    assert got["clip_t"]["mean"] == pytest.approx(np.mean([np.mean(per[:2]), np.mean(per[2:])]), abs=1e-4)


def test_oracle_verdicts_and_rates_on_hand_made_readings():
    from training.world.assistant_eval import oracle_rates, oracle_verdicts

    # cyan-circle-whitedot: class circle, colour cyan, mark white dot
    meta = [{"subject": "cyan-circle-whitedot", "attribute": "position", "value": "left", "held_out": False},
            {"subject": "cyan-circle-whitedot", "attribute": "position", "value": "left", "held_out": True},
            {"subject": "cyan-circle-whitedot", "attribute": "size", "value": "large", "held_out": True},
            {"subject": "cyan-circle-whitedot", "attribute": "size", "value": "large", "held_out": False}]
    read = {"class": ["circle", "circle", "star", "circle"], "colour": ["cyan", "cyan", "cyan", "red"],
            "mark": ["white dot"] * 4, "position": ["left", "right", "left", "left"],
            "size": ["small", "small", "large", "large"]}
    from training.world import domain as D

    assert set(D.IDENTITY_ATTRIBUTES) <= set(read)
    v = oracle_verdicts(read, meta)
    assert v["identity"].tolist() == [True, True, False, False]
    assert v["instruction"].tolist() == [True, False, True, True]
    assert v["both"].tolist() == [True, False, False, False]
    r = oracle_rates(read, meta)
    assert r["all"]["both"] == {"rate": 0.25, "se": round(np.sqrt(0.25 * 0.75 / 4), 4), "n": 4}
    assert r["held_out"]["identity"]["rate"] == 0.5 and r["held_out"]["identity"]["n"] == 2
    assert "changing" not in r
    r = oracle_rates(read, meta, changing=np.array([True, False, True, False]))
    assert r["changing"]["both"]["n"] == 2 and r["changing"]["both"]["rate"] == 0.5  # rows 0 and 2
    assert r["changing"]["identity"]["rate"] == 0.5 and r["all"] == oracle_rates(read, meta)["all"]


def test_flat_metrics_and_table():
    from pipeline.loop.evaluate import flat_metrics, format_table

    m = {"mean": 0.5, "se": 0.1, "subjects": 2}
    rate = {"rate": 0.25, "se": 0.2, "n": 4}
    report = {"n": 4, "n_held_out": 2, "seeds": [0], "steps": 20, "guidance": 2.5, "scale_dino": 1.0,
              "methods": {"assistant": {"dino": m, "clip_i": m, "clip_t": m,
                                        "oracle": {"all": {"identity": rate, "instruction": rate, "both": rate},
                                                   "held_out": {"identity": rate, "instruction": rate,
                                                                "both": {**rate, "rate": 0.5}}}}}}
    flat = flat_metrics(report)
    assert flat == {"assistant.dino": 0.5, "assistant.clip_i": 0.5, "assistant.clip_t": 0.5,
                    "assistant.identity": 0.25, "assistant.instruction": 0.25, "assistant.both": 0.25}
    assert flat_metrics(report, "held_out")["assistant.both"] == 0.5
    table = format_table(report)
    assert "| assistant | 0.500 ± 0.100 |" in table and "0.500 ± 0.200 |" in table


def test_paired_difference_equals_a_direct_computation():
    """Difference of two rounds' verdicts on the same pairs ± the paired s.e. (std of the differences / √n),
    against a hand computation; paired s.e. is below the unpaired one when the verdicts agree on most pairs."""
    import math

    from pipeline.loop.evaluate import paired_difference

    a = [1, 1, 0, 1, 0, 0, 1, 1, 0, 0]
    b = [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    d = [x - y for x, y in zip(a, b)]  # two pairs gained, none lost
    mean = sum(d) / 10
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 9)
    got = paired_difference(a, b)
    assert got[0] == mean == 0.2 and math.isclose(got[1], sd / math.sqrt(10)) and got[2] == 10
    unpaired = math.sqrt(0.5 * 0.5 / 10 + 0.3 * 0.7 / 10)
    assert got[1] < unpaired
    assert paired_difference([1], [0])[2] == 1 and math.isnan(paired_difference([1], [0])[1])
