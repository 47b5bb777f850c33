"""The world's oracle: a small CNN trained on ground-truth renders that reads every attribute of an image.

Usage::

    oracle = load_oracle("models/world/oracle")
    pred = oracle.predict(images)            # (N, 32, 32, 3) uint8 → {attribute: (N,) int64}
    names = oracle.predict_names(images)     # {attribute: [value, ...]}

It has one classification head per attribute of :data:`training.world.domain.ATTRIBUTES` (class, colour,
mark, background, position, size, style). It is trained on renders of *every* (instance, context) pair, held-out
pairs included — it is the judge, not a model under test — with blur, noise and colour/brightness jitter, so
that it reads generated images (slightly blurred, slightly off-colour) as it reads renders. Its accuracy on
fresh renders is a gate of its own (``oracle`` in ``cafe world check``).

On disk: ``config.json`` (``{"attributes": {name: [values]}, "width": int}``) + ``model.safetensors``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.world.optim import optimizer_step, warmup_cosine
from torch import nn

from training.world import domain as D

WEIGHTS = "model.safetensors"


class OracleNet(nn.Module):
    def __init__(self, attributes: dict[str, list[str]], width: int = 32):
        super().__init__()
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.width = width
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),
        )
        side = D.IMAGE_SIZE // 8
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, 256), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in self.attributes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 3, H, W) in [0, 1] → attribute → logits."""
        h = self.trunk(self.features((x - 0.5) / 0.25))
        return {k: head(h) for k, head in self.heads.items()}

    @property
    def config(self) -> dict:
        return {"attributes": self.attributes, "width": self.width}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (σ up to 0.9 px), Gaussian noise, per-channel gain and brightness jitter — what generation does."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 0.9
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (n, 5)
    xb = x.reshape(1, n * 3, *x.shape[-2:])
    kx = kern.repeat_interleave(3, 0)[:, None, None, :]
    xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), kx, groups=n * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), kx.transpose(-1, -2), groups=n * 3)
    x = xb.reshape_as(x)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.12
    shift = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.04
    return (x * gain + shift + noise).clamp(0, 1)


class Oracle:
    """The judge: wraps :class:`OracleNet` in eval mode."""

    def __init__(self, net: OracleNet):
        self.net = net.eval()

    @property
    def attributes(self) -> dict[str, list[str]]:
        return self.net.attributes

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.attributes}
        device = next(self.net.parameters()).device
        for i in range(0, len(images), batch_size):
            logits = self.net(to_tensor(images[i: i + batch_size]).to(device))
            for k, v in logits.items():
                out[k].append(v.argmax(1).cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}

    def predict_names(self, images: np.ndarray) -> dict[str, list[str]]:
        return {k: [self.attributes[k][i] for i in v] for k, v in self.predict(images).items()}


def save_oracle(net: OracleNet, out: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(net.config, indent=2))
    save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in net.state_dict().items()}, str(out / WEIGHTS))


def load_oracle(path: str | os.PathLike, device: str = "cpu") -> Oracle:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"oracle at {path}: expected config.json and {WEIGHTS} "
                                "(write it with `cafe world make`)")
    cfg = json.loads((path / "config.json").read_text())
    net = OracleNet(cfg["attributes"], cfg.get("width", 32))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS)).items()}
    net.load_state_dict(state, strict=True)
    return Oracle(net.to(device))


def train_oracle(images: np.ndarray, labels: dict[str, np.ndarray], *, steps: int, batch_size: int, lr: float,
                 seed: int, width: int = 32, progress=None, device: str = "cpu") -> OracleNet:
    """Train on ground-truth renders (images uint8 (N, H, W, 3), labels attribute → (N,) ints).

    Batches are drawn and augmented on the CPU from a seeded generator, then moved to ``device``: the random
    stream is the same on every device.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = OracleNet({k: list(v) for k, v in D.ATTRIBUTES.items()}, width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, 0.1)
    x_all = to_tensor(images)
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    net.train()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        logits = net(augment(x_all[idx], gen).to(device))
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx].to(device)) for k in net.attributes)
        value = optimizer_step(opt, sched, loss)
        if progress is not None:
            progress(step, {"loss": value})
    return net.eval().cpu()


def accuracy(pred: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy plus ``all`` (every attribute right)."""
    acc = {k: float((pred[k] == labels[k]).mean()) for k in labels}
    acc["all"] = float(np.all([pred[k] == labels[k] for k in labels], axis=0).mean())
    return acc
