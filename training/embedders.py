"""Image and text embedders shared by the build's scorers (:mod:`filtering.scorers`) and the metrics
(:mod:`training.metrics`): normalised CLIP image/text embeddings and DINO CLS embeddings.

Usage::

    clip = ClipEmbedder("models/tiny/clip_filter")
    img = clip.embed_images(images)     # (N, D) float32 unit rows
    txt = clip.embed_texts(prompts)     # (N, D) float32 unit rows
    cls = DinoEmbedder("models/tiny/dino_filter").embed_images(images)  # (N, D') float32 unit rows

Models are loaded through :func:`training.models.kit.load_role`. Embeddings are computed in the model's
dtype and returned in float32 on the CPU. An embedding of zero norm has no direction: it normalises to NaN
(not to the zero vector that ``F.normalize`` would give), so a score built from it stays NaN; a NaN produced
by the model itself (e.g. fp16 overflow) also passes through unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from training.models.kit import load_role

__all__ = ["ClipEmbedder", "DinoEmbedder", "unit_rows"]


class ClipEmbedder:
    """Normalised CLIP image and text embeddings from the ``clip_filter`` role (open_clip CLIP).

    Usage: ``emb = ClipEmbedder(role_dir).embed_images(images)``  # (N, D) float32

    Args:
        role_dir: The ``clip_filter`` directory (open_clip ``local-dir:`` layout; CLIP ViT-B/32 in the paper).
        dtype: Model dtype: ``float32``, ``float16`` or ``bfloat16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """

    def __init__(self, role_dir: str, dtype: str = "float32", device: str = "cpu") -> None:
        loaded = load_role("clip_filter", role_dir, dtype=dtype, device=device)
        self.model = loaded.components.model
        self.preprocess = loaded.components.preprocess
        self.tokenizer = loaded.components.tokenizer
        self.fingerprint = loaded.fingerprint
        self.embed_dim = int(getattr(self.model.visual, "output_dim", 0))  # D, for empty batches
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Embed RGB images with the CLIP image tower in one forward pass.

        Args:
            images: N PIL images (any size; the open_clip preprocess resizes and crops).

        Returns:
            ``(N, D)`` float32 CPU tensor of unit rows (NaN rows for zero-norm embeddings).
        """
        if len(images) == 0:
            return torch.empty(0, self.embed_dim)
        pixels = torch.stack([self.preprocess(im) for im in images])  # (N, 3, H, W)
        feats = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=False)  # (N, D)
        return unit_rows(feats)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts with the CLIP text tower in one forward pass (the open_clip tokenizer truncates).

        Args:
            texts: N strings; for the filter's CLIP-T the filled instruction ``"a {class} {phrase}"``.

        Returns:
            ``(N, D)`` float32 CPU tensor of unit rows (NaN rows for zero-norm embeddings).
        """
        if len(texts) == 0:
            return torch.empty(0, self.embed_dim)
        tokens = self.tokenizer([str(t) for t in texts])  # (N, context_length) int64
        feats = self.model.encode_text(tokens.to(self.device), normalize=False)  # (N, D)
        return unit_rows(feats)


class DinoEmbedder:
    """Normalised DINO CLS embeddings from the ``dino_filter`` role (transformers ``ViTModel``).

    Usage: ``emb = DinoEmbedder(role_dir).embed_images(images)``  # (N, D) float32

    Args:
        role_dir: The ``dino_filter`` directory (transformers layout; DINO ViT-S/16 in the paper).
        dtype: Model dtype: ``float32``, ``float16`` or ``bfloat16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """

    def __init__(self, role_dir: str, dtype: str = "float32", device: str = "cpu") -> None:
        loaded = load_role("dino_filter", role_dir, dtype=dtype, device=device)
        self.model = loaded.components.model
        self.processor = loaded.components.processor
        self.fingerprint = loaded.fingerprint
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Embed RGB images with DINO in one forward pass; the embedding is the CLS token.

        Args:
            images: N PIL images (the image processor resizes and normalises).

        Returns:
            ``(N, D)`` float32 CPU tensor of unit rows (NaN rows for zero-norm embeddings).
        """
        if len(images) == 0:
            return torch.empty(0, int(self.model.config.hidden_size))
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values  # (N, 3, H, W)
        hidden = self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state  # (N, 1+P, D)
        return unit_rows(hidden[:, 0])


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` → float32 CPU unit rows; a zero-norm row becomes NaN (0/0) instead of a zero vector.

    Usage: ``u = unit_rows(feats)``  # (N, D) float32
    """
    x = x.float()
    return (x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)).cpu()
