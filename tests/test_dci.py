"""DCI (SPEC §4.2): DBIM against an independent re-implementation, prompts/token sets, λ = −∞ ≡ ICO sampling."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.attention.dbim import DbimAttnProcessor, DbimConfig, dbim_aggregate
from training.attention.ico import IcoAttnProcessor, attention_module, cross_attention_names
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
