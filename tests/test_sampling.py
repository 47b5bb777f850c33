"""The guarded DDIM scheduler: diffusers' arithmetic everywhere except the zero-terminal-SNR η-variance edge."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from training.sampling import GuardedDDIMScheduler

WORLD_SCHEDULER = Path(__file__).resolve().parents[1] / "models" / "world" / "t2i" / "scheduler" / "scheduler_config.json"


def _run(cls, config, steps: int, eta: float):
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=g)
        x = sched.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(int(t))).prev_sample
    return x


def test_world_schedule_with_eta_one_is_nan_in_diffusers_and_finite_guarded():
    config = json.loads(WORLD_SCHEDULER.read_text())
    assert config["rescale_betas_zero_snr"] and config["timestep_spacing"] == "trailing"
    plain = _run(DDIMScheduler, config, 50, 1.0)
    guarded = _run(GuardedDDIMScheduler, config, 50, 1.0)
    assert not torch.isfinite(plain).all()          # the reason for the guard (sqrt of a rounding-negative)
    assert torch.isfinite(guarded).all()


def test_guard_is_bit_identical_where_it_does_not_bind():
    config = json.loads(WORLD_SCHEDULER.read_text())
    for steps in (20, 50):                           # η = 0: no variance at all
        assert torch.equal(_run(DDIMScheduler, config, steps, 0.0), _run(GuardedDDIMScheduler, config, steps, 0.0))
    # zero terminal SNR, η > 0, where diffusers stays finite: only the capped first step differs, by ~1e-6
    for steps, eta in ((20, 1.0), (37, 0.5)):
        a, b = _run(DDIMScheduler, config, steps, eta), _run(GuardedDDIMScheduler, config, steps, eta)
        assert torch.isfinite(a).all() and not torch.equal(a, b)
        assert (a - b).abs().max() < 1e-3 * a.abs().max()
    sd = dict(DDIMScheduler().config)                # an SD-style schedule (no zero terminal SNR): never binds
    assert torch.equal(_run(DDIMScheduler, sd, 50, 1.0), _run(GuardedDDIMScheduler, sd, 50, 1.0))
