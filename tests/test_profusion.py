"""ProFusion (SPEC §4.5): closed-form maths, S* insertion, PromptNet layout, sampling, fine-tuning, augmentation."""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

from pipeline.build_config import ProFusionConfig
from training.methods import profusion as pf
from training.methods.profusion import (
    ProFusionGenerator,
    ddim_variance,
    fused_guidance,
    generic_augmentations,
    refine_update,
)
from training.models.promptnet import PromptNet

# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models are latency-bound; on shared cores 2 OpenMP threads spin against other processes
    (measured: ~38 s vs ~2 s for the sampling test), so this module runs torch on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def t2i(tiny_models):
    from training.models.kit import load_role

    return load_role("t2i", tiny_models / "t2i").components


@pytest.fixture(scope="module")
def pn(tiny_models):
    from training.models.kit import load_role

    return load_role("promptnet", tiny_models / "promptnet").components


def _cfg(**kw) -> ProFusionConfig:
    base = dict(num_inference_steps=2, s1=3.0, s2=2.0, refine_step=1, gamma=0.6, w_r=3.0, refine_eta=1.0,
                finetune=False, finetune_steps=2, finetune_batch_size=2, finetune_lr=1e-3,
                finetune_weight_decay=1e-2, finetune_prompt="a photo of holder", num_augmentations=2,
                augmentation="generic")
    base.update(kw)
    return ProFusionConfig(**base)


@pytest.fixture()
def gen(t2i, pn):
    return ProFusionGenerator(t2i, pn, _cfg())


def _source(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- 1. refine_update / variance

ALPHA_TRIPLES = [(0.05, 0.2, 0.3), (0.5, 0.7, 0.1), (0.9, 0.95, 0.05), (0.3, 0.9985, 0.0)]


def _closed_form(alpha_t: float, alpha_prev: float, sigma: float):
    a_t, a_p, s = np.float64(alpha_t), np.float64(alpha_prev), np.float64(sigma)
    drift = s**2 * np.sqrt(1 - a_t) / (1 - a_p)
    noise_c = s * np.sqrt((1 - a_t) * (2 - 2 * a_p - s**2)) / (1 - a_p)
    return drift, noise_c


@pytest.mark.parametrize("alpha_t,alpha_prev,sigma", ALPHA_TRIPLES)
def test_refine_update_matches_closed_form(alpha_t, alpha_prev, sigma):
    rng = np.random.default_rng(0)
    x, eps, z = (rng.standard_normal((2, 4, 3, 3)) for _ in range(3))
    drift, noise_c = _closed_form(alpha_t, alpha_prev, sigma)
    expected = x - eps * drift + z * noise_c
    got = refine_update(torch.from_numpy(x), torch.from_numpy(eps), alpha_t, alpha_prev, sigma, torch.from_numpy(z))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    if sigma == 0.0:
        assert torch.equal(got, torch.from_numpy(x))  # no drift, no noise: exactly x


def test_refine_update_sigma_zero_is_identity_float32():
    x = torch.randn(1, 4, 8, 8)
    out = refine_update(x, torch.randn_like(x), 0.4, 0.6, 0.0, torch.randn_like(x))
    assert torch.equal(out, x)


def test_ddim_variance_matches_diffusers_scheduler(t2i):
    sched = t2i.scheduler
    sched64 = copy.deepcopy(sched)  # same alphas (the float32 values), held in float64
    sched64.alphas_cumprod = sched.alphas_cumprod.double()
    sched64.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    for n in (2, 3, 7, 50):
        sched.set_timesteps(n)
        step = 1000 // n
        saw_final = False
        for t in sched.timesteps.tolist():
            prev_t = t - step
            a_t = float(sched.alphas_cumprod[t])
            a_p = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
            saw_final |= prev_t < 0
            # diffusers works in float32 (1 − ᾱ_t/ᾱ_prev cancels for close steps): ~1e-5 relative
            ref = float(sched._get_variance(t, prev_t))
            assert ddim_variance(a_t, a_p) == pytest.approx(ref, rel=1e-4)
            # the same diffusers code on float64 tables agrees to rounding
            ref64 = float(sched64._get_variance(t, prev_t))
            assert ddim_variance(a_t, a_p) == pytest.approx(ref64, rel=1e-10)
            # independent float64 formula
            expected = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
            assert ddim_variance(a_t, a_p) == pytest.approx(expected, rel=1e-12)
        assert saw_final  # the last step of every grid goes below 0 → final_alpha_cumprod


@pytest.mark.parametrize("t_idx", [0, 1, 2])
def test_refine_noise_coefficient_with_eta_one(t2i, t_idx):
    sched = t2i.scheduler
    sched.set_timesteps(3)
    t = int(sched.timesteps[t_idx])
    prev_t = t - 1000 // 3
    a_t = float(sched.alphas_cumprod[t])
    a_p = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
    sigma = 1.0 * math.sqrt(float(sched._get_variance(t, prev_t)))
    zeros = torch.zeros(1, dtype=torch.float64)
    ones = torch.ones(1, dtype=torch.float64)
    coef = float(refine_update(zeros, zeros, a_t, a_p, sigma, ones))  # x=0, eps=0, z=1 → noise coefficient
    expected_sq = sigma**2 * (1 - a_t) * (2 - 2 * a_p - sigma**2) / (1 - a_p) ** 2
    assert coef > 0
    assert coef**2 == pytest.approx(expected_sq, rel=1e-10)
    drift = -float(refine_update(zeros, ones, a_t, a_p, sigma, zeros))  # eps=1 → −drift
    assert drift == pytest.approx(sigma**2 * math.sqrt(1 - a_t) / (1 - a_p), rel=1e-10)
    # empirical variance of the injected term on many samples agrees with the closed form
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    injected = refine_update(torch.zeros_like(z), torch.zeros_like(z), a_t, a_p, sigma, z)
    assert float(injected.var()) == pytest.approx(expected_sq, rel=0.02)


# ----------------------------------------------------------------------------------------- 2. fused guidance


def test_fused_guidance():
    g = torch.Generator().manual_seed(3)
    eps_u, eps_s, eps_r = (torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for s1, s2 in [(7.0, 5.0), (1.0, 0.0), (0.0, 2.5), (3.3, 1.7)]:
        expected = eps_u.numpy() + s1 * (eps_s.numpy() - eps_u.numpy()) + s2 * (eps_r.numpy() - eps_u.numpy())
        got = fused_guidance(eps_u, eps_s, eps_r, s1, s2).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(fused_guidance(eps_u, eps_s, eps_r, 0.0, 0.0), eps_u)
    # s1 = 1, s2 = 0 → the S* prediction
    torch.testing.assert_close(fused_guidance(eps_u, eps_s, eps_r, 1.0, 0.0), eps_s, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------- 3. encode


def _holder_slot(gen, prompt: str) -> int:
    ids = gen._tokenize([prompt])[0]
    cols = (ids == gen.holder_id).nonzero().flatten().tolist()
    assert len(cols) == 1
    return cols[0]


@torch.no_grad()
def test_encode_sstar_slot(gen):
    prompts = ["a holder in the snow", "a photo of holder"]
    slots = [_holder_slot(gen, p) for p in prompts]
    assert slots[0] != slots[1]
    width = gen.text_encoder.config.hidden_size
    s_star = torch.randn(2, 1, width, generator=torch.Generator().manual_seed(0)) * 3

    plain = gen.encode(prompts)
    with_s = gen.encode(prompts, s_star)
    assert plain.shape == with_s.shape == (2, gen.tokenizer.model_max_length, width)
    for b, k in enumerate(slots):
        assert not torch.allclose(with_s[b, k], plain[b, k])  # the slot changes
        assert torch.equal(with_s[b, :k], plain[b, :k])  # causal: earlier positions are untouched
        assert not torch.allclose(with_s[b, k + 1 :], plain[b, k + 1 :])  # later positions attend to S*

    # scale multiplies only the slot's encoder output
    gamma = 0.6
    scaled = gen.encode(prompts, s_star, scale=gamma)
    for b, k in enumerate(slots):
        assert torch.equal(scaled[b, k], with_s[b, k] * gamma)
        mask = torch.ones(scaled.shape[1], dtype=torch.bool)
        mask[k] = False
        assert torch.equal(scaled[b, mask], with_s[b, mask])

    # the embedding-layer output at the slot is S* itself (no position embedding added). encode() installs
    # its own forward hook on `embeddings`; what that layer hands on is the input of the transformer stack,
    # so capture it with a pre-hook there.
    captured = []
    tm = getattr(gen.text_encoder, "text_model", gen.text_encoder)
    emb = tm.embeddings
    handle = tm.encoder.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(kwargs.get("inputs_embeds", args[0] if args else None).clone()),
        with_kwargs=True)
    try:
        gen.encode(prompts, s_star)
    finally:
        handle.remove()
    assert len(captured) == 1
    out = captured[0]
    for b, k in enumerate(slots):
        assert torch.equal(out[b, k], s_star[b, 0])
    # the other slots are ordinary token + position embeddings
    ids = gen._tokenize(prompts)
    ref_emb = emb(input_ids=ids)
    for b, k in enumerate(slots):
        assert torch.equal(out[b, :k], ref_emb[b, :k]) and torch.equal(out[b, k + 1 :], ref_emb[b, k + 1 :])
        assert not torch.allclose(ref_emb[b, k], s_star[b, 0])


@torch.no_grad()
def test_encode_requires_one_holder(gen):
    width = gen.text_encoder.config.hidden_size
    s = torch.zeros(1, 1, width)
    with pytest.raises(ValueError):
        gen.encode(["a photo of a dog"], s)
    with pytest.raises(ValueError):
        gen.encode(["a holder and a holder"], s)
    with pytest.raises(ValueError):  # counts balance (2 holders in row 0, none in row 1) but rows don't
        gen.encode(["a holder and a holder", "a dog"], torch.zeros(2, 1, width))
    # without S* any prompt is fine and matches the plain text encoder
    ids = gen._tokenize(["a photo of a dog"])
    assert torch.equal(gen.encode(["a photo of a dog"]), gen.text_encoder(ids)[0])


# ----------------------------------------------------------------------------------------- 4. PromptNet


def _projection_io_sizes(net: PromptNet, latent: int, clip_width: int, seq: int = 5):
    sizes = []
    hooks = [p.register_forward_hook(lambda m, a, o: sizes.append((tuple(a[0].shape[-2:]), tuple(o.shape[-2:]))))
             for p in net.prompt_projections]
    out_sizes = []
    hooks.append(net.prompt_out.register_forward_hook(
        lambda m, a, o: out_sizes.append((tuple(a[0].shape), tuple(o.shape)))))
    try:
        c = net.unet.config.in_channels
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            s = net(torch.randn(2, c, latent, latent, generator=g), torch.randn(2, c, latent, latent, generator=g),
                    torch.tensor([10, 500]), torch.randn(2, seq, clip_width, generator=g))
    finally:
        for h in hooks:
            h.remove()
    return s, sizes, out_sizes[0]


def test_promptnet_tiny_shapes_and_kernels(t2i, pn):
    net = pn.promptnet
    text_width = t2i.text_encoder.config.hidden_size
    clip_width = pn.image_encoder.config.hidden_size
    latent = net.unet.config.sample_size
    s, sizes, (cat_shape, out_shape) = _projection_io_sizes(net, latent, clip_width)
    assert s.shape == (2, 1, text_width)
    assert len(sizes) == len(net.prompt_projections) == len(net.unet.down_blocks) + 2
    grid = sizes[-1][0]  # the mid block's grid
    assert net.kernels[-1] == grid[0]
    for (in_hw, out_hw), k, conv in zip(sizes, net.kernels, net.prompt_projections):
        assert out_hw == grid  # every projection lands on the mid-block grid
        assert in_hw == (k * grid[0], k * grid[1])
        assert conv.kernel_size == (k, k) and conv.stride == (k, k)
    assert cat_shape[1] == net.config["proj_channels"] * len(sizes) and out_shape[-2:] == (1, 1)
    # tiny t2i: 32×32 latents; conv_in 32, down0 → 16 (downsampler), down1 16, mid 16 → [2, 1, 1, 1] + final 16
    assert net.kernels == [2, 1, 1, 1, 16]


def test_promptnet_real_checkpoint_via_clip_hidden(pn, t2i):
    """End-to-end on the tiny CLIP vision encoder: full last_hidden_state (CLS + patches) is the context."""
    gen = ProFusionGenerator(t2i, pn, _cfg())
    hidden = gen._clip_hidden(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    enc = pn.image_encoder.config
    assert hidden.shape == (2, 1 + (enc.image_size // enc.patch_size) ** 2, enc.hidden_size)


def test_promptnet_from_unet_copies_encoder(t2i):
    unet = t2i.unet
    net = PromptNet.from_unet(unet, clip_vision_width=48, text_width=32, proj_channels=16)
    src = unet.state_dict()
    dst = net.unet.state_dict()
    prefixes = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
    checked = 0
    for k, v in src.items():
        if k.startswith(prefixes):
            assert torch.equal(dst[k], v), k
            checked += 1
    assert checked > 10
    assert not any(k.startswith(("up_blocks", "conv_out", "conv_norm_out")) for k in net.state_dict())
    # copies, not shared storage
    assert net.unet.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()


def test_promptnet_sd2_layout_kernels():
    cfg = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    net = PromptNet(cfg, clip_vision_width=48, text_width=40, proj_channels=8)
    assert net.kernels == [8, 4, 2, 1, 1, 1, 8]
    s, sizes, (cat_shape, out_shape) = _projection_io_sizes(net, 64, 48, seq=3)
    assert s.shape == (2, 1, 40)
    assert [i for i, _ in sizes] == [(64, 64), (32, 32), (16, 16), (8, 8), (8, 8), (8, 8)]
    assert all(o == (8, 8) for _, o in sizes)
    assert cat_shape[1] == 8 * 6 and net.prompt_out.kernel_size == (8, 8) and net.prompt_out.stride == (8, 8)
    # a 96×96 latent (768 px) derives its own kernels
    assert PromptNet(cfg, 48, 40, proj_channels=8, latent_size=96).kernels == [8, 4, 2, 1, 1, 1, 12]


# ----------------------------------------------------------------------------------------- 5. sampling


def test_sample_determinism_and_seeding(gen):
    srcs = [_source(1), _source(2)]
    sp, rp = ["a holder in the snow", "a holder at the beach"], ["a person in the snow", "a person at the beach"]
    a = gen.sample(srcs, sp, rp, [11, 12])
    b = gen.sample(srcs, sp, rp, [11, 12])
    assert len(a) == 2
    for img in a:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    c = gen.sample(srcs, sp, rp, [11, 99])
    assert np.array_equal(a[0], c[0])  # a row does not depend on the other rows' seeds
    assert not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError):
        gen.sample(srcs, sp, rp[:1], [11, 12])


def test_refinement_acts_on_the_ddim_grid(gen, monkeypatch):
    """refine_step=1 changes the image; the loop feeds refine_update ᾱ_t, ᾱ_prev (t − 1000//N, final ᾱ below 0)
    and σ = refine_eta·√Var(t, t_prev) exactly as diffusers' DDIM defines them."""
    calls = []
    real = pf.refine_update

    def spy(x, eps, alpha_t, alpha_prev, sigma, noise):
        calls.append((alpha_t, alpha_prev, sigma))
        return real(x, eps, alpha_t, alpha_prev, sigma, noise)

    monkeypatch.setattr(pf, "refine_update", spy)
    src, sp, rp = [_source(3)], ["a holder"], ["a person"]
    gen.cfg = _cfg(num_inference_steps=2, refine_step=0, s2=0.0, refine_eta=0.5)
    no_refine = gen.sample(src, sp, rp, [5])[0]
    assert calls == []
    gen.cfg = _cfg(num_inference_steps=2, refine_step=1, s2=0.0, refine_eta=0.5)
    refine = gen.sample(src, sp, rp, [5])[0]
    assert np.abs(no_refine.astype(int) - refine.astype(int)).sum() > 0

    sched = gen.scheduler
    ts = sched.timesteps.tolist()
    assert ts == [501, 1]  # "leading" spacing + steps_offset 1
    assert len(calls) == len(ts)
    for (a_t, a_p, sigma), t in zip(calls, ts):
        prev_t = t - 1000 // 2
        assert a_t == pytest.approx(float(sched.alphas_cumprod[t]), rel=1e-7)
        exp_p = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        assert a_p == pytest.approx(float(exp_p), rel=1e-7)
        assert sigma == pytest.approx(0.5 * math.sqrt(float(sched._get_variance(t, prev_t))), rel=1e-4)
    assert calls[-1][1] == pytest.approx(float(sched.final_alpha_cumprod))  # t=1 → t_prev < 0

    # s2 = 0 removes the reference prompt: changing it has no effect
    other_ref = gen.sample(src, sp, ["a dog on a skateboard"], [5])[0]
    assert np.array_equal(refine, other_ref)


# ----------------------------------------------------------------------------------------- 6. fine-tuning

_UNET_QKV = re.compile(r"\.attn[12]\.to_[qkv]\.")


def test_trainable_parameter_names(gen):
    names = set(gen.trainable_parameters())
    expected_unet = {f"unet.{n}" for n, _ in gen.unet.named_parameters() if _UNET_QKV.search(n)}
    expected_pn = {f"promptnet.{n}" for n, _ in gen.promptnet.named_parameters()}
    assert expected_unet and expected_pn
    assert names == expected_unet | expected_pn
    assert any(".attn1." in n for n in expected_unet) and any(".attn2." in n for n in expected_unet)
    assert "unet.conv_in.weight" not in names


def test_finetune_changes_and_restores(gen):
    gen.cfg = _cfg(finetune=True, finetune_steps=2, finetune_batch_size=2, num_augmentations=2, finetune_lr=1e-3)
    params = gen.trainable_parameters()
    before = {n: p.detach().clone() for n, p in params.items()}
    frozen = {"unet.conv_in.weight": gen.unet.conv_in.weight, "vae.conv": next(gen.vae.parameters()),
              "text.emb": gen.text_encoder.get_input_embeddings().weight}
    frozen_before = {n: p.detach().clone() for n, p in frozen.items()}
    with gen.finetuned(_source(4), seed=7) as losses:
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        unchanged = [n for n, p in params.items() if torch.equal(p, before[n])]
        assert unchanged == []
        for n, p in frozen.items():
            assert torch.equal(p, frozen_before[n]), n
        assert not any(p.requires_grad for p in params.values())
        assert gen.unet.training is False and gen.promptnet.training is False
    for n, p in gen.trainable_parameters().items():
        assert torch.equal(p, before[n]), n
    for n, p in frozen.items():
        assert torch.equal(p, frozen_before[n]), n


def test_finetune_restores_on_exception(gen):
    gen.cfg = _cfg(finetune=True, finetune_steps=1, finetune_batch_size=1, num_augmentations=1, finetune_lr=1e-3)
    before = {n: p.detach().clone() for n, p in gen.trainable_parameters().items()}
    with pytest.raises(RuntimeError):
        with gen.finetuned(_source(5), seed=1):
            raise RuntimeError("boom")
    for n, p in gen.trainable_parameters().items():
        assert torch.equal(p, before[n]), n


def test_finetune_off_is_noop(gen):
    gen.cfg = _cfg(finetune=False)
    before = {n: p.detach().clone() for n, p in gen.trainable_parameters().items()}
    with gen.finetuned(_source(4), seed=7) as losses:
        assert losses == []
        for n, p in gen.trainable_parameters().items():
            assert torch.equal(p, before[n]), n


# ----------------------------------------------------------------------------------------- 7. augmentation


def test_generic_augmentations():
    image = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(0))
    a = generic_augmentations(image, 2, torch.Generator().manual_seed(5))
    b = generic_augmentations(image, 2, torch.Generator().manual_seed(5))
    c = generic_augmentations(image, 2, torch.Generator().manual_seed(6))
    assert a.shape == (2, 3, 40, 48)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a[0], a[1])  # the generator advances between augmentations
    empty = generic_augmentations(image, 0, torch.Generator().manual_seed(5))
    assert empty.shape == (0, 3, 40, 48)
    assert pf.AUGMENTATIONS["none"](image, 3, torch.Generator()).shape == (0, 3, 40, 48)


# ----------------------------------------------------------------------------------------- 8. text context


def test_finetune_context_is_unpadded_sampling_is_padded(gen):
    """Fine-tuning: BOS + prompt + EOS, no padding (6 tokens for "a photo of holder"); sampling: 77 tokens."""
    ids = gen.tokenizer("a photo of holder").input_ids
    assert len(ids) == 6 and ids[0] == gen.tokenizer.bos_token_id and ids[-1] == gen.tokenizer.eos_token_id
    assert ids[4] == gen.holder_id
    width = gen.text_encoder.config.hidden_size
    contexts = []
    handle = gen.unet.register_forward_pre_hook(
        lambda m, args, kwargs: contexts.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        gen.cfg = _cfg(finetune=True, finetune_steps=2, finetune_batch_size=2, num_augmentations=1)
        with gen.finetuned(_source(6), seed=3):
            finetune_ctx, contexts[:] = list(contexts), []
            gen.cfg = _cfg(finetune=True, num_inference_steps=1, refine_step=1)
            gen.sample([_source(6)], ["a holder on the beach"], ["a person on the beach"], [1])
            sample_ctx = list(contexts)
    finally:
        handle.remove()
    assert [tuple(c.shape) for c in finetune_ctx] == [(2, 6, width)] * 2
    # refinement (u, γ) and main step (u, S*, ref): all padded to model_max_length
    assert gen.tokenizer.model_max_length == 77
    assert [tuple(c.shape) for c in sample_ctx] == [(2, 77, width), (3, 77, width)]
    # the unpadded context is the prompt itself: causal, so the slots before S* match the plain padded encoding
    with torch.no_grad():
        plain = gen.encode(["a photo of holder"])  # (1, 77, D)
    for c in finetune_ctx:
        torch.testing.assert_close(c[:, :4], plain[:, :4].expand(2, -1, -1), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(c[:, 4], plain[:, 4].expand(2, -1), atol=1e-3)  # S* is in the holder slot


def test_encode_unpadded(gen):
    with torch.no_grad():
        out = gen.encode(["a photo of holder", "a photo of holder"], pad=False)
    assert out.shape == (2, 6, gen.text_encoder.config.hidden_size)
    with pytest.raises(ValueError, match="same token length"):
        gen.encode(["a photo of holder", "a holder"], pad=False)


# ----------------------------------------------------------------------------------------- 9. CLIP input


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Keys cubic convolution (A = −0.75), half-pixel centres, clamped borders, no antialias: (n_out, n_in)."""
    a = -0.75

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), n_in - 1)] += kernel(src - (x0 + k))
    return m


@pytest.mark.parametrize("size_in", [128, 100, 64])
def test_clip_input_is_bicubic_without_antialias(gen, size_in):
    from training.models.tiny import OPENAI_MEAN, OPENAI_STD

    rng = np.random.default_rng(size_in)
    pixels = torch.from_numpy(rng.integers(0, 256, (2, 3, size_in, size_in)).astype(np.float32) / 255)
    captured = []
    handle = gen.image_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(kwargs["pixel_values"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            gen._clip_hidden(pixels)
    finally:
        handle.remove()
    size = gen.image_encoder.config.image_size
    m = _bicubic_matrix(size_in, size)
    expected = np.einsum("oh,bchw,pw->bcop", m, pixels.double().numpy(), m)  # no clamp of the overshoot
    expected = (expected - np.array(OPENAI_MEAN)[:, None, None]) / np.array(OPENAI_STD)[:, None, None]
    got = captured[0]
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=2e-5)
    if size_in != size:  # the antialiased resize (PIL / antialias=True) is measurably different
        aa = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
        aa = (aa.double().numpy() - np.array(OPENAI_MEAN)[:, None, None]) / np.array(OPENAI_STD)[:, None, None]
        assert np.abs(aa - expected).max() > 0.05


# ----------------------------------------------------------------------------------------- 10. latent-size guard


@pytest.mark.parametrize("side", [48, 66, 96, 128])
def test_wrong_size_source_is_refused(gen, side):
    """96 → a 48×48 latent that the tiny kernels would floor to one token, 128 → 2×2 tokens, 66 → 33×33: all
    refused before any work, with the image size, the latent size and what PromptNet expects."""
    bad = np.random.default_rng(side).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    lat = f"{side / 2:g}×{side / 2:g}"
    with pytest.raises(ValueError, match=rf"{side}×{side} source.*{lat} latent.*32×32 latents.*64×64 images"):
        gen.sample([bad], ["a holder"], ["a person"], [1])
    gen.cfg = _cfg(finetune=True, finetune_steps=1, finetune_batch_size=1, num_augmentations=1)
    before = {n: p.detach().clone() for n, p in gen.trainable_parameters().items()}
    with pytest.raises(ValueError, match=rf"{side}×{side} source.*{lat} latent"):
        with gen.finetuned(bad, seed=1):
            pass
    for n, p in gen.trainable_parameters().items():
        assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError, match="64×64"):  # a batch with one good and one bad source
        gen.sample([_source(1), bad], ["a holder"] * 2, ["a person"] * 2, [1, 2])


def test_promptnet_refuses_other_latent_sizes(pn):
    net = pn.promptnet
    assert net.latent_size == 32
    c, width = net.unet.config.in_channels, pn.image_encoder.config.hidden_size
    ok = torch.zeros(1, c, 32, 32)
    hidden = torch.zeros(1, 5, width)
    with torch.no_grad():
        assert net(ok, ok, torch.tensor([1]), hidden).shape[1] == 1
        for h, w in [(48, 48), (64, 64), (32, 48)]:
            bad = torch.zeros(1, c, h, w)
            with pytest.raises(ValueError, match=rf"{h}×{w}.*32×32 latents"):
                net(bad, ok, torch.tensor([1]), hidden)
            with pytest.raises(ValueError, match="z_t"):
                net(ok, bad, torch.tensor([1]), hidden)


# ----------------------------------------------------------------------------------------- 11. failure classes


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("out of memory"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1296, unhandled system error"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("HIP error: hipErrorNoDevice"),
    RuntimeError("[enforce fail] Out Of Memory while allocating workspace"),
    torch.AcceleratorError("CUDA error: unspecified launch failure"),
    MemoryError(),
], ids=lambda e: type(e).__name__)
def test_is_transient_device_failures(exc):
    from training.errors import is_transient

    assert is_transient(exc) is True
    assert pf.is_transient is is_transient


def test_is_transient_input_failures(gen):
    import io

    from PIL import Image, UnidentifiedImageError

    from filtering.images import decode_png_rgb
    from training.errors import is_transient

    with pytest.raises(ValueError) as guard:
        gen.check_source_size(96, 96)
    assert is_transient(guard.value) is False
    with pytest.raises(UnidentifiedImageError) as pil:
        Image.open(io.BytesIO(b"not an image"))
    assert is_transient(pil.value) is False
    with pytest.raises(Exception) as dec:
        decode_png_rgb(b"\x89PNG broken")
    assert is_transient(dec.value) is False
    for exc in (RuntimeError("non-finite latents for rows [0]"), ValueError("device 'CUDA:9' not allowed"),
                RuntimeError("the relationship is not a HIPPO"), KeyError("cuda")):
        assert is_transient(exc) is False, exc
    # explicit wrapping keeps the cause: a stage that re-raises an OOM as its own error still retries
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as oom:
            raise RuntimeError("generation failed") from oom
    except RuntimeError as wrapped:
        assert is_transient(wrapped) is True
