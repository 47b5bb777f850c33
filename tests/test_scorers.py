"""Scorers: CLIP-T, DINO and CLIP-I on the tiny models equal an independent per-row computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from filtering.images import encode_png
from filtering.scorers import (
    CLIP_I,
    CLIP_T,
    DINO,
    SCORE_COLUMNS,
    ClipIScorer,
    ClipTScorer,
    DinoScorer,
    paired_cosine,
)

N = 5
PROMPTS = ["a cat in comic book style", "a dog on the beach", "a person wearing a red hat",
           "a car in comic book style", "a face on the beach"]


def _png(rng: np.random.Generator) -> bytes:
    """A 64×64 RGB image: a random colour gradient plus noise (not pure noise, so embeddings differ)."""
    base = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float64)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    img = (base[0, 0] * (1 - yy[..., None]) * (1 - xx[..., None]) + base[0, 1] * (1 - yy[..., None]) * xx[..., None]
           + base[1, 0] * yy[..., None] * (1 - xx[..., None]) + base[1, 1] * yy[..., None] * xx[..., None])
    img = np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8)
    return encode_png(Image.fromarray(img))


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "target_png": np.array([_png(rng) for _ in range(N)], dtype=object),
        "source_png": np.array([_png(rng) for _ in range(N)], dtype=object),
        "filled_prompt": np.array(PROMPTS, dtype=object),
        "row_id": np.arange(N),
    }


@pytest.fixture(scope="module")
def scorers(tiny_models):
    return {
        CLIP_T: ClipTScorer(str(tiny_models / "clip_filter")),
        DINO: DinoScorer(str(tiny_models / "dino_filter")),
        CLIP_I: ClipIScorer(str(tiny_models / "clip_filter")),
    }


@pytest.fixture(scope="module")
def reference(tiny_models):
    """Independent embedders: the libraries' own loaders, one row at a time, normalised by hand."""
    import open_clip
    from transformers import AutoImageProcessor, ViTModel

    clip_dir = tiny_models / "clip_filter"
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    clip.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    dino_dir = tiny_models / "dino_filter"
    dino = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    processor = AutoImageProcessor.from_pretrained(dino_dir)

    def unit(v: torch.Tensor) -> np.ndarray:
        v = v.detach().double().reshape(-1)
        return (v / v.norm()).numpy()

    def pil(png: bytes) -> Image.Image:
        import io

        return Image.open(io.BytesIO(png)).convert("RGB")

    @torch.no_grad()
    def clip_image(png: bytes) -> np.ndarray:
        return unit(clip.encode_image(preprocess(pil(png)).unsqueeze(0)))

    @torch.no_grad()
    def clip_text(text: str) -> np.ndarray:
        return unit(clip.encode_text(tokenizer([text])))

    @torch.no_grad()
    def dino_cls(png: bytes) -> np.ndarray:
        pixels = processor(images=pil(png), return_tensors="pt").pixel_values
        return unit(dino(pixel_values=pixels).last_hidden_state[0, 0])

    return {
        CLIP_T: lambda b: np.array([clip_image(t) @ clip_text(p) for t, p in zip(b["target_png"], b["filled_prompt"])]),
        DINO: lambda b: np.array([dino_cls(t) @ dino_cls(s) for t, s in zip(b["target_png"], b["source_png"])]),
        CLIP_I: lambda b: np.array([clip_image(t) @ clip_image(s) for t, s in zip(b["target_png"], b["source_png"])]),
    }


@pytest.mark.parametrize("column", SCORE_COLUMNS)
def test_score_equals_independent_computation(scorers, reference, batch, column):
    out = scorers[column](dict(batch))
    scores = out[column]
    assert scores.dtype == np.float32 and scores.shape == (N,)
    np.testing.assert_allclose(scores, reference[column](batch), atol=1e-5, rtol=0)
    assert np.all((scores >= -1.0) & (scores <= 1.0))
    # the batch's other columns pass through untouched
    for key, value in batch.items():
        assert out[key] is value


def test_scores_are_not_degenerate(scorers, batch):
    """Different rows get different scores (the tiny models are random, but not constant)."""
    for column in SCORE_COLUMNS:
        scores = scorers[column](dict(batch))[column]
        assert np.ptp(scores) > 1e-4, column


@pytest.mark.parametrize("column", [DINO, CLIP_I])
def test_identical_images_score_one(scorers, batch, column):
    same = {**batch, "source_png": batch["target_png"]}
    np.testing.assert_allclose(scorers[column](same)[column], np.ones(N), atol=1e-5, rtol=0)


@pytest.mark.parametrize("column", SCORE_COLUMNS)
def test_batch_order_is_preserved(scorers, batch, column):
    perm = np.random.default_rng(1).permutation(N)
    assert not np.array_equal(perm, np.arange(N))
    permuted = {k: v[perm] for k, v in batch.items()}
    base = scorers[column](dict(batch))[column]
    moved = scorers[column](permuted)[column]
    np.testing.assert_allclose(moved, base[perm], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(scorers[column](permuted)["row_id"], perm)


@pytest.mark.parametrize("column", SCORE_COLUMNS)
def test_empty_batch(scorers, column):
    empty = {"target_png": np.array([], dtype=object), "source_png": np.array([], dtype=object),
             "filled_prompt": np.array([], dtype=object)}
    scores = scorers[column](empty)[column]
    assert scores.dtype == np.float32 and scores.shape == (0,)


def test_missing_column_is_a_value_error(scorers, batch):
    with pytest.raises(ValueError, match="filled_prompt"):
        scorers[CLIP_T]({"target_png": batch["target_png"]})
    with pytest.raises(ValueError, match="source_png"):
        scorers[DINO]({"target_png": batch["target_png"]})


def test_embedding_helpers(scorers, batch, reference):
    """The exposed helpers give unit rows; their products are the scores."""
    from filtering.scorers import decode_pngs

    images = decode_pngs(batch["target_png"])
    img = scorers[CLIP_T].embed_images(images)
    txt = scorers[CLIP_T].embed_texts(list(batch["filled_prompt"]))
    assert img.shape == txt.shape == (N, 32) and img.dtype == torch.float32
    np.testing.assert_allclose(img.norm(dim=-1).numpy(), np.ones(N), atol=1e-6)
    np.testing.assert_allclose(paired_cosine(img, txt), reference[CLIP_T](batch), atol=1e-5, rtol=0)
    cls = scorers[DINO].embed_images(images)
    assert cls.shape == (N, 64)


def test_zero_embedding_gives_nan(tiny_models, batch):
    """A real CLIP whose image projection is zeroed embeds every image as 0: the score is NaN, not 0."""
    scorer = ClipTScorer(str(tiny_models / "clip_filter"))
    with torch.no_grad():
        scorer.embedder.model.visual.proj.zero_()
    scores = scorer(dict(batch))[CLIP_T]
    assert scores.dtype == np.float32 and np.isnan(scores).all()


def test_paired_cosine_nan_and_shape():
    a = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    out = paired_cosine(a, b)
    assert out[0] == 0.0 and np.isnan(out[1]) and out[2] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        paired_cosine(a, b[:2])


def test_fused_scorer_equals_separate_scorers(tiny_models, scorers, batch):
    """One stage, each PNG decoded once: the same three scores as the separate scorers."""
    from filtering.scorers import FusedScorer

    fused = FusedScorer(str(tiny_models / "clip_filter"), str(tiny_models / "dino_filter"))(batch)
    for column, scorer in scorers.items():
        np.testing.assert_allclose(fused[column], scorer(batch)[column], atol=1e-6)
    empty = FusedScorer(str(tiny_models / "clip_filter"), str(tiny_models / "dino_filter"))(
        {k: v[:0] for k, v in batch.items()})
    assert all(empty[c].shape == (0,) for c in SCORE_COLUMNS)


@pytest.mark.gpu
def test_fused_scorer_fp16_on_gpu_matches_fp32_cpu(tiny_models, batch):
    """The paper config scores in half precision on GPU: one fused batch, finite, close to fp32 on CPU."""
    from filtering.scorers import FusedScorer

    clip, dino = str(tiny_models / "clip_filter"), str(tiny_models / "dino_filter")
    ref = FusedScorer(clip, dino)(batch)
    gpu = FusedScorer(clip, dino, "float16", "float16", "cuda", "cuda")(batch)
    for column in SCORE_COLUMNS:
        assert np.isfinite(gpu[column]).all()
        np.testing.assert_allclose(gpu[column], ref[column], atol=2e-2)
