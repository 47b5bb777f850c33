"""The MLLM's head learns the target's CLIP embedding on the synthetic world (issue 9's quality study).

The assistant hands the head's prediction H(h) to the diffusion model, so a head that predicts no better than the
mean embedding makes the whole assistant fail (this is what happened with λ = 1 and 400 steps:
``bench/world_mllm_head.py``, held-out MSE 1.15× the mean's). Here the MLLM recipe (frozen world ``llm``,
trainable V, H and the query token) trains on ideal round-0 pairs rendered from ground truth (an instance in one
context → the same instance with the instruction applied) with the settings ``configs/tiny.yaml`` uses for the
world (λ = 64 = ``clip_dim``), and its held-out MSE must clearly beat always predicting the training mean.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from tests import trainutil as tu

pytestmark = pytest.mark.slow


def _rows(n: int):
    from training.trainers.base import load_encoders
    from training.world.assistant_eval import ideal_pairs

    pairs = list(ideal_pairs(n, seed=0))
    enc = load_encoders(tu.roles(), "cpu", ("clip_target", "vision_input"))
    feats = enc.encode([p[2] for p in pairs], [p[3] for p in pairs], ("clip_target", "vision_input"))
    return {"id": [f"ideal{i:04d}" for i in range(n)],
            "user_text": [f"Can you generate an image for this {inst.cls} {phrase}?" for inst, phrase, _, _ in pairs],
            "assistant_text": [f"Here is the {inst.cls} {phrase}." for inst, phrase, _, _ in pairs],
            "vision_input": list(feats["vision_input"].numpy()), "clip_target": list(feats["clip_target"].numpy())}


def test_the_mllm_head_beats_the_mean_embedding_on_held_out_ideal_pairs():
    from training.trainers.mllm import MLLMRecipe

    torch.manual_seed(0)
    cols = _rows(600)
    rng = np.random.default_rng(0)
    perm = rng.permutation(600)
    test, train = perm[:120], perm[120:]
    batch = lambda idx: {k: [v[i] for i in idx] for k, v in cols.items()}  # noqa: E731
    rec = MLLMRecipe(NS(lam=64.0, select_layer=-2), tu.roles()).setup("cpu", encoders=False)
    module = rec.module
    rec.module_train_mode(module)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    for step in range(1200):
        loss = module(**rec.prepare(batch(rng.choice(train, 8, replace=False)), 0, step))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        out = module(**rec.prepare(batch(test), 0, 0))
    y = np.stack(cols["clip_target"]).astype(np.float64)
    mean_mse = float(((y[test] - y[train].mean(0)) ** 2).mean())
    ratio = float(out["mse"]) / mean_mse
    # measured 0.578 here (LM 0.063); the old default, λ 1 at lr 1e-2 for 400 steps, gives 1.18 on the same rows
    # and fails. The reply is still learnt: LM loss well under the random model's (≈ 6).
    assert ratio < 0.8, f"held-out embedding MSE is {ratio:.2f}× the mean's"
    assert float(out["lm"]) < 0.5
