"""ProFusion with a v-prediction UNet (the synthetic world's): the refinement update gets ε back exactly."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from training.methods.profusion import ProFusionGenerator
from training.world.t2i import make_scheduler


@pytest.mark.parametrize("t", [0, 250, 500, 999])
def test_to_eps_inverts_the_velocity(t):
    sched = make_scheduler()
    g = torch.Generator().manual_seed(t)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    tt = torch.tensor([t, t])
    xt = sched.add_noise(x0, noise, tt)
    v = sched.get_velocity(x0, noise, tt)
    alpha = float(sched.alphas_cumprod[t])
    eps = ProFusionGenerator.to_eps(SimpleNamespace(prediction_type="v_prediction"), v, xt, alpha)
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=1e-4)
    same = ProFusionGenerator.to_eps(SimpleNamespace(prediction_type="epsilon"), noise, xt, alpha)
    assert same is noise


def test_zero_terminal_snr_schedule():
    sched = make_scheduler()
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-8)
    sched.set_timesteps(10)
    assert int(sched.timesteps[0]) == 999 and sched.config.prediction_type == "v_prediction"
