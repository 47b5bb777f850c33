"""DCI (SPEC §4.2): DBIM against an independent re-implementation, prompts/token sets, λ = −∞ ≡ ICO sampling."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.attention.dbim import DbimAttnProcessor, DbimConfig, dbim_aggregate
from training.attention.ico import IcoAttnProcessor, attention_module, cross_attention_names, installed_processors
from training.methods.dci import DciParams, aux_seed, auxiliary_prompt, sample_dci, token_sets
from training.methods.ico import IcoConcept, IcoParams, sample, train_ico

WORLD_T2I = Path(__file__).resolve().parents[1] / "models" / "world" / "t2i"
NEG_INF = float("-inf")


def _load(path, dtype="float32"):
    from training.models.kit import load_role

    return load_role("t2i", path, dtype=dtype, device="cpu").components


def _bare_concept(noun="cat", tokens=("<new1>", "<new2>", "<new3>")) -> IcoConcept:
    d = 4
    return IcoConcept(tokens, noun, {}, torch.zeros(len(tokens), d), torch.zeros(1, 1, d), torch.zeros(1, 1, d))


# ------------------------------------------------------------------------------ DBIM, steps 1–5


def _reference_dbim(P, O, rc, ra, real_c, real_a, t_c, aux_noun, lam):
    """SPEC §4.2 steps 1–5 written out with loops over heads and pixels (float64, python lists)."""
    B, H, N, L = P.shape
    out = O.clone().double()
    for h in range(H):
        a_c, a_a = [], []
        for i in range(N):
            zc = [math.exp(10 * float(P[rc, h, i, j])) for j in range(L) if real_c[j]]
            idx_c = [j for j in range(L) if real_c[j]]
            s_c = {j: z / sum(zc) for j, z in zip(idx_c, zc)}
            za = [math.exp(10 * float(P[ra, h, i, j])) for j in range(L) if real_a[j]]
            idx_a = [j for j in range(L) if real_a[j]]
            s_a = {j: z / sum(za) for j, z in zip(idx_a, za)}
            a_c.append(sum(s_c[j] for j in t_c))
            a_a.append(1.0 - sum(s_a[j] for j in aux_noun))
        zc = [math.exp(10 * a) for a in a_c]
        za = [math.exp(10 * a) for a in a_a]
        m_c = [500 * z / sum(zc) for z in zc]
        m_a = [500 * z / sum(za) for z in za]
        for i in range(N):
            e_c, e_a = math.exp(m_c[i]), math.exp(lam * m_a[i])
            M_c, M_a = e_c / (e_c + e_a), e_a / (e_c + e_a)
            out[rc, h, i] = M_c * O[rc, h, i].double() + M_a * O[ra, h, i].double()
    return out


def _random_case(seed, B=3, H=2, N=300, L=9):
    # N pixels: 500·softmax over N gives masks of order 500/N; N ≳ 100 keeps the branch softmax soft
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(B, H, N, L, generator=g).mul(3).softmax(-1)  # post-softmax probabilities
    O = torch.randn(B, H, N, 5, generator=g)
    real_c = torch.zeros(L, dtype=torch.bool)
    real_c[1:7] = True  # SOS at 0, EOS at 7, pad at 8
    real_a = torch.zeros(L, dtype=torch.bool)
    real_a[1:5] = True
    return P, O, real_c, real_a


@pytest.mark.parametrize("lam", [0.0, 0.8, -1.7])
def test_dbim_matches_independent_reimplementation(lam):
    P, O, real_c, real_a = _random_case(0)
    cfg = DbimConfig(concept_rows=(1,), aux_rows=(2,), concept_real=real_c, aux_real=real_a,
                     concept_tokens=(3, 4, 5), aux_noun_tokens=(3,), lam=lam)
    got = dbim_aggregate(P, O, cfg)
    want = _reference_dbim(P, O, 1, 2, real_c.tolist(), real_a.tolist(), (3, 4, 5), (3,), lam)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[1] - O[1]).abs().max() > 1e-2  # the concept row did change
    assert torch.equal(got[0], O[0]) and torch.equal(got[2], O[2])  # uncond, aux: bit-identical


def test_dbim_four_row_layout_and_limits():
    P, O, real_c, real_a = _random_case(1, B=4)
    cfg = DbimConfig(concept_rows=(1,), aux_rows=(3,), concept_real=real_c, aux_real=real_a,
                     concept_tokens=(2, 3), aux_noun_tokens=(1, 2), lam=0.3)
    got = dbim_aggregate(P, O, cfg)
    want = _reference_dbim(P, O, 1, 3, real_c.tolist(), real_a.tolist(), (2, 3), (1, 2), 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for r in (0, 2, 3):
        assert torch.equal(got[r], O[r])
    minus = dbim_aggregate(P, O, DbimConfig((1,), (3,), real_c, real_a, (2, 3), (1, 2), lam=NEG_INF))
    assert torch.equal(minus, O)  # λ = −∞: M_c = 1, M_a = 0 exactly
    plus = dbim_aggregate(P, O, DbimConfig((1,), (3,), real_c, real_a, (2, 3), (1, 2), lam=float("inf")))
    assert torch.equal(plus[1], O[3])  # λ = +∞: the auxiliary output replaces it


def test_dbim_config_rejects_bad_tokens():
    _, _, real_c, real_a = _random_case(0)
    with pytest.raises(ValueError, match="concept_tokens"):
        DbimConfig((1,), (2,), real_c, real_a, concept_tokens=(0,), aux_noun_tokens=(3,))  # SOS is not real
    with pytest.raises(ValueError, match="pair"):
        DbimConfig((1,), (), real_c, real_a, concept_tokens=(3,), aux_noun_tokens=(3,))


def test_dbim_processor_in_a_real_layer(tiny_models):
    """A real diffusers attn2: uncond/aux rows equal the ICO processor's bit for bit; with λ = −∞ every row does."""
    t2i = _load(tiny_models / "t2i")
    name = cross_attention_names(t2i.unet)[0]
    attn = attention_module(t2i.unet, name)
    ico = IcoAttnProcessor.from_attention(attn)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 256, attn.to_q.in_features, generator=g)
    ctx = torch.randn(3, 77, attn.to_k.in_features, generator=g)
    real = torch.zeros(77, dtype=torch.bool)
    real[1:6] = True
    with torch.no_grad():
        base = ico(attn, hidden, ctx)
        for lam, changed in ((0.0, True), (NEG_INF, False)):
            cfg = DbimConfig((1,), (2,), real, real, concept_tokens=(2, 3), aux_noun_tokens=(2,), lam=lam)
            out = DbimAttnProcessor(cfg, kv=ico)(attn, hidden, ctx)
            assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
            assert torch.equal(out[1], base[1]) != changed


# ------------------------------------------------------------------------------ prompts and token sets


def test_auxiliary_prompt_construction():
    concept = _bare_concept("dog")
    params = DciParams()
    prompt = "a <new1> <new2> <new3> dog on the beach"
    assert auxiliary_prompt(prompt, concept, None, params.aux_nouns) == ("a cat on the beach", "cat")  # skips "dog"
    assert auxiliary_prompt(prompt, concept, "person", params.aux_nouns) == ("a person on the beach", "person")
    with pytest.raises(ValueError, match="concept phrase"):
        auxiliary_prompt("a photo of a dog", concept, None, params.aux_nouns)
    with pytest.raises(ValueError, match="2 times"):
        auxiliary_prompt(f"{prompt} and a <new1> <new2> <new3> dog", concept, None, params.aux_nouns)
    with pytest.raises(ValueError, match="aux_nouns"):
        auxiliary_prompt(prompt, concept, None, ("dog",))


def test_token_sets_on_known_prompts(tiny_models):
    t2i = _load(tiny_models / "t2i")
    tok = t2i.tokenizer
    concept = _bare_concept("cat")
    p_c = "a photo of <new1> <new2> <new3> cat on the beach"
    p_a, aux = auxiliary_prompt(p_c, concept, None, DciParams().aux_nouns)
    assert (p_a, aux) == ("a photo of dog on the beach", "dog")
    t_c, t_a, aux_idx = token_sets(tok, p_c, p_a, concept, aux)
    # [SOS] a photo of V1 V2 V3 cat on the beach [EOS]   /   [SOS] a photo of dog on the beach [EOS]
    assert t_c == [4, 5, 6, 7]
    assert aux_idx == [4]
    assert t_a == [1, 2, 3, 5, 6, 7]
    ids = tok(p_a).input_ids
    assert [ids[j] for j in aux_idx] == tok("dog", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="concept phrase"):
        token_sets(tok, "a photo of a cat", p_a, concept, aux)


def test_token_sets_pad_equals_eos_world_tokenizer():
    t2i = _load(WORLD_T2I)
    tok = t2i.tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # positions, not ids, decide what is real
    concept = _bare_concept("circle")
    p_c = "a <new1> <new2> <new3> circle on the left"
    p_a, aux = auxiliary_prompt(p_c, concept, "square", ())
    t_c, t_a, aux_idx = token_sets(tok, p_c, p_a, concept, aux)
    n_words = len(tok("a square on the left", add_special_tokens=False).input_ids)
    assert t_c == [2, 3, 4, 5] and aux_idx == [2]
    assert t_a == [j for j in range(1, n_words + 1) if j != 2]


# ------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def world_concept():
    """A concept on the synthetic world's v-prediction t2i (trailing DDIM, zero-terminal SNR), briefly trained."""
    from PIL import Image

    t2i = _load(WORLD_T2I)
    folder = WORLD_T2I.parent / "eval" / "subjects" / "purple-square-whitedot"
    images = [np.asarray(Image.open(folder / f"{k}.png").convert("RGB")) for k in range(2)]
    concept = train_ico(t2i, images, "square", IcoParams(steps=4, learning_rate=1e-3), seed=0)
    return t2i, concept


def _capture_latents(t2i):
    """Collect the latents every VAE decode receives (what ``sample``/``sample_dci`` produce, before uint8)."""
    got = []
    handle = t2i.vae.post_quant_conv.register_forward_pre_hook(lambda m, a: got.append(a[0].clone()))
    return got, handle


def test_dci_minus_infinity_equals_single_branch_exactly(world_concept):
    t2i, concept = world_concept
    prompt = "a <new1> <new2> <new3> square on the left"
    got, handle = _capture_latents(t2i)
    try:
        single = sample(t2i, concept, [prompt], [5], steps=20)[0]
        dci = sample_dci(t2i, concept, prompt, 5, DciParams(lam=NEG_INF, steps=20))
        dci0 = sample_dci(t2i, concept, prompt, 5, DciParams(lam=0.0, steps=20))
        unshared = sample_dci(t2i, concept, prompt, 5, DciParams(lam=NEG_INF, steps=20, share_guidance=False))
    finally:
        handle.remove()
    assert sum(float(t) > 700 for t in _timesteps(t2i, 20)) == 6  # DCI acts on 6 of 20 trailing steps
    # [x, x, x_aux] (3 rows) vs [x, x] (2 rows): CPU fp32 gives the same per-row results → exact
    assert torch.equal(got[0], got[1]) and np.array_equal(single, dci)
    assert (got[0] - got[2]).abs().max() > 1e-3  # λ = 0: DBIM does change the concept branch
    # [uncond, c, uncond, c_aux] runs 4 rows: the time-embedding Linear (GEMM with M = 4 instead of 2) rounds
    # differently on CPU, so only closeness holds there (measured: max |Δlatent| = 4.5e-6 here, ≈ 4e-4 tiny t2i)
    print(f"share_guidance=False, λ=-inf vs single-branch: max |Δlatent| = {(got[0] - got[3]).abs().max():.2e}")
    assert (got[0] - got[3]).abs().max() < 1e-3


def _timesteps(t2i, steps):
    from training.methods.ico import make_scheduler

    sched = make_scheduler(t2i)
    sched.set_timesteps(steps)
    return sched.timesteps


def test_dci_agg_time_zero_is_single_branch_and_restores_processors(world_concept):
    t2i, concept = world_concept
    before = dict(t2i.unet.attn_processors)
    prompt = "a <new1> <new2> <new3> square"
    single = sample(t2i, concept, [prompt], [1], steps=8)[0]
    dci = sample_dci(t2i, concept, prompt, 1, DciParams(lam=2.0, agg_time=0.0, steps=8))
    assert np.array_equal(single, dci)
    after = t2i.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert aux_seed(1) not in (0, 1, 2)  # the auxiliary generator's seed is not a neighbouring job seed
    with pytest.raises(ValueError, match="concept phrase"):
        sample_dci(t2i, concept, "a photo of a square", 1, DciParams(steps=2))


def test_dci_epsilon_model_runs_both_guidance_layouts(tiny_models):
    """ε-prediction (tiny t2i): DCI changes the image vs single-branch and gives the t2i's image size."""
    t2i = _load(tiny_models / "t2i")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)]
    concept = train_ico(t2i, images, "cat", IcoParams(steps=2, learning_rate=1e-3), seed=0)
    prompt = "a photo of <new1> <new2> <new3> cat"
    single = sample(t2i, concept, [prompt], [2], steps=4)[0]
    a = sample_dci(t2i, concept, prompt, 2, DciParams(lam=1.0, steps=4, agg_time=0.5))
    b = sample_dci(t2i, concept, prompt, 2, DciParams(lam=1.0, steps=4, agg_time=0.5, share_guidance=False))
    assert a.shape == b.shape == single.shape == (64, 64, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, single) and not np.array_equal(a, b)


# ------------------------------------------------------------------------------ the processor inside a real attn2

PROMPT_C = "a photo of <new1> <new2> <new3> cat on the beach"  # [SOS] a photo of V1 V2 V3 cat on the beach [EOS]
PROMPT_A = "a photo of dog on the beach"  # [SOS] a photo of dog on the beach [EOS]


@pytest.fixture(scope="module")
def tiny_t2i(tiny_models):
    return _load(tiny_models / "t2i")


def _random_concept(t2i, seed=0, noun="cat") -> IcoConcept:
    """An ICO concept with 'trained' state: every attn2 to_k/to_v copy perturbed, random V rows."""
    from training.attention.ico import ico_processors

    g = torch.Generator().manual_seed(seed)
    layers = ico_processors(t2i.unet)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    d = t2i.text_encoder.config.hidden_size
    return IcoConcept(("<new1>", "<new2>", "<new3>"), noun, layers, torch.randn(3, d, generator=g),
                      torch.zeros(1, 1, d), torch.zeros(1, 1, d))


def _reference_attn2(attn, kv, hidden, ctx, rc, ra, real_c, real_a, t_c, aux_noun, lam, head_shift=0):
    """attn2 with DBIM, float64, written from SPEC §4.2: per-head P, O; steps 1–5; head merge; to_out.

    ``head_shift`` rolls the heads the masks are computed from (a deliberately wrong head alignment).
    """
    f = torch.float64
    B, N, _ = hidden.shape
    L = ctx.shape[1]
    H = attn.heads

    def linear(x, lin):
        y = x.to(f) @ lin.weight.to(f).T
        return y if lin.bias is None else y + lin.bias.to(f)

    q, k, v = linear(hidden, attn.to_q), linear(ctx, kv.to_k), linear(ctx, kv.to_v)  # (B, ·, H·d)
    d = q.shape[-1] // H
    q = q.reshape(B, N, H, d).permute(0, 2, 1, 3)  # (B, H, N, d): head h = channels h·d … (h+1)·d − 1
    k = k.reshape(B, L, H, d).permute(0, 2, 1, 3)
    v = v.reshape(B, L, H, d).permute(0, 2, 1, 3)
    P = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, H, N, L)
    O = P @ v  # (B, H, N, d)
    Pm = P.roll(head_shift, dims=1)
    idx_c = [j for j in range(L) if real_c[j]]
    idx_a = [j for j in range(L) if real_a[j]]
    e_c = torch.exp(10 * Pm[rc][..., idx_c])  # step 1 (H, N, |real|)
    s_c = e_c / e_c.sum(-1, keepdim=True)
    e_a = torch.exp(10 * Pm[ra][..., idx_a])
    s_a = e_a / e_a.sum(-1, keepdim=True)
    a_c = s_c[..., [idx_c.index(j) for j in t_c]].sum(-1)  # step 2 (H, N)
    a_a = 1 - s_a[..., [idx_a.index(j) for j in aux_noun]].sum(-1)
    m_c = 500 * torch.exp(10 * a_c) / torch.exp(10 * a_c).sum(-1, keepdim=True)  # step 3, over pixels
    m_a = 500 * torch.exp(10 * a_a) / torch.exp(10 * a_a).sum(-1, keepdim=True)
    M_c = torch.sigmoid(m_c - lam * m_a)  # step 4: softmax over two branches
    M_a = 1 - M_c
    O = O.clone()
    O[rc] = M_c[..., None] * O[rc] + M_a[..., None] * O[ra]  # step 5
    merged = O.permute(0, 2, 1, 3).reshape(B, N, H * d)  # heads back to channels
    return linear(merged, attn.to_out[0])  # to_out[1] is dropout (eval: identity)


@pytest.mark.parametrize("rows,lam", [((1, 2), 0.0), ((1, 2), 1.3), ((1, 3), -0.6)])
def test_dbim_processor_matches_float64_attention_with_dbim(tiny_t2i, rows, lam):
    """The processor's full path in a real attn2 (8 heads) with an ICO concept's k/v as provider, against an
    independent float64 attention + SPEC §4.2 steps 1–5 + head merge + to_out. Layouts: [uncond, c, aux] and
    [uncond, c, uncond, aux]. Tolerance 1e-5 absolute on outputs of size ~0.1–1 (measured ≤ ~1e-6)."""
    from training.methods.ico import encode_prompts

    t2i = tiny_t2i
    concept = _random_concept(t2i)
    name = cross_attention_names(t2i.unet)[0]
    attn = attention_module(t2i.unet, name)
    kv = concept.layers[name]
    assert attn.heads > 1 and not attn.training and not attn.residual_connection
    assert attn.rescale_output_factor == 1.0 and not attn.norm_cross and attn.group_norm is None
    assert not torch.equal(kv.to_k.weight, attn.to_k.weight)  # the trained k/v, not the base's

    rc, ra = rows
    texts = ["", PROMPT_C, PROMPT_A] if ra == 2 else ["", PROMPT_C, "", PROMPT_A]
    with torch.no_grad():
        ctx = torch.cat([encode_prompts(t2i, concept, [p], "cpu") for p in texts])  # (B, 77, 32)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(len(texts), 256, attn.to_q.in_features, generator=g)  # (B, N, C): a 16×16 layer
    real_c, real_a = torch.zeros(77, dtype=torch.bool), torch.zeros(77, dtype=torch.bool)
    real_c[1:11] = True  # 10 words between SOS (0) and EOS (11)
    real_a[1:8] = True
    t_c, aux_noun = (4, 5, 6, 7), (4,)
    cfg = DbimConfig((rc,), (ra,), real_c, real_a, concept_tokens=t_c, aux_noun_tokens=aux_noun, lam=lam)
    with torch.no_grad():
        got = DbimAttnProcessor(cfg, kv=kv)(attn, hidden, ctx)
        plain = kv(attn, hidden, ctx)
    want = _reference_attn2(attn, kv, hidden, ctx, rc, ra, real_c.tolist(), real_a.tolist(), t_c, aux_noun, lam)
    err = (got.double() - want).abs().max()
    print(f"rows {rows} λ={lam}: max |processor − float64 reference| = {err:.2e} (concept row "
          f"{(got[rc].double() - want[rc]).abs().max():.2e})")
    assert err < 1e-5
    assert (got[rc] - plain[rc]).abs().max() > 1e-3  # DBIM did act on the concept row …
    others = [r for r in range(len(texts)) if r != rc]
    assert all(torch.equal(got[r], plain[r]) for r in others)  # … and only there
    # the check sees head alignment: masks taken from the neighbouring head are far off
    wrong = _reference_attn2(attn, kv, hidden, ctx, rc, ra, real_c.tolist(), real_a.tolist(), t_c, aux_noun, lam,
                             head_shift=1)
    assert (got.double() - wrong).abs().max() > 100 * 1e-5


# ------------------------------------------------------------------------------ the auxiliary branch


def _ddim(x, eps, a_t, a_prev, eta, z):
    """One DDIM step (Song et al. eq. 12) for an ε-prediction, in float64."""
    x, eps = x.double(), eps.double()
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    out = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    return out if z is None else out + sigma * z.double()


def _record_unet_calls(unet):
    calls = []

    def pre(module, args, kwargs):
        calls.append({"x": args[0].clone(), "t": args[1], "ctx": kwargs["encoder_hidden_states"].clone()})

    def post(module, args, kwargs, output):
        calls[-1]["out"] = output.sample.clone()

    return calls, [unet.register_forward_pre_hook(pre, with_kwargs=True),
                   unet.register_forward_hook(post, with_kwargs=True)]


@pytest.mark.parametrize("share,eta", [(True, 0.0), (True, 1.0), (False, 0.0)])
def test_dci_auxiliary_branch_guidance_and_trajectory(tiny_t2i, share, eta):
    """4 DDIM steps (t = 751, 501, 251, 1), agg_time 0.6: DCI on 751 and 501. From the recorded UNet calls:
    the layout ([x, x, x_aux] / [uncond, c, c_aux], or [x, x, x_aux, x_aux] / [uncond, c, uncond, c_aux]), the
    auxiliary latent's start (its own generator), and the next auxiliary and concept latents against an
    independent DDIM step on guided outputs of a direct UNet call (ICO processors, no DBIM) — with
    share_guidance ε_aux = ε_u(x) + s(ε_aux_raw − ε_u(x)), i.e. the unconditional output of the concept latent."""
    from training.methods.ico import encode_prompts, make_scheduler

    t2i = tiny_t2i
    unet = t2i.unet
    concept = _random_concept(t2i, seed=3)
    prompt, seed, s = "a photo of <new1> <new2> <new3> cat", 4, 6.0
    params = DciParams(lam=0.7, steps=4, agg_time=0.6, eta=eta, guidance=s, share_guidance=share)
    calls, hooks = _record_unet_calls(unet)
    try:
        sample_dci(t2i, concept, prompt, seed, params)
    finally:
        for h in hooks:
            h.remove()
    width = 3 if share else 4
    assert [int(c["t"]) for c in calls] == [751, 501, 251, 1]
    assert [c["x"].shape[0] for c in calls] == [width, width, 2, 2]  # the auxiliary branch is dropped at t ≤ 400

    # layout of the first DCI call
    gen, gen_a = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(aux_seed(seed))
    shape = (4, 32, 32)
    x, x_a = torch.randn(shape, generator=gen)[None], torch.randn(shape, generator=gen_a)[None]  # σ_init = 1
    with torch.no_grad():
        u, c, c_a = (encode_prompts(t2i, concept, [p], "cpu") for p in ("", prompt, "a photo of dog"))
    c0 = calls[0]
    rows_x = [x, x, x_a] if share else [x, x, x_a, x_a]
    rows_ctx = [u, c, c_a] if share else [u, c, u, c_a]
    assert torch.equal(c0["x"], torch.cat(rows_x))
    assert torch.equal(c0["ctx"], torch.cat(rows_ctx))

    # direct UNet call on the same batch with the ICO processors only: rows other than the concept row agree
    with torch.no_grad(), installed_processors(unet, concept.processors_for(unet, "cpu")):
        direct = unet(c0["x"], c0["t"], encoder_hidden_states=c0["ctx"]).sample
    for r in range(width):
        if r == 1:
            assert (direct[1] - c0["out"][1]).abs().max() > 1e-4  # DBIM changes the concept row
        else:
            torch.testing.assert_close(c0["out"][r], direct[r], rtol=0, atol=1e-6)
    eps_u = direct[0]  # unconditional output on the concept latent x
    eps_u_aux = direct[2]  # share_guidance=False: unconditional output on x_aux
    eps_a_raw = direct[width - 1]
    sched = make_scheduler(t2i)
    a_t, a_prev = float(sched.alphas_cumprod[751]), float(sched.alphas_cumprod[501])
    z = z_a = None
    if eta > 0:  # DDIM noise: the next draws of each branch's own generator
        z, z_a = torch.randn((1, *shape), generator=gen), torch.randn((1, *shape), generator=gen_a)
    eps_aux = (eps_u if share else eps_u_aux) + s * (eps_a_raw - (eps_u if share else eps_u_aux))
    want_a = _ddim(x_a, eps_aux, a_t, a_prev, eta, z_a)
    got_a = calls[1]["x"][width - 1:width]
    print(f"share={share} η={eta}: max |x_aux − independent| = {(got_a.double() - want_a).abs().max():.2e}")
    torch.testing.assert_close(got_a.double(), want_a, rtol=0, atol=1e-5)
    assert torch.equal(calls[1]["x"][2], calls[1]["x"][width - 1])  # x_aux in both of its rows
    if share:  # the alternative — the auxiliary branch's own unconditional output — is measurably different
        with torch.no_grad(), installed_processors(unet, concept.processors_for(unet, "cpu")):
            own_u = unet(x_a, c0["t"], encoder_hidden_states=u).sample
        alt = _ddim(x_a, own_u + s * (eps_a_raw - own_u), a_t, a_prev, eta, z_a)
        assert (alt - want_a).abs().max() > 1e-3
    # the concept branch: guidance on the (DBIM) concept output and ε_u(x)
    want_x = _ddim(x, eps_u + s * (c0["out"][1] - eps_u), a_t, a_prev, eta, z)
    torch.testing.assert_close(calls[1]["x"][:2].double(), torch.cat([want_x, want_x]), rtol=0, atol=1e-5)


def test_dci_batch_of_seeds_equals_each_seed_alone(world_concept):
    """Several seeds of one prompt in one two-branch run (3B rows per DCI step): each image equals that seed's
    run alone up to the backend's batch-size rounding of the latents; at λ = −∞ the batch equals ICO's own batched
    sampling of the same seeds."""
    from training.methods.dci import sample_dci_batch

    t2i, concept = world_concept
    prompt = "a <new1> <new2> <new3> square on the left"
    seeds = [3, 4, 5]
    got, handle = _capture_latents(t2i)
    try:
        batch = sample_dci_batch(t2i, concept, prompt, seeds, DciParams(lam=0.5, steps=12))
        alone = [sample_dci(t2i, concept, prompt, s, DciParams(lam=0.5, steps=12)) for s in seeds]
        limit = sample_dci_batch(t2i, concept, prompt, seeds, DciParams(lam=NEG_INF, steps=12))
        plain = sample(t2i, concept, [prompt] * 3, seeds, steps=12)
    finally:
        handle.remove()
    lat_batch, lat_alone = got[0], torch.cat(got[1:4])
    print(f"DCI batch of 3 vs alone: max |Δlatent| = {(lat_batch - lat_alone).abs().max():.2e}")
    assert (lat_batch - lat_alone).abs().max() < 1e-3
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(batch, alone))
    assert not np.array_equal(batch[0], batch[1])  # the rows are different seeds
    assert (got[4] - got[5]).abs().max() < 1e-3 and len(limit) == len(plain) == 3
    assert sample_dci_batch(t2i, concept, prompt, [], DciParams(steps=2)) == []
