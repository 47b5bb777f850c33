"""What every world trainer shares: the learning-rate schedule (linear warm-up, cosine decay to zero) and one
optimiser step."""
from __future__ import annotations

import math

import torch


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, clip_params=None,
                   max_norm: float = 1.0) -> float:
    """zero_grad → backward → (clip the gradient norm of ``clip_params``) → optimiser step → schedule step;
    returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
    opt.step()
    sched.step()
    return loss.item()
