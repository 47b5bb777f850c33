"""Metrics (SPEC §3, D5): each value against an independent computation, plus the invariants it must keep."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training.embedders import ClipEmbedder, DinoEmbedder
from training.metrics import (
    clip_i,
    clip_t,
    dino_score,
    gaussian_w2,
    latent_fisher_divergence,
    mean_pairwise_cosine,
    pool_latents,
    remove_identifier,
    v_to_eps,
)

IDENT = ["<new1>", "<new2>", "<new3>"]


# ------------------------------------------------------------------------------------ remove_identifier


@pytest.mark.parametrize("prompt, identifier, expected", [
    ("a photo of <new1> <new2> <new3> dog", IDENT, "a photo of dog"),
    ("<new1> <new2> <new3> dog on the beach", IDENT, "dog on the beach"),
    ("a  <new1>   dog , with <new2>.", IDENT, "a dog, with."),
    ("a <new1><new2> dog", IDENT, "a dog"),  # adjacent tokens with no space
    ("a sks dog asks for sks", ["sks"], "a dog asks for"),  # whole tokens only: "asks" keeps its "sks"
    ("a photo of  sks   dog", ["sks dog"], "a photo of"),  # a phrase entry, any spacing
    ("a  photo   of a dog ", [], "a photo of a dog"),
    ("A <NEW1> dog", IDENT, "A <NEW1> dog"),  # case-sensitive
])
def test_remove_identifier(prompt, identifier, expected):
    assert remove_identifier(prompt, identifier) == expected


def test_remove_identifier_rejects_a_bare_string_and_blank_entries():
    with pytest.raises(ValueError, match="identifier"):
        remove_identifier("a <new1> dog", "<new1>")
    with pytest.raises(ValueError, match="empty entry"):
        remove_identifier("a <new1> dog", ["<new1>", " "])


# ------------------------------------------------------------------------------- cosine-based scores


def test_mean_pairwise_cosine_equals_the_full_matrix_mean():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    an, bn = a.double().numpy(), b.double().numpy()
    an /= np.linalg.norm(an, axis=1, keepdims=True)
    bn /= np.linalg.norm(bn, axis=1, keepdims=True)
    expected = np.mean([[an[i] @ bn[j] for j in range(3)] for i in range(5)])
    assert mean_pairwise_cosine(a, b) == pytest.approx(expected, abs=1e-12)
    assert mean_pairwise_cosine(3.0 * a.double(), 0.5 * b.double()) == pytest.approx(expected, abs=1e-12)  # scale-free
    assert mean_pairwise_cosine(a[:1], a[:1]) == pytest.approx(1.0, abs=1e-12)
    a[2] = 0.0
    assert math.isnan(mean_pairwise_cosine(a, b))  # a zero embedding has no direction: NaN, not 0
    with pytest.raises(ValueError, match="widths differ"):
        mean_pairwise_cosine(a, b[:, :6])
    with pytest.raises(ValueError, match="N >= 1"):
        mean_pairwise_cosine(a[:0], b)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(5):
        base = rng.integers(0, 256, size=(1, 1, 3)).astype(np.float64)
        img = np.clip(base + rng.normal(0, 60, size=(48, 40, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    return out


@pytest.fixture(scope="module")
def clip(tiny_models):
    return ClipEmbedder(str(tiny_models / "clip_filter"))


@pytest.fixture(scope="module")
def dino(tiny_models):
    return DinoEmbedder(str(tiny_models / "dino_filter"))


def _one_by_one(embed, items) -> np.ndarray:
    """Independent embeddings: one item per forward pass, normalised here in float64."""
    rows = np.stack([embed([x])[0].double().numpy() for x in items])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_clip_t_drops_the_identifier_then_averages_paired_cosines(clip, images):
    prompts = ["a photo of <new1> <new2> <new3> cat", "a <new1> <new2> <new3> dog on a car",
               "a photo of a <new1> <new2> <new3> person", "<new1> <new2> <new3> car", "a cat and a dog"]
    stripped = ["a photo of cat", "a dog on a car", "a photo of a person", "car", "a cat and a dog"]
    img = _one_by_one(clip.embed_images, images)
    txt = _one_by_one(clip.embed_texts, stripped)
    expected = float(np.mean(np.sum(img * txt, axis=1)))
    got = clip_t(clip, images, prompts, identifier=IDENT)
    assert got == pytest.approx(expected, abs=1e-5)
    assert clip_t(clip, images, prompts, identifier=IDENT, batch_size=2) == pytest.approx(expected, abs=1e-5)
    raw = float(np.mean(np.sum(img * _one_by_one(clip.embed_texts, prompts), axis=1)))
    assert clip_t(clip, images, prompts) == pytest.approx(raw, abs=1e-5)
    assert abs(raw - expected) > 1e-3  # the identifier tokens do move the text embedding
    with pytest.raises(ValueError, match="equal counts"):
        clip_t(clip, images, prompts[:2], identifier=IDENT)


def test_clip_i_and_dino_are_means_over_all_pairs(clip, dino, images):
    gen, ref = images[:3], images[3:]
    for fn, embedder in ((clip_i, clip), (dino_score, dino)):
        g, r = _one_by_one(embedder.embed_images, gen), _one_by_one(embedder.embed_images, ref)
        expected = np.mean([[g[i] @ r[j] for j in range(len(ref))] for i in range(len(gen))])
        assert fn(embedder, gen, ref) == pytest.approx(expected, abs=1e-5)
        assert fn(embedder, gen, ref, batch_size=1) == pytest.approx(expected, abs=1e-5)
        assert fn(embedder, gen[:1], gen[:1]) == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(ValueError, match=">= 1 each"):
            fn(embedder, gen, [])


# ------------------------------------------------------------------------------------------------- W2


def _sqrtm_db(m: np.ndarray, iters: int = 60) -> np.ndarray:
    """Denman–Beavers iteration for the principal square root (no eigendecomposition), numpy float64."""
    y, z = m.copy(), np.eye(len(m))
    for _ in range(iters):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    return y


def _w2_reference(x1: np.ndarray, x2: np.ndarray, eps: float) -> tuple[float, float]:
    """W2 of Gaussians fitted with numpy, by two routes: DB sqrtm of the formula as written, and
    Tr((Σ₁^½Σ₂Σ₁^½)^½) = Σ √λ(Σ₁Σ₂) (eigenvalues of the non-symmetric product)."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    c1 = np.cov(x1, rowvar=False) + eps * np.eye(x1.shape[1])
    c2 = np.cov(x2, rowvar=False) + eps * np.eye(x1.shape[1])
    s1 = _sqrtm_db(c1)
    tr_a = np.trace(_sqrtm_db(s1 @ c2 @ s1))
    tr_b = np.sqrt(np.linalg.eigvals(c1 @ c2).real.clip(min=0)).sum()
    base = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
    return math.sqrt(base - 2 * tr_a), math.sqrt(base - 2 * tr_b)


def test_w2_equals_the_closed_form_on_random_gaussians():
    rng = np.random.default_rng(1)
    d = 6
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    x1 = rng.normal(size=(400, d)) @ a1 + rng.normal(size=d)
    x2 = rng.normal(size=(300, d)) @ (0.5 * a2) + rng.normal(size=d)
    ref_a, ref_b = _w2_reference(x1, x2, 1e-6)
    assert ref_a == pytest.approx(ref_b, rel=1e-9)  # the two reference routes agree
    got = gaussian_w2(torch.from_numpy(x1), torch.from_numpy(x2), pool=None)
    assert got == pytest.approx(ref_a, rel=1e-9)
    assert gaussian_w2(torch.from_numpy(x2), torch.from_numpy(x1), pool=None) == pytest.approx(got, rel=1e-9)


def test_w2_equals_the_diagonal_closed_form():
    """Samples built so the sample covariance is exactly diag(s²): W2² = ‖Δμ‖² + Σ (√(s₁²+ε) − √(s₂²+ε))²."""
    rng = np.random.default_rng(2)
    d, n, eps = 5, 50, 1e-6

    def with_moments(mu, std):
        z = rng.normal(size=(n, d))
        z -= z.mean(0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
        return z * std + mu

    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    x1, x2 = with_moments(mu1, s1), with_moments(mu2, s2)
    expected = math.sqrt(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1**2 + eps) - np.sqrt(s2**2 + eps)) ** 2))
    assert gaussian_w2(torch.from_numpy(x1), torch.from_numpy(x2), pool=None, eps=eps) == pytest.approx(
        expected, rel=1e-9)
    # a large ridge dominates both covariances: the covariance term shrinks toward 0
    big = 1e4
    expected_big = math.sqrt(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1**2 + big) - np.sqrt(s2**2 + big)) ** 2))
    assert gaussian_w2(torch.from_numpy(x1), torch.from_numpy(x2), pool=None, eps=big) == pytest.approx(
        expected_big, rel=1e-9)


@pytest.mark.parametrize("n", [10, 300])  # fewer and more samples than the 256 pooled dims
def test_w2_of_a_set_with_itself_is_zero(n):
    x = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(n))
    assert gaussian_w2(x, x) == pytest.approx(0.0, abs=1e-6)
    assert gaussian_w2(x, x.clone()) == pytest.approx(0.0, abs=1e-6)


def test_w2_grows_with_a_mean_shift_as_the_closed_form_says():
    """Equal covariances: W2 = ‖Δμ‖. A constant c added to every latent element moves all 256 pooled means by c."""
    x = torch.randn(40, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    values = [gaussian_w2(x, x + c) for c in (0.0, 0.1, 0.5, 2.0)]
    for c, w in zip((0.0, 0.1, 0.5, 2.0), values):
        assert w == pytest.approx(16.0 * c, abs=1e-6)  # √256 · c
    assert values == sorted(values)
    u = torch.zeros(40, 4, 16, 16)
    u[:, 1] = 0.3  # one channel shifted: 64 pooled dims move by 0.3
    assert gaussian_w2(x, x + u) == pytest.approx(math.sqrt(64 * 0.3**2), abs=1e-6)


def test_w2_of_a_scaled_set_equals_the_commuting_closed_form():
    """x₂ = 2·x₁: μ₂ = 2μ₁ and Σ₂ + εI commutes with Σ₁ + εI (Σ₂ = 4Σ₁), so
    W2² = ‖μ₁‖² + Σᵢ (√(λᵢ + ε) − √(4λᵢ + ε))² over the eigenvalues λᵢ of Σ₁."""
    x1 = torch.randn(300, 4, 8, 8, generator=torch.Generator().manual_seed(4)) + 0.2
    rows = x1.double().reshape(300, -1).numpy()  # pool (4, 8, 8) of a 4×8×8 latent is the identity
    lam = np.linalg.eigvalsh(np.cov(rows, rowvar=False)).clip(min=0)
    expected = math.sqrt(np.sum(rows.mean(0) ** 2) + np.sum((np.sqrt(lam + 1e-6) - np.sqrt(4 * lam + 1e-6)) ** 2))
    assert gaussian_w2(x1, 2 * x1) == pytest.approx(expected, rel=1e-8)
    assert gaussian_w2(x1, 2 * x1) > gaussian_w2(x1, 1.5 * x1) > gaussian_w2(x1, 1.1 * x1) > 0


def test_pooling_shape_and_values():
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    rows = pool_latents(x, (4, 8, 8))
    assert rows.shape == (3, 256) and rows.dtype == torch.float64
    blocks = x.double().reshape(3, 4, 8, 2, 8, 2).mean(dim=(3, 5)).reshape(3, -1)  # 2×2 spatial blocks
    torch.testing.assert_close(rows, blocks, atol=1e-12, rtol=0)
    rows2 = pool_latents(x, (2, 4, 4))  # channels pooled in pairs too
    expected2 = x.double().reshape(3, 2, 2, 4, 4, 4, 4).mean(dim=(2, 4, 6)).reshape(3, -1)
    torch.testing.assert_close(rows2, expected2, atol=1e-12, rtol=0)
    assert pool_latents(x, None).shape == (3, 4 * 16 * 16)
    with pytest.raises(ValueError, match="pool"):
        pool_latents(x, (4, 32, 32))  # larger than the latent
    with pytest.raises(ValueError, match="pool"):
        gaussian_w2(x.reshape(3, -1), x.reshape(3, -1))  # 2-D input with the default pool
    with pytest.raises(ValueError, match=">= 2"):
        gaussian_w2(x[:1], x)
    with pytest.raises(ValueError, match="shapes differ"):
        gaussian_w2(x, x[:, :2])


# ------------------------------------------------------------------------------------------------ LFD


@pytest.fixture(scope="module")
def t2i(tiny_models):
    from training.models.kit import load_role

    return load_role("t2i", str(tiny_models / "t2i"), dtype="float32", device="cpu").components


@pytest.fixture(scope="module")
def lfd_setup(t2i):
    """Two different UNets (a perturbed copy; the loaded one is left alone), data latents, prompt conditions."""
    unet_a = t2i.unet
    unet_b = copy.deepcopy(unet_a)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in unet_b.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    latents = torch.randn(3, 4, 32, 32, generator=g)  # (N, C, H, W)
    ids = t2i.tokenizer(["a photo of cat", "a photo of dog", "a car"], padding="max_length",
                        max_length=t2i.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = t2i.text_encoder(ids)[0]  # (3, L, D)
    conditions = list(hidden)

    def model(unet):
        return lambda z, t, c: unet(z, t, encoder_hidden_states=c).sample

    return model(unet_a), model(unet_b), latents, conditions


def _independent_lfd(f_a, f_b, latents, conditions, alphas, n, seed, v_pred):
    """One sample at a time, q(z_t|z₀) written out; draws in the order the docstring states."""
    g = torch.Generator().manual_seed(seed)
    zi = torch.randint(len(latents), (n,), generator=g)
    ts = torch.randint(len(alphas), (n,), generator=g)
    ci = torch.randint(len(conditions), (n,), generator=g)
    noise = torch.randn((n, *latents.shape[1:]), generator=g)
    vals = []
    with torch.no_grad():
        for k in range(n):
            a = float(alphas[ts[k]])
            z_t = (math.sqrt(a) * latents[zi[k]] + math.sqrt(1 - a) * noise[k]).unsqueeze(0).float()
            t = ts[k:k + 1]
            c = conditions[int(ci[k])].unsqueeze(0)
            d = (f_a(z_t, t, c) - f_b(z_t, t, c)).double()
            vals.append(0.5 * (a if v_pred else 1.0) * d.square().mean().item())  # v: ε_a−ε_b = √ᾱ (v_a−v_b)
    return float(np.mean(vals))


def test_lfd_of_a_model_with_itself_is_exactly_zero(t2i, lfd_setup):
    f_a, _, latents, conditions = lfd_setup
    out = latent_fisher_divergence(f_a, f_a, latents, conditions, t2i.scheduler, 6, torch.Generator().manual_seed(0))
    assert out["lfd"] == 0.0 and out["lfd_sum"] == 0.0 and out["num_samples"] == 6


def test_lfd_of_two_models_equals_an_independent_computation(t2i, lfd_setup):
    f_a, f_b, latents, conditions = lfd_setup
    sched = t2i.scheduler
    out = latent_fisher_divergence(f_a, f_b, latents, conditions, sched, 6, torch.Generator().manual_seed(11),
                                   batch_size=4)
    expected = _independent_lfd(f_a, f_b, latents, conditions, sched.alphas_cumprod, 6, 11, v_pred=False)
    assert out["lfd"] > 0
    assert out["lfd"] == pytest.approx(expected, rel=1e-4)
    assert out["lfd_sum"] == pytest.approx(out["lfd"] * 4 * 32 * 32, rel=1e-12)
    assert out["lfd_se"] > 0 and out["num_samples"] == 6
    again = latent_fisher_divergence(f_a, f_b, latents, conditions, sched, 6, torch.Generator().manual_seed(11),
                                     batch_size=6)
    assert again["lfd"] == pytest.approx(out["lfd"], rel=1e-5)  # the draws do not depend on batch_size
    other = latent_fisher_divergence(f_a, f_b, latents, conditions, sched, 6, torch.Generator().manual_seed(12))
    assert other["lfd"] != out["lfd"]


def test_v_to_eps_recovers_the_noise():
    g = torch.Generator().manual_seed(8)
    z0, eps = torch.randn(3, 4, 5, 5, generator=g).double(), torch.randn(3, 4, 5, 5, generator=g).double()
    a = torch.tensor([0.9, 0.3, 0.0], dtype=torch.float64)  # ᾱ = 0: zero-terminal SNR's last step
    ar = a.view(-1, 1, 1, 1)
    z_t = ar.sqrt() * z0 + (1 - ar).sqrt() * eps
    v = ar.sqrt() * eps - (1 - ar).sqrt() * z0
    torch.testing.assert_close(v_to_eps(v, z_t, a), eps, atol=1e-12, rtol=0)
    torch.testing.assert_close(v_to_eps(v[:1], z_t[:1], 0.9), eps[:1], atol=1e-12, rtol=0)


def test_lfd_converts_v_predictions_to_noise(t2i, lfd_setup):
    """A v-prediction scheduler: the same two networks read as v-models give ½·E[ᾱ_t ‖v_a − v_b‖²]."""
    from diffusers import DDIMScheduler

    f_a, f_b, latents, conditions = lfd_setup
    sched_v = DDIMScheduler.from_config(t2i.scheduler.config, prediction_type="v_prediction")
    out = latent_fisher_divergence(f_a, f_b, latents, conditions, sched_v, 5, torch.Generator().manual_seed(13))
    expected = _independent_lfd(f_a, f_b, latents, conditions, sched_v.alphas_cumprod, 5, 13, v_pred=True)
    as_eps = _independent_lfd(f_a, f_b, latents, conditions, sched_v.alphas_cumprod, 5, 13, v_pred=False)
    assert out["lfd"] == pytest.approx(expected, rel=1e-4)
    assert abs(out["lfd"] - as_eps) > 1e-3 * as_eps  # the conversion changed the value
    with pytest.raises(ValueError, match="scheduler config"):
        latent_fisher_divergence(f_a, f_b, latents, conditions, sched_v, 2, torch.Generator(),
                                 prediction_type="epsilon")
    with pytest.raises(ValueError, match="allowed"):
        latent_fisher_divergence(f_a, f_b, latents, conditions, sched_v, 2, torch.Generator(),
                                 prediction_type="sample")


def test_lfd_leaves_the_base_model_untouched(t2i, lfd_setup):
    f_a, f_b, latents, conditions = lfd_setup
    before = {k: v.clone() for k, v in t2i.unet.state_dict().items()}
    latent_fisher_divergence(f_a, f_b, latents, conditions, t2i.scheduler, 2, torch.Generator().manual_seed(0))
    after = t2i.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_w2_at_the_default_sample_count_separates_classes_on_the_world():
    """At `concepts.eval.w2_samples` (the papers' 1,000) W2 between two independent draws of one distribution (the
    world's renders of one class, its VAE's latents) is small next to W2 between two classes; at 32 samples the
    same-distribution W2 is several times larger (estimator bias: why every W2 is reported with its baseline)."""
    import numpy as np

    from pipeline.concepts import W2_POOL
    from pipeline.concepts_config import ConceptEvalConfig
    from training.models.kit import load_role
    from training.world import domain as D

    n = ConceptEvalConfig().w2_samples
    from tests.trainutil import WORLD

    vae = load_role("t2i", str(WORLD / "t2i"), dtype="float32", device="cpu").components.vae
    rng = np.random.default_rng(0)
    instances, contexts = D.all_instances(), D.all_contexts()

    def draw(cls: str, seed0: int) -> torch.Tensor:
        of = [i for i in instances if i.cls == cls]
        imgs = [D.render(D.Scene.single(of[rng.integers(len(of))], contexts[rng.integers(len(contexts))]),
                         seed0 + k)[0] for k in range(n)]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            return torch.cat([vae.encode(x[i:i + 250]).latent_dist.mean for i in range(0, n, 250)]) * \
                vae.config.scaling_factor

    circles, circles2, stars = draw("circle", 0), draw("circle", 10_000), draw("star", 20_000)
    same, across = gaussian_w2(circles, circles2, pool=W2_POOL), gaussian_w2(circles, stars, pool=W2_POOL)
    small = gaussian_w2(circles[:32], circles2[:32], pool=W2_POOL)
    print(f"W2 n={n}: same class {same:.3f}, circle vs star {across:.3f}; n=32 same class {small:.3f}")
    assert same < 0.5 * across, (same, across)
    assert small > 2 * same, (small, same)
