"""Infusion (SPEC §4.3, D6): dual-stream processors, Δ-only training, sampling, artifacts.

Runs on the tiny t2i (epsilon-prediction, random weights) and on the synthetic world's t2i (v-prediction,
trained), both loaded through the kit. Equalities are bit-exact (``torch.equal``) where the method guarantees
them by construction, and checked against independent softmax/matmul computations otherwise.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.attention.infusion import (
    InfusionAttnProcessor,
    InfusionKVAttnProcessor,
    InfusionRouting,
    cross_attention_layers,
    installed,
)
from training.methods.infusion import (
    InfusionConcept,
    InfusionParams,
    concept_token_index,
    customized_eps,
    foundational_eps,
    prepare_image,
    sample,
    train_infusion,
)

WORLD_T2I = Path(__file__).resolve().parents[1] / "models" / "world" / "t2i"
WORLD_SUBJECT = Path(__file__).resolve().parents[1] / "models" / "world" / "eval" / "subjects" / "blue-star-none"
FAST = dict(batch_size=2, grad_accum=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are latency-bound; one thread avoids spinning against other processes on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(path, dtype="float32"):
    from training.models.kit import load_role

    return load_role("t2i", path, dtype=dtype, device="cpu").components


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return _load(tiny_models / "t2i")


@pytest.fixture(scope="module")
def world():
    if not (WORLD_T2I / "model_index.json").exists():
        pytest.skip("models/world/t2i is not built")
    return _load(WORLD_T2I)


def _images(n=2, seed=0, shape=(70, 50, 3)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _snapshot(t2i) -> dict[str, torch.Tensor]:
    mods = {"unet": t2i.unet, "vae": t2i.vae, "text": t2i.text_encoder}
    return {f"{k}.{n}": p.detach().clone() for k, m in mods.items() for n, p in m.named_parameters()}


def _random_concept(t2i, noun, seed, mode="paper", placement="post_v", scale=0.5) -> InfusionConcept:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, attn in cross_attention_layers(t2i.unet).items():
        dim = InfusionAttnProcessor.delta_dim(attn, placement)
        deltas[name] = scale * torch.randn((2, dim) if mode == "code_compat" else (dim,), generator=g)
    return InfusionConcept(noun=noun, layer_names=list(deltas), placement=placement, mode=mode, deltas=deltas)


# ----------------------------------------------------------------------------------------- processor math


def _attention_module():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=4).eval()


def _reference(attn, hs_q, key_ctx, value) -> torch.Tensor:
    """Independent attention: per head softmax(q k^T / √d) @ value, then to_out. hs_q (N, Dq); value (L, inner)."""
    h, d = attn.heads, attn.to_q.out_features // attn.heads
    q = (hs_q @ attn.to_q.weight.T).view(-1, h, d).transpose(0, 1)  # (h, N, d)
    k = (key_ctx @ attn.to_k.weight.T).view(-1, h, d).transpose(0, 1)  # (h, L, d)
    v = value.view(-1, h, d).transpose(0, 1)
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    o = (p @ v).transpose(0, 1).reshape(-1, h * d)
    return o @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_paper_processor_equals_independent_computation_multi_concept():
    attn = _attention_module()
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(5, 6, 16, generator=g)  # [F0, F1 ; C0, C1, C2]
    ctx = torch.randn(5, 7, 8, generator=g)  # C rows' own context rows must not be read
    delta = torch.randn(2, 8, generator=g)  # concepts A (0) and B (1)
    pair, share = [0, 1, 1], [True, True, False]
    slots = [(0, 2, 0), (0, 4, 1), (1, 4, 1), (2, 2, 0)]
    proc = InfusionAttnProcessor.from_attention(attn, delta, "post_v")
    proc.routing = InfusionRouting.build(2, pair, share, slots)
    with torch.no_grad():
        out = proc(attn, hs, ctx)
        plain = attn(hs[:2], ctx[:2])  # diffusers' own processor on the F rows
        assert torch.allclose(out[:2], plain, atol=1e-5)
        for j in range(3):
            f = pair[j]
            value = ctx[f] @ attn.to_v.weight.T  # (L, inner)
            for row, pos, k in slots:
                if row == j:
                    value = value.clone()
                    value[pos] += delta[k]  # only this concept's own token
            queries = hs[f] if share[j] else hs[2 + j]
            expected = _reference(attn, queries, ctx[f], value)
            assert torch.allclose(out[2 + j], expected, atol=1e-5), j
        # concept A's Δ never reaches a row/token that holds only B: changing Δ_A leaves C1 bit-identical
        other = InfusionAttnProcessor.from_attention(attn, torch.stack([delta[0] + 3.0, delta[1]]), "post_v")
        other.routing = proc.routing
        out2 = other(attn, hs, ctx)
        assert torch.equal(out2[3], out[3]) and torch.equal(out2[:2], out[:2])
        assert not torch.allclose(out2[2], out[2])


def test_pre_v_and_code_compat_processors_equal_independent_computation():
    attn = _attention_module()
    g = torch.Generator().manual_seed(2)
    hs, ctx = torch.randn(4, 6, 16, generator=g), torch.randn(4, 7, 8, generator=g)
    routing = InfusionRouting.build(2, [0, 1], [True, True], [(0, 3, 0), (1, 5, 0)])
    with torch.no_grad():
        d_pre = torch.randn(1, 8, generator=g)  # text width
        pre = InfusionAttnProcessor.from_attention(attn, d_pre, "pre_v")
        pre.routing = routing
        out = pre(attn, hs, ctx)
        for j, pos in ((0, 3), (1, 5)):
            c = ctx[j].clone()
            c[pos] += d_pre[0]  # Δ on the token's context vector before to_v (keys untouched)
            expected = _reference(attn, hs[j], ctx[j], c @ attn.to_v.weight.T)
            assert torch.allclose(out[2 + j], expected, atol=1e-5)

        d_kv = torch.randn(1, 2, 8, generator=g)
        kv = InfusionKVAttnProcessor.from_attention(attn, d_kv, "post_v")
        kv.routing = routing
        out = kv(attn, hs, ctx)
        assert torch.allclose(out[:2], attn(hs[:2], ctx[:2]), atol=1e-5)  # F rows: plain attention
        for j, pos in ((0, 3), (1, 5)):
            h, d = attn.heads, 8 // attn.heads
            q = (hs[2 + j] @ attn.to_q.weight.T).view(-1, h, d).transpose(0, 1)  # C's own queries
            k = ctx[j] @ attn.to_k.weight.T
            v = ctx[j] @ attn.to_v.weight.T
            k[pos] += d_kv[0, 0]
            v[pos] += d_kv[0, 1]
            kh, vh = k.view(-1, h, d).transpose(0, 1), v.view(-1, h, d).transpose(0, 1)
            o = (torch.softmax(q @ kh.transpose(1, 2) / math.sqrt(d), -1) @ vh).transpose(0, 1).reshape(-1, h * d)
            assert torch.allclose(out[2 + j], o @ attn.to_out[0].weight.T + attn.to_out[0].bias, atol=1e-5)


def test_unet_layer_multi_concept_against_independent_computation(tiny):
    """Inside the real UNet: one attn2 layer's output with two concepts, recomputed from its captured input."""
    unet, tok = tiny.unet, tiny.tokenizer
    prompt = "a photo of a cat and a dog"
    ids = tok(prompt).input_ids
    pos_cat, pos_dog = concept_token_index(tok, prompt, "cat"), concept_token_index(tok, prompt, "dog")
    assert ids[pos_cat] == tok("cat", add_special_tokens=False).input_ids[-1] and pos_cat < pos_dog
    cat, dog = _random_concept(tiny, "cat", 3), _random_concept(tiny, "dog", 4)
    from training.methods.infusion import _build_processors, _encode

    procs = _build_processors(unet, [cat, dog])
    name, attn = next(iter(cross_attention_layers(unet).items()))
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out),
                                        with_kwargs=True)
    ctx = _encode(tiny, [prompt], "cpu")
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    routing = InfusionRouting.build(1, [0], [True], [(0, pos_cat, 0), (0, pos_dog, 1)])
    try:
        with torch.no_grad(), installed(unet, procs, routing):
            unet(torch.cat([z, z]), 500, encoder_hidden_states=torch.cat([ctx, ctx]))
    finally:
        handle.remove()
    hs, context = seen["args"][0], seen["kwargs"]["encoder_hidden_states"]
    with torch.no_grad():
        value = context[0] @ attn.to_v.weight.T
        value[pos_cat] += cat.deltas[name]
        value[pos_dog] += dog.deltas[name]
        expected_c = _reference(attn, hs[0], context[0], value)  # F's queries: F's maps
        expected_f = _reference(attn, hs[0], context[0], context[0] @ attn.to_v.weight.T)
    assert torch.allclose(seen["out"][1], expected_c, atol=1e-4)
    assert torch.allclose(seen["out"][0], expected_f, atol=1e-4)
    swapped = expected_c - _reference(attn, hs[0], context[0], torch.where(
        torch.arange(len(value))[:, None] == pos_cat, value - cat.deltas[name] + dog.deltas[name], value))
    assert swapped.abs().max() > 1e-4  # dog's Δ at cat's token would give another output


# ----------------------------------------------------------------------------------------- Δ = 0 and routing


@pytest.mark.parametrize("which", ["tiny", "world"])
def test_zero_delta_customized_equals_foundational_exactly(which, request):
    t2i = request.getfixturevalue(which)
    noun = "cat" if which == "tiny" else "star"
    unet = t2i.unet
    layers = cross_attention_layers(unet)
    prompts = [f"a photo of a {noun}", f"a {noun}"]
    from training.methods.infusion import _encode

    ctx = _encode(t2i, prompts, "cpu")
    size = unet.config.sample_size
    z = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(5))
    positions = [concept_token_index(t2i.tokenizer, p, noun) for p in prompts]
    routing = InfusionRouting.build(2, [0, 1], [True, True], [(j, pos, 0) for j, pos in enumerate(positions)])
    t = torch.tensor([900, 100, 900, 100])
    for placement in ("post_v", "pre_v"):
        zero = {n: InfusionAttnProcessor.from_attention(a, None, placement) for n, a in layers.items()}
        with torch.no_grad(), installed(unet, zero, routing):
            out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([ctx, ctx])).sample
        assert torch.equal(out[:2], out[2:]), placement
    concept = _random_concept(t2i, noun, 0)
    from training.methods.infusion import _build_processors

    with torch.no_grad(), installed(unet, _build_processors(unet, [concept]), routing):
        out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([ctx, ctx])).sample
    assert (out[:2] - out[2:]).abs().max() > 1e-3  # Δ ≠ 0 moves C away from F
    # full sampling with Δ = 0 (C's unconditional branch runs on its own latent): identical images
    zero_concept = _random_concept(t2i, noun, 0, scale=0.0)
    cust, found = sample(t2i, [zero_concept], prompts, [0, 1], steps=3)
    assert all(np.array_equal(c, f) for c, f in zip(cust, found))


def test_prompt_without_noun_goes_through_f_alone(tiny):
    concept = _random_concept(tiny, "cat", 1)
    before = {n: type(p) for n, p in tiny.unet.attn_processors.items()}
    cust, found = sample(tiny, [concept], ["a photo of a dog", "a photo of a cat"], [3, 4], steps=3)
    assert np.array_equal(cust[0], found[0])
    assert np.abs(cust[1].astype(int) - found[1].astype(int)).max() > 0
    assert {n: type(p) for n, p in tiny.unet.attn_processors.items()} == before  # processors restored
    # LFD = 0 by construction for non-customized prompts; customized prompts differ
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a dog", "a photo of a cat"]
    e_c = customized_eps(tiny, [concept])(z, torch.tensor([300, 300]), prompts)
    e_f = foundational_eps(tiny)(z, torch.tensor([300, 300]), prompts)
    assert torch.equal(e_c[0], e_f[0]) and (e_c[1] - e_f[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="does not occur"):
        concept_token_index(tiny.tokenizer, "a photo of a category", "cat")


def test_multi_token_noun_uses_last_token(tiny):
    tok = tiny.tokenizer
    noun_ids = tok("zebrafish", add_special_tokens=False).input_ids
    assert len(noun_ids) > 1  # not a tiny-vocabulary word: several BPE tokens
    prompt = "a photo of a zebrafish"
    ids = tok(prompt).input_ids
    pos = concept_token_index(tok, prompt, "zebrafish")
    assert ids[pos - len(noun_ids) + 1 : pos + 1] == noun_ids
    assert prepare_image(_images(1, shape=(70, 50, 3))[0], 64).shape == (64, 64, 3)


# ----------------------------------------------------------------------------------------- training


def test_training_changes_only_delta(tiny):
    before = _snapshot(tiny)
    procs_before = dict(tiny.unet.attn_processors)
    steps = []
    concept = train_infusion(tiny, _images(), "cat", InfusionParams(steps=3, batch_size=2, grad_accum=2), seed=0,
                             on_step=lambda i, loss: steps.append((i, loss)))
    after = _snapshot(tiny)
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert torch.equal(_bits(p), _bits(before[n])), n
    assert all(p.grad is None for p in tiny.unet.parameters())
    assert tiny.unet.attn_processors == procs_before  # the very same processor objects back
    assert [i for i, _ in steps] == [1, 2, 3] and [loss for _, loss in steps] == concept.losses
    dims = {n: a.to_v.out_features for n, a in cross_attention_layers(tiny.unet).items()}
    assert {n: tuple(d.shape) for n, d in concept.deltas.items()} == {n: (d,) for n, d in dims.items()}
    assert all(d.abs().max() > 0 for d in concept.deltas.values())  # Δ moved from 0 in every layer


def _fixed_loss(t2i, concept, images, prompt) -> float:
    """C's v-MSE on fixed draws (16 per image, t uniform in [200, 800)) of the training images."""
    from training.methods.infusion import _encode_posteriors, _scheduler

    sched = _scheduler(t2i)
    mean, _ = _encode_posteriors(t2i, np.stack([prepare_image(im, 32) for im in images]), "cpu")
    z0 = mean.repeat(16, 1, 1, 1) * t2i.vae.config.scaling_factor
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(200, 800, (z0.shape[0],), generator=g)
    z_t = sched.add_noise(z0, noise, t)
    out = customized_eps(t2i, [concept], output="raw")(z_t, t, [prompt] * len(t))
    return float(((out - sched.get_velocity(z0, noise, t)) ** 2).mean())


def test_loss_falls_on_small_overfit(world):
    images = [np.asarray(Image.open(WORLD_SUBJECT / "0.png").convert("RGB"))]  # one blue star
    params = InfusionParams(steps=60, batch_size=4, grad_accum=1, learning_rate=0.1, templates=("a {}",), flip_p=0.0)
    concept = train_infusion(world, images, "star", params, seed=0)
    zero = InfusionConcept("star", concept.layer_names, "post_v", "paper",
                           {n: torch.zeros_like(d) for n, d in concept.deltas.items()})
    before, after = _fixed_loss(world, zero, images, "a star"), _fixed_loss(world, concept, images, "a star")
    # measured (world t2i, CPU): 0.1371 with Δ = 0 → 0.1217 after 60 steps (−11 %); the base stays untouched,
    # so the whole fall comes from the 352 values of Δ (7 layers)
    assert after < 0.93 * before, (before, after)


def test_float16_base_trains_without_nan(tiny_models):
    half = _load(tiny_models / "t2i", "float16")
    before = _snapshot(half)
    concept = train_infusion(half, _images(), "cat", InfusionParams(steps=3, precision="fp16", **FAST), seed=0)
    assert all(math.isfinite(x) for x in concept.losses)
    assert all(torch.isfinite(d).all() and d.dtype == torch.float32 and d.abs().max() > 0
               for d in concept.deltas.values())
    assert all(torch.equal(_bits(p), _bits(before[n])) for n, p in _snapshot(half).items())
    cust, found = sample(half, [concept], ["a photo of a cat"], [0], steps=2)
    assert cust[0].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="fp32"):
        train_infusion(half, _images(), "cat", InfusionParams(steps=1, precision="fp32", **FAST), seed=0)


def test_same_job_alone_or_after_another_job_is_bit_identical(tiny_models):
    params = InfusionParams(steps=2, **FAST)
    alone_base = _load(tiny_models / "t2i")
    alone = train_infusion(alone_base, _images(seed=1), "cat", params, seed=7)
    shared = _load(tiny_models / "t2i")
    other = train_infusion(shared, _images(seed=2), "dog", InfusionParams(steps=2, placement="pre_v", **FAST), seed=3)
    sample(shared, [other], ["a photo of a dog"], [1], steps=2)
    again = train_infusion(shared, _images(seed=1), "cat", params, seed=7)
    assert alone.losses == again.losses
    assert all(torch.equal(_bits(alone.deltas[n]), _bits(again.deltas[n])) for n in alone.layer_names)
    a, _ = sample(alone_base, [alone], ["a photo of a cat"], [5], steps=2)
    b, _ = sample(shared, [again], ["a photo of a cat"], [5], steps=2)
    assert np.array_equal(a[0], b[0])


# ----------------------------------------------------------------------------------------- artifacts, modes


def test_save_load_round_trip(tiny, tmp_path):
    concept = _random_concept(tiny, "cat", 9)
    concept.base_fingerprint = "abc123"
    paths = concept.save(tmp_path / "cat")
    assert sorted(Path(p).name for p in paths) == ["infusion.json", "infusion.safetensors"]
    raw = (tmp_path / "cat" / "infusion.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert concept.nbytes == len(raw) - 8 - header_len  # the fp16 payload of the file
    assert concept.nbytes == 2 * sum(a.to_v.out_features for a in cross_attention_layers(tiny.unet).values())
    meta = json.loads((tmp_path / "cat" / "infusion.json").read_text())
    assert (meta["noun"], meta["placement"], meta["mode"], meta["base_fingerprint"]) == ("cat", "post_v", "paper",
                                                                                          "abc123")
    assert meta["layer_names"] == concept.layer_names
    loaded = InfusionConcept.load(tmp_path / "cat")
    assert loaded.nbytes == concept.nbytes
    rounded = InfusionConcept("cat", concept.layer_names, "post_v", "paper",
                              {n: d.half().float() for n, d in concept.deltas.items()})
    for n in concept.layer_names:
        assert loaded.deltas[n].dtype == torch.float16 and torch.equal(loaded.deltas[n].float(), rounded.deltas[n])
    a, _ = sample(tiny, [loaded], ["a photo of a cat"], [2], steps=3)
    b, _ = sample(tiny, [rounded], ["a photo of a cat"], [2], steps=3)
    assert np.array_equal(a[0], b[0])


def test_code_compat_differs_from_paper_and_pre_v_has_text_width(tiny, tmp_path):
    cc = train_infusion(tiny, _images(), "cat", InfusionParams(steps=2, mode="code_compat", **FAST), seed=0)
    inner = {n: a.to_v.out_features for n, a in cross_attention_layers(tiny.unet).items()}
    assert {n: tuple(d.shape) for n, d in cc.deltas.items()} == {n: (2, d) for n, d in inner.items()}
    assert all(d[0].abs().max() > 0 and d[1].abs().max() > 0 for d in cc.deltas.values())  # K and V residuals
    cc = _random_concept(tiny, "cat", 5, mode="code_compat")  # the same value residual in both modes:
    paper = InfusionConcept("cat", cc.layer_names, "post_v", "paper", {n: d[1] for n, d in cc.deltas.items()})
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out_cc = customized_eps(tiny, [cc])(z, 400, ["a photo of a cat"])
    out_paper = customized_eps(tiny, [paper])(z, 400, ["a photo of a cat"])
    base = foundational_eps(tiny)(z, 400, ["a photo of a cat"])
    assert (out_cc - out_paper).abs().max() > 1e-4 and (out_cc - base).abs().max() > 1e-4
    zero_cc = _random_concept(tiny, "cat", 0, mode="code_compat", scale=0.0)
    cust, found = sample(tiny, [zero_cc], ["a photo of a cat"], [0], steps=2)
    assert np.array_equal(cust[0], found[0])

    pre = train_infusion(tiny, _images(), "cat", InfusionParams(steps=1, placement="pre_v", **FAST), seed=0)
    width = tiny.unet.config.cross_attention_dim  # = text-encoder hidden size
    assert width == tiny.text_encoder.config.hidden_size
    assert all(tuple(d.shape) == (width,) for d in pre.deltas.values())
    assert pre.nbytes == 2 * width * len(pre.layer_names)
    pre.save(tmp_path / "pre")
    assert InfusionConcept.load(tmp_path / "pre").placement == "pre_v"


def test_params_validation():
    with pytest.raises(ValueError, match="placement"):
        InfusionParams(placement="post_k")
    with pytest.raises(ValueError, match="mode"):
        InfusionParams(mode="xformers")
    with pytest.raises(ValueError, match="templates"):
        InfusionParams(templates=("a photo",))


def test_foreground_mask_weights_the_loss(tiny):
    from training.methods.infusion import _weighted_mse, prepare_mask

    g = torch.Generator().manual_seed(0)
    pred, target, m = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g), torch.rand(2, 1, 3, 3)
    expected = sum(float(m[b, 0, i, j]) * float((pred[b, c, i, j] - target[b, c, i, j]) ** 2)
                   for b in range(2) for c in range(4) for i in range(3) for j in range(3)) / (4 * float(m.sum()))
    assert math.isclose(float(_weighted_mse(pred, target, m)), expected, rel_tol=1e-5)
    authors = sum(float((m[b, 0, i, j] * pred[b, c, i, j] - m[b, 0, i, j] * target[b, c, i, j]) ** 2)
                  for b in range(2) for c in range(4) for i in range(3) for j in range(3)) / (2 * 4 * 9)
    assert math.isclose(float(_weighted_mse(pred, target, m, "authors")), authors, rel_tol=1e-5)
    # the authors' resize: bilinear, then divided by the max (a half-covered mask keeps its 1s)
    soft = np.zeros((64, 64), np.float32)
    soft[:, :32] = 0.5
    assert prepare_mask(soft, (64, 64), 8, "bilinear").max() == 1.0 and prepare_mask(soft, (64, 64), 8).max() == 0.5
    # masks follow the image's centre crop: a 70×50 mask whose top 10 rows are 1 is cropped away entirely
    mask = np.zeros((70, 50), np.float32)
    mask[:10] = 1.0
    assert prepare_mask(mask, (70, 50), 8).max() == 0.0
    images = _images()
    params = InfusionParams(steps=2, **FAST)
    plain = train_infusion(tiny, images, "cat", params, seed=0)
    ones = train_infusion(tiny, images, "cat", params, seed=0, masks=[np.ones((70, 50), np.uint8) * 255] * 2)
    half = np.zeros((70, 50), np.float32)
    half[:, :25] = 1.0
    halved = train_infusion(tiny, images, "cat", params, seed=0, masks=[half, half])
    assert np.allclose(plain.losses, ones.losses, rtol=1e-5)  # either weighting: a full mask is no mask
    assert not np.allclose(plain.losses, halved.losses, rtol=1e-3)
    normalized = InfusionParams(steps=2, mask_loss="normalized", **FAST)
    assert np.allclose(plain.losses, train_infusion(tiny, images, "cat", normalized, seed=0,
                                                    masks=[np.ones((70, 50), np.uint8) * 255] * 2).losses, rtol=1e-5)
    with pytest.raises(ValueError, match="mask_loss"):
        InfusionParams(mask_loss="sum")
    assert len(InfusionParams().templates) == 11 and InfusionParams().templates[0] == "a photo of a {}"
    with pytest.raises(ValueError, match="does not match"):
        train_infusion(tiny, images, "cat", params, seed=0, masks=[np.ones((8, 8))] * 2)
