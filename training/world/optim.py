"""One learning-rate schedule for every world trainer: linear warm-up, then cosine decay to zero."""
from __future__ import annotations

import math

import torch


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
