"""What every recipe shares: role references, image decoding, the features path (cache or encoders)."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from training.data import schema
from training.encoders import FEATURES, ConditionEncoders


@dataclass(frozen=True)
class RoleRef:
    """Where a model role lives and how to load it (a plain record, so Ray can ship it to workers)."""

    path: str
    dtype: str = "float32"


def load(role: str, ref: RoleRef, device: str):
    from training.models.kit import load_role

    return load_role(role, ref.path, dtype=ref.dtype, device=device)


def decode_image(cell: Any) -> np.ndarray:
    """uint8 (H, W, 3) from a datasets ``Image`` struct ({bytes, path}), raw bytes, or an array."""
    from PIL import Image

    if isinstance(cell, np.ndarray) and cell.dtype == np.uint8 and cell.ndim == 3:
        return cell[..., :3]
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise ValueError("image cell holds no bytes")
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def texts(column: Any) -> list[str]:
    return [str(t) for t in column]


def load_encoders(roles: dict[str, RoleRef], device: str, want: Sequence[str], select_layer: int = -2,
                  t2i=None) -> ConditionEncoders:
    """The frozen encoders a recipe needs (VAE from ``t2i``, ``clip_cond``, ``dino_cond``)."""
    enc = ConditionEncoders(select_layer=select_layer, device=device)
    if {"latent_mean", "latent_std"} & set(want):
        t2i = t2i or load("t2i", roles["t2i"], device)
        enc.vae = t2i.components.vae
    if {"clip_target", "vision_input"} & set(want):
        clip = load("clip_cond", roles["clip_cond"], device)
        enc.clip = clip.components
    if "dino_input" in want:
        dino = load("dino_cond", roles["dino_cond"], device)
        enc.dino = dino.components
    return enc


def store_features(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A feature tensor as the cache stores it: float32 / float16 arrays, bfloat16 as its 16-bit pattern (uint16:
    Parquet has no bfloat16; :func:`read_features` reads it back)."""
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.numpy().astype(np.dtype(dtype))


def read_features(a) -> torch.Tensor:
    """float32 features from a cache column: float32, float16, or bfloat16 bit patterns (uint16)."""
    a = np.asarray(a)
    if a.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: Ray's arrays may be read-only


def batch_features(batch: dict, encoders: ConditionEncoders | None, want: Sequence[str]) -> dict[str, torch.Tensor]:
    """The features in ``want``: read from the batch when it carries them (a cache), else encoded from images."""
    if all(k in batch for k in want):
        return {k: read_features(batch[k]) for k in want}
    if encoders is None:
        raise ValueError(f"the batch carries no {list(want)} and no encoders were loaded")
    inputs = [decode_image(c) for c in batch[schema.INPUT_IMAGE]] if {"dino_input", "vision_input"} & set(want) else None
    targets = [decode_image(c) for c in batch[schema.TARGET_IMAGE]] \
        if {"latent_mean", "latent_std", "clip_target"} & set(want) else None
    return encoders.encode(inputs, targets, want)


def condition_dims(roles: dict[str, RoleRef]) -> dict[str, int]:
    """clip_dim, vision_width, dino_width read from the roles' configs (no weights loaded: the cache path)."""
    import json
    from pathlib import Path

    clip = json.loads((Path(roles["clip_cond"].path) / "config.json").read_text())
    dino = json.loads((Path(roles["dino_cond"].path) / "config.json").read_text())
    return {"clip_dim": int(clip["projection_dim"]), "vision_width": int(clip.get("vision_config", clip)["hidden_size"]),
            "dino_width": int(dino["hidden_size"])}


class Recipe:
    """A model + its loss over a micro-batch; subclasses fill in :meth:`setup`, :meth:`prepare`, weights."""

    name = "recipe"
    features: tuple[str, ...] = ()

    def __init__(self, section, roles: dict[str, RoleRef]):
        self.section = section
        self.roles = roles
        self.module: torch.nn.Module | None = None
        self.encoders: ConditionEncoders | None = None

    def setup(self, device: str = "cpu", encoders: bool = True, zero3_config: dict | None = None) -> "Recipe":
        """Load the frozen models and build :attr:`module`. ``encoders=False``: the batches carry cached
        features. ``zero3_config``: the DeepSpeed config when it is ZeRO-3 (large frozen models load partitioned)."""
        raise NotImplementedError

    def prepare(self, batch: dict, epoch: int, seed: int) -> dict:
        raise NotImplementedError

    def batch_rows(self, batch: dict) -> int:
        return len(batch[schema.ID])

    def save_weights(self, module: torch.nn.Module, out) -> None:
        raise NotImplementedError

    def module_train_mode(self, module: torch.nn.Module) -> None:
        """Trainable parts in train mode, frozen parts in eval mode (no dropout in frozen models)."""
        module.train()

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """A copy of every frozen parameter (tests: bit-for-bit unchanged after training)."""
        return {n: p.detach().clone() for n, p in self.module.named_parameters() if not p.requires_grad}

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]


__all__ = ["FEATURES", "Recipe", "RoleRef", "batch_features", "decode_image", "load", "load_encoders", "texts"]
