"""Score columns for the automatic filter (SPEC §1.4): CLIP-T, DINO and CLIP-I.

Usage::

    scorer = ClipTScorer("models/tiny/clip_filter")
    batch = scorer({"target_png": pngs, "filled_prompt": texts})    # adds batch["clip_t"], (N,) float32

Each scorer is a plain callable class in the Ray Data "stateful transform" shape: the model is loaded once in
``__init__`` (through :func:`training.models.kit.load_role`), and ``__call__(batch)`` adds one float32 score
column computed in one batched forward pass under ``torch.inference_mode()``. Ray is not imported here; the
pipeline wraps these classes in actor pools.

=============  =================  =================================================================
column         role (paper)       score
=============  =================  =================================================================
``clip_t``     ``clip_filter``    cosine(CLIP image embedding of ``target_png``, CLIP text embedding
               (CLIP ViT-B/32)    of ``filled_prompt``, the filled instruction ``"a {class} {phrase}"``)
``dino``       ``dino_filter``    cosine(DINO CLS embedding of ``target_png``, of ``source_png``)
               (DINO ViT-S/16)
``clip_i``     ``clip_filter``    cosine(CLIP image embedding of ``target_png``, of ``source_png``)
=============  =================  =================================================================

The embedders (:class:`ClipEmbedder`, :class:`DinoEmbedder`) live in :mod:`training.embedders`, shared with the
evaluation metrics (:mod:`training.metrics`), and are re-exported here.

Images arrive as PNG bytes (:func:`filtering.images.encode_png`) in object arrays. Embeddings are computed in
the model's dtype and compared in float32. An embedding of zero norm has no direction: it normalises to NaN
(not to the zero vector that ``F.normalize`` would give), and the score stays NaN so the rules drop the row
as ``score_missing`` (:mod:`filtering.rules`); a NaN produced by the model itself (e.g. fp16 overflow) also
passes through unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from filtering.images import decode_png_rgb
from filtering.rules import CLIP_T, DINO
from training.embedders import ClipEmbedder, DinoEmbedder  # re-exported: shared with training.metrics

__all__ = [
    "CLIP_I",
    "CLIP_T",
    "DINO",
    "FILLED_PROMPT",
    "SCORE_COLUMNS",
    "SOURCE_PNG",
    "TARGET_PNG",
    "ClipEmbedder",
    "ClipIScorer",
    "ClipTScorer",
    "DinoEmbedder",
    "DinoScorer",
    "FusedScorer",
    "decode_pngs",
    "paired_cosine",
]

# Score columns written by the scorers (CLIP_T and DINO are defined in filtering.rules, which reads them).
CLIP_I = "clip_i"
SCORE_COLUMNS: tuple[str, ...] = (CLIP_T, DINO, CLIP_I)
# Input columns the scorers read.
TARGET_PNG = "target_png"
SOURCE_PNG = "source_png"
FILLED_PROMPT = "filled_prompt"


# --- scorers (Ray Data callable classes) -----------------------------------------------------------


class ClipTScorer:
    """Adds ``clip_t``: CLIP image–text cosine of the target image and the filled instruction.

    Usage: ``batch = ClipTScorer(role_dir)(batch)``

    The model is the ``clip_filter`` role (CLIP ViT-B/32 in the paper). The text is the row's
    ``filled_prompt``, the filled instruction ``"a {class} {phrase}"`` (SPEC §1.4: the paper does not say
    which text; the 0.3 threshold depends on this choice).

    Args:
        role_dir: The ``clip_filter`` directory.
        dtype: Model dtype.
        device: Model device.
    """

    def __init__(self, role_dir: str, dtype: str = "float32", device: str = "cpu") -> None:
        self.embedder = ClipEmbedder(role_dir, dtype=dtype, device=device)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)`` float32 normalised CLIP image embeddings (see :meth:`ClipEmbedder.embed_images`)."""
        return self.embedder.embed_images(images)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 normalised CLIP text embeddings (see :meth:`ClipEmbedder.embed_texts`)."""
        return self.embedder.embed_texts(texts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a batch.

        Args:
            batch: Columns ``target_png`` (PNG bytes) and ``filled_prompt`` (str), N rows each.

        Returns:
            The batch with ``clip_t`` added: ``(N,)`` float32 in ``[-1, 1]`` or NaN.
        """
        _require_columns(batch, TARGET_PNG, FILLED_PROMPT)
        images = self.embed_images(decode_pngs(batch[TARGET_PNG]))
        texts = self.embed_texts(list(batch[FILLED_PROMPT]))
        return {**batch, CLIP_T: paired_cosine(images, texts)}


class _ImagePairScorer:
    """Cosine of two images' embeddings (target vs. source); subclasses name the embedder and the column."""

    column: str
    embedder_cls: type

    def __init__(self, role_dir: str, dtype: str = "float32", device: str = "cpu") -> None:
        self.embedder = self.embedder_cls(role_dir, dtype=dtype, device=device)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)`` float32 normalised image embeddings of this scorer's model."""
        return self.embedder.embed_images(images)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a batch; targets and sources go through the model together (one forward of 2N images).

        Args:
            batch: Columns ``target_png`` and ``source_png`` (PNG bytes), N rows each.

        Returns:
            The batch with this scorer's column added: ``(N,)`` float32 in ``[-1, 1]`` or NaN.
        """
        _require_columns(batch, TARGET_PNG, SOURCE_PNG)
        return {**batch, self.column: _image_pair_cosine(self.embed_images, batch)}


class DinoScorer(_ImagePairScorer):
    """Adds ``dino``: cosine of the DINO CLS embeddings of the target and the source image.

    Usage: ``batch = DinoScorer(role_dir)(batch)``

    The model is the ``dino_filter`` role (DINO ViT-S/16 in the paper, a transformers ``ViTModel`` without
    pooler); the embedding is ``last_hidden_state[:, 0]``. Args: ``role_dir`` (the ``dino_filter``
    directory), ``dtype``, ``device``.
    """

    column = DINO
    embedder_cls = DinoEmbedder


class ClipIScorer(_ImagePairScorer):
    """Adds ``clip_i``: cosine of the CLIP image embeddings of the target and the source image.

    Usage: ``batch = ClipIScorer(role_dir)(batch)``

    The model is the ``clip_filter`` role (CLIP ViT-B/32 in the paper), the same image tower as CLIP-T.
    Args: ``role_dir`` (the ``clip_filter`` directory), ``dtype``, ``device``.
    """

    column = CLIP_I
    embedder_cls = ClipEmbedder


class FusedScorer:
    """Adds ``clip_t``, ``dino`` and ``clip_i`` in one pass: each PNG is decoded once per batch.

    Usage: ``batch = FusedScorer(clip_dir, dino_dir)(batch)``

    The build's single scoring stage. The CLIP image tower embeds targets and sources in one forward
    (2N images) and serves both CLIP-T (targets vs. ``filled_prompt``) and CLIP-I (targets vs. sources);
    DINO embeds the same decoded images. The values equal :class:`ClipTScorer`, :class:`DinoScorer` and
    :class:`ClipIScorer` run separately (tested).

    Args:
        clip_dir: The ``clip_filter`` directory.
        dino_dir: The ``dino_filter`` directory.
        clip_dtype, dino_dtype: Model dtypes.
        clip_device, dino_device: Model devices.
    """

    def __init__(self, clip_dir: str, dino_dir: str, clip_dtype: str = "float32", dino_dtype: str = "float32",
                 clip_device: str = "cpu", dino_device: str = "cpu") -> None:
        self.clip = ClipEmbedder(clip_dir, dtype=clip_dtype, device=clip_device)
        self.dino = DinoEmbedder(dino_dir, dtype=dino_dtype, device=dino_device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a batch with columns ``target_png``, ``source_png`` (PNG bytes) and ``filled_prompt``."""
        _require_columns(batch, TARGET_PNG, SOURCE_PNG, FILLED_PROMPT)
        targets = decode_pngs(batch[TARGET_PNG])
        sources = decode_pngs(batch[SOURCE_PNG])
        if len(targets) != len(sources):
            raise ValueError(f"{TARGET_PNG} has {len(targets)} rows, {SOURCE_PNG} has {len(sources)}")
        n = len(targets)
        if n == 0:
            empty = np.zeros(0, np.float32)
            return {**batch, CLIP_T: empty, DINO: empty.copy(), CLIP_I: empty.copy()}
        clip_img = self.clip.embed_images(targets + sources)  # (2N, D)
        texts = self.clip.embed_texts(list(batch[FILLED_PROMPT]))  # (N, D)
        dino_img = self.dino.embed_images(targets + sources)  # (2N, D')
        return {**batch, CLIP_T: paired_cosine(clip_img[:n], texts), DINO: paired_cosine(dino_img[:n], dino_img[n:]),
                CLIP_I: paired_cosine(clip_img[:n], clip_img[n:])}


# --- helpers ---------------------------------------------------------------------------------------


def decode_pngs(column: Sequence[bytes] | np.ndarray) -> list[Image.Image]:
    """Decode a column of RGB PNG bytes into PIL images.

    Usage: ``images = decode_pngs(batch["target_png"])``

    Args:
        column: N PNG byte strings (an object array or a list).

    Returns:
        N RGB PIL images.

    Raises:
        ValueError: If an entry is not an RGB PNG (from :func:`filtering.images.decode_png_rgb`).
    """
    return [Image.fromarray(decode_png_rgb(bytes(png))) for png in column]


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise dot product of two ``(N, D)`` unit-row embeddings: the cosine of each pair.

    Usage: ``scores = paired_cosine(emb_target, emb_source)``

    Args:
        a: ``(N, D)`` normalised embeddings.
        b: ``(N, D)`` normalised embeddings.

    Returns:
        ``(N,)`` float32, clamped to ``[-1, 1]`` (rounding can put a unit row's self-product at 1 + 1e-7);
        NaN where either row is NaN.

    Raises:
        ValueError: If the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired_cosine: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    dots = (a.float() * b.float()).sum(dim=-1).cpu().numpy()  # (N,)
    return np.clip(dots, -1.0, 1.0).astype(np.float32)  # np.clip keeps NaN


def _image_pair_cosine(embed, batch: dict[str, np.ndarray]) -> np.ndarray:
    targets = decode_pngs(batch[TARGET_PNG])
    sources = decode_pngs(batch[SOURCE_PNG])
    if len(targets) != len(sources):
        raise ValueError(f"{TARGET_PNG} has {len(targets)} rows, {SOURCE_PNG} has {len(sources)}")
    n = len(targets)
    emb = embed(targets + sources)  # (2N, D): one forward pass for both columns
    return paired_cosine(emb[:n], emb[n:])


def _require_columns(batch: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"batch is missing column(s) {missing}; got {sorted(batch)}")
