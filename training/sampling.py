"""Sampling helpers shared by the per-concept methods (ICO, DCI, Infusion).

Usage::

    from training.sampling import ddim_scheduler
    sched = ddim_scheduler(t2i.scheduler.config)       # a private diffusers DDIMScheduler for one sampling run

:class:`GuardedDDIMScheduler` is diffusers' ``DDIMScheduler`` with one guard. With η > 0 on a zero-terminal-SNR
schedule (the synthetic world's, SD2-style ``rescale_betas_zero_snr``), the first step has ᾱ_t = 0, so
σ_t² = η²(1 − ᾱ_prev) exactly. The step then takes ``(1 − ᾱ_prev − σ_t²) ** 0.5``, which float32 rounding can
make the square root of a tiny negative number: NaN latents (measured: world t2i, 50 trailing steps, η = 1).
The guard caps the variance at ``(1 − ᾱ_prev)·(1 − 1e-6)``. This changes σ_t by at most 5e-7 relative, and
only where the cap binds: the first step of a zero-terminal-SNR schedule (ᾱ_t = 0). Every other step, every
η = 0 run and every schedule without a zero terminal SNR is diffusers' own arithmetic, bit for bit.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler

_CAP = 1.0 - 1e-6


class GuardedDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` whose η-variance never exceeds the room ``1 − ᾱ_prev`` left for it (see module doc)."""

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        variance = super()._get_variance(timestep, prev_timestep)
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        room = (1 - alpha_prev) * _CAP
        return torch.minimum(variance, torch.as_tensor(room, dtype=variance.dtype))


def ddim_scheduler(config) -> GuardedDDIMScheduler:
    """A fresh (private) guarded DDIM scheduler from a diffusers scheduler config."""
    return GuardedDDIMScheduler.from_config(config)
