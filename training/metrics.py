"""Evaluation metrics of a customized text-to-image model (SPEC §3, D5): CLIP-T, CLIP-I, DINO, W2 and LFD.

Usage::

    from training.embedders import ClipEmbedder, DinoEmbedder
    from training.metrics import clip_i, clip_t, dino_score, gaussian_w2, latent_fisher_divergence

    clip, dino = ClipEmbedder(clip_dir), DinoEmbedder(dino_dir)
    scores = {"clip_t": clip_t(clip, images, prompts, identifier=["<new1>", "<new2>", "<new3>"]),
              "clip_i": clip_i(clip, images, references), "dino": dino_score(dino, images, references)}
    w2 = gaussian_w2(base_latents, custom_latents)            # (n, 4, H, W) each -> float
    lfd = latent_fisher_divergence(eps_base, eps_custom, data_latents, conditions, scheduler,
                                   num_samples=32, generator=torch.Generator().manual_seed(0))

The core functions are pure functions over tensors (:func:`mean_pairwise_cosine`, :func:`gaussian_w2`,
:func:`latent_fisher_divergence`); :func:`clip_t`, :func:`clip_i` and :func:`dino_score` are thin helpers that
take an embedder — anything with ``embed_images`` (and ``embed_texts`` for CLIP-T) returning ``(N, D)`` rows,
e.g. :class:`training.embedders.ClipEmbedder`, :class:`training.embedders.DinoEmbedder`, or a face-recognition
embedder for the ID score. The build's scorers (:mod:`filtering.scorers`) use the same embedders.

Statistics are computed in float64. A NaN embedding (an image whose embedding has zero norm) makes the
score NaN rather than being dropped silently.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "clip_i",
    "clip_t",
    "dino_score",
    "gaussian_w2",
    "latent_fisher_divergence",
    "mean_pairwise_cosine",
    "pool_latents",
    "remove_identifier",
    "v_to_eps",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")


# ------------------------------------------------------------------------------------------ CLIP / DINO


def remove_identifier(prompt: str, identifier: Sequence[str]) -> str:
    """Drop the concept identifier tokens from a prompt and collapse the spaces left behind.

    Usage: ``remove_identifier("a photo of <new1> <new2> dog", ["<new1>", "<new2>"])  # "a photo of dog"``

    Each identifier entry is removed wherever it occurs as a whole token: not preceded or followed by a word
    character (``sks`` is removed from ``"a sks dog"`` but not from ``"asks"``; ``"<new1>,"`` loses
    ``<new1>``). Matching is case-sensitive. Runs of whitespace become one space, spaces before ``,.;:!?``
    are dropped and the ends are stripped.

    Args:
        prompt: The prompt as given to the customized model.
        identifier: The concept tokens, e.g. ``["<new1>", "<new2>", "<new3>"]`` (an entry may be a phrase);
            empty: the prompt is only whitespace-normalised.

    Returns:
        The prompt without the identifier.

    Raises:
        ValueError: If ``identifier`` is a bare string (ambiguous: pass a list of tokens) or has an empty entry.
    """
    if isinstance(identifier, str):
        raise ValueError(f"identifier: got the string {identifier!r}; pass a sequence of tokens, "
                         f"e.g. {identifier.split()!r}")
    tokens = [str(t) for t in identifier]
    if any(not t.strip() for t in tokens):
        raise ValueError(f"identifier: {tokens!r} has an empty entry; allowed: non-blank tokens")
    out = str(prompt)
    for tok in sorted(set(tokens), key=len, reverse=True):  # longest first: a phrase before its parts
        words = r"\s+".join(re.escape(w) for w in tok.split())  # a phrase matches across any spacing
        out = re.sub(rf"(?<!\w){words}(?!\w)", " ", out)
    out = " ".join(out.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", out)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all ``N × M`` pairs of rows of ``a`` and ``b`` (the core of CLIP-I and DINO).

    Usage: ``score = mean_pairwise_cosine(emb_generated, emb_reference)``  # (N, D), (M, D) -> float

    Rows are normalised here (in float64), so unit rows and raw features give the same value; a row of zero
    norm or with a NaN makes the result NaN.

    Args:
        a: ``(N, D)`` embeddings.
        b: ``(M, D)`` embeddings.

    Returns:
        ``mean_{i,j} cos(a_i, b_j)``.

    Raises:
        ValueError: If an input is not 2-D, is empty, or the widths differ.
    """
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"mean_pairwise_cosine: {name} has shape {tuple(x.shape)}; allowed: (N, D), N >= 1")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"mean_pairwise_cosine: widths differ, a {tuple(a.shape)} vs b {tuple(b.shape)}")
    a64 = _unit64(a)  # (N, D)
    b64 = _unit64(b)  # (M, D)
    # mean_ij <a_i, b_j> = <mean_i a_i, mean_j b_j>: no N×M matrix needed
    return float(a64.mean(dim=0) @ b64.mean(dim=0))


def clip_t(clip: Any, images: Sequence[Any], prompts: Sequence[str], identifier: Sequence[str] = (),
           batch_size: int = 64) -> float:
    """CLIP-T: mean cosine of each generated image's CLIP embedding with its prompt's, identifier removed.

    Usage: ``score = clip_t(clip, images, prompts, identifier=["<new1>", "<new2>", "<new3>"])``

    Args:
        clip: An embedder with ``embed_images`` and ``embed_texts`` (:class:`training.embedders.ClipEmbedder`).
        images: N generated PIL images.
        prompts: N prompts, ``prompts[i]`` the one ``images[i]`` was generated from.
        identifier: The concept tokens to drop (:func:`remove_identifier`); empty: prompts used as given.
        batch_size: Images (texts) per embedder forward pass.

    Returns:
        ``mean_i cos(E_img(images[i]), E_txt(remove_identifier(prompts[i])))``.

    Raises:
        ValueError: If there are no images, the counts differ, or ``batch_size`` < 1.
    """
    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"clip_t: {len(images)} images and {len(prompts)} prompts; allowed: equal counts >= 1")
    texts = [remove_identifier(p, identifier) for p in prompts]
    img = _unit64(_embed(clip.embed_images, images, batch_size))  # (N, D)
    txt = _unit64(_embed(clip.embed_texts, texts, batch_size))  # (N, D)
    return float((img * txt).sum(dim=-1).mean())


def clip_i(clip: Any, generated: Sequence[Any], references: Sequence[Any], batch_size: int = 64) -> float:
    """CLIP-I: mean pairwise cosine of CLIP image embeddings over all (generated, reference) pairs.

    Usage: ``score = clip_i(clip, generated_images, reference_images)``

    Args:
        clip: An embedder with ``embed_images`` (:class:`training.embedders.ClipEmbedder`).
        generated: N generated PIL images.
        references: M reference PIL images of the concept.
        batch_size: Images per embedder forward pass.

    Returns:
        :func:`mean_pairwise_cosine` of the two sets of embeddings.
    """
    return _image_set_score("clip_i", clip, generated, references, batch_size)


def dino_score(dino: Any, generated: Sequence[Any], references: Sequence[Any], batch_size: int = 64) -> float:
    """DINO: mean pairwise cosine of DINO CLS embeddings over all (generated, reference) pairs.

    Usage: ``score = dino_score(dino, generated_images, reference_images)``

    Args:
        dino: An embedder with ``embed_images`` (:class:`training.embedders.DinoEmbedder`, DINO ViT-S/16).
        generated: N generated PIL images.
        references: M reference PIL images of the concept.
        batch_size: Images per embedder forward pass.

    Returns:
        :func:`mean_pairwise_cosine` of the two sets of embeddings.
    """
    return _image_set_score("dino", dino, generated, references, batch_size)


# ------------------------------------------------------------------------------------------------- W2


def pool_latents(x: torch.Tensor, pool: tuple[int, int, int] | None) -> torch.Tensor:
    """Flatten latents to ``(n, d)`` float64 CPU rows, average-pooled (on the latents' device) to ``pool`` first.

    Usage: ``rows = pool_latents(latents, (4, 8, 8))``  # (n, 4, 64, 64) -> (n, 256)

    Pooling is adaptive average pooling over (channels, height, width) together, so ``pool = (4, 8, 8)``
    of SD latents ``(n, 4, 64, 64)`` averages 8×8 spatial blocks per channel.

    Args:
        x: ``(n, C, H, W)`` latents, or ``(n, d)`` features (then ``pool`` must be None).
        pool: ``(C', H', W')`` with each entry ≤ the latent's, or None for no pooling.

    Returns:
        ``(n, C'·H'·W')`` (or ``(n, C·H·W)``, ``(n, d)``) float64 on the CPU (the statistics are small).

    Raises:
        ValueError: On another rank, a pool for 2-D input, or a pool that is not 3 positive ints ≤ the shape.
    """
    if x.ndim == 2:
        if pool is not None:
            raise ValueError(f"pool: {pool} given for 2-D input {tuple(x.shape)}; allowed: None (already features)")
        return x.detach().double().cpu()
    if x.ndim != 4:
        raise ValueError(f"latents: shape {tuple(x.shape)}; allowed: (n, C, H, W) or (n, d)")
    if pool is not None:
        shape = tuple(x.shape[1:])
        if len(pool) != 3 or any(int(p) < 1 or int(p) > s for p, s in zip(pool, shape)):
            raise ValueError(f"pool: {tuple(pool)}; allowed: 3 ints in [1, (C, H, W) = {shape}]")
        # (n, 1, C, H, W) -> (n, 1, C', H', W'): a 3-D pool over channels and space
        x = F.adaptive_avg_pool3d(x.detach().double().unsqueeze(1), tuple(int(p) for p in pool))
    return x.detach().double().reshape(x.shape[0], -1).cpu()


def gaussian_w2(x1: torch.Tensor, x2: torch.Tensor, pool: tuple[int, int, int] | None = (4, 8, 8),
                eps: float = 1e-6) -> float:
    """Wasserstein-2 distance between Gaussians fitted to two sets of latents (SPEC §3, seed 002 Def. 3.2).

    Usage: ``w2 = gaussian_w2(latents_base, latents_custom)``  # (n1, C, H, W), (n2, C, H, W) -> float

    ``W2² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)`` in float64, with

    * rows pooled by :func:`pool_latents` (default 4×8×8 = 256 dims);
    * ``Σ`` the unbiased sample covariance (``n − 1``) plus ``eps·I``: with fewer samples than dims the
      sample covariance is rank-deficient;
    * ``Σ₁^½``, ``Σ₂^½`` symmetric square roots from the symmetric eigendecomposition (``torch.linalg.eigh``);
      rounding can give these PSD matrices eigenvalues slightly below 0, which are clamped to 0 before the
      square root;
    * ``Tr((Σ₁^½ Σ₂ Σ₁^½)^½)`` as the nuclear norm (sum of singular values) of ``Σ₁^½ Σ₂^½``: the same value,
      since ``(Σ₁^½ Σ₂^½)(Σ₁^½ Σ₂^½)ᵀ = Σ₁^½ Σ₂ Σ₁^½``, without squaring the spectrum — the eigenvalues of
      ``Σ₁^½ Σ₂ Σ₁^½`` near ``eps²`` drown in rounding when there are fewer samples than dims (W2(x, x) came
      out ~4e-3 that way on 10 samples of 256 dims, ~1e-7 this way);
    * ``W2²`` clamped to 0 before the square root (at identical inputs it is 0 up to rounding, either sign).

    Args:
        x1: ``(n1, C, H, W)`` latents of samples from the original model (or ``(n1, d)`` with ``pool=None``).
        x2: ``(n2, C, H, W)`` latents of samples from the customized model, same prompts.
        pool: ``(C', H', W')`` pooled size, or None to use every element.
        eps: Ridge added to both covariances' diagonals, ≥ 0.

    Returns:
        W2, not squared.

    Raises:
        ValueError: If a set has fewer than 2 samples, the shapes differ, ``eps`` < 0, or the pool is invalid.
    """
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps: {eps}; allowed: a finite value >= 0")
    if tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise ValueError(f"gaussian_w2: sample shapes differ, {tuple(x1.shape)} vs {tuple(x2.shape)}")
    r1, r2 = pool_latents(x1, pool), pool_latents(x2, pool)  # (n1, d), (n2, d) float64
    for name, r in (("x1", r1), ("x2", r2)):
        if r.shape[0] < 2:
            raise ValueError(f"gaussian_w2: {name} has {r.shape[0]} samples; allowed: >= 2 (a covariance)")
    mu1, cov1 = _gaussian(r1, eps)
    mu2, cov2 = _gaussian(r2, eps)
    # Tr((Σ₁^½ Σ₂ Σ₁^½)^½) = ‖Σ₁^½ Σ₂^½‖_*  (d, d) @ (d, d)
    trace_sqrt = torch.linalg.svdvals(_psd_sqrt(cov1) @ _psd_sqrt(cov2)).sum()
    w2_sq = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt
    return float(w2_sq.clamp_min(0).sqrt())


# ------------------------------------------------------------------------------------------------ LFD


def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """A v-prediction as a noise prediction: ``ε = √ᾱ·v + √(1−ᾱ)·z_t``.

    Usage: ``eps = v_to_eps(v, z_t, alpha_bar)``  # (b, C, H, W), (b, C, H, W), (b,) -> (b, C, H, W)

    With ``z_t = √ᾱ·z₀ + √(1−ᾱ)·ε`` and ``v = √ᾱ·ε − √(1−ᾱ)·z₀`` this recovers ε exactly.

    Args:
        v: ``(b, ...)`` v-predictions.
        z_t: ``(b, ...)`` noisy latents they were predicted from.
        alpha_bar: ``(b,)`` cumulative alphas ᾱ_t per row, or one float.

    Returns:
        ``(b, ...)`` ε in the dtype of ``v``.
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float64, device=v.device)
    a = a.reshape(-1, *([1] * (v.ndim - 1))) if a.ndim == 1 else a  # (b, 1, ..., 1)
    return (a.sqrt() * v.double() + (1 - a).sqrt() * z_t.double()).to(v.dtype)


@torch.no_grad()
def latent_fisher_divergence(eps_a: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                             eps_b: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                             latents: torch.Tensor, conditions: Sequence[Any], scheduler: Any, num_samples: int,
                             generator: torch.Generator, prediction_type: str | None = None,
                             batch_size: int = 16) -> dict[str, float]:
    """Latent Fisher divergence ``½·E_{z,t,c̄} ‖ε_a(z_t,t,c̄) − ε_b(z_t,t,c̄)‖²`` (SPEC §3, seed 002 Def. 3.1).

    Usage::

        lfd = latent_fisher_divergence(
            lambda z, t, c: base_unet(z, t, encoder_hidden_states=c).sample,
            lambda z, t, c: custom_unet(z, t, encoder_hidden_states=c).sample,
            data_latents, hidden_states_of_plain_prompts, scheduler, 32, torch.Generator().manual_seed(0))
        lfd["lfd"]  # mean over latent elements

    Monte Carlo over ``num_samples`` draws, all taken from ``generator`` up front, in this order (so a result
    does not depend on ``batch_size`` and can be reproduced): data indices
    ``torch.randint(len(latents), (n,))``, timesteps ``torch.randint(T, (n,))`` (uniform over the
    scheduler's ``num_train_timesteps`` T), condition indices ``torch.randint(len(conditions), (n,))``,
    noise ``torch.randn((n, *latents.shape[1:]))``. Then ``z_t = scheduler.add_noise(z₀, noise, t)`` and both
    callables see the same ``(z_t, t, c̄)``. Model outputs are compared as ε: a ``v_prediction`` model's
    outputs are converted by :func:`v_to_eps` first (the ``z_t`` terms cancel, so this is
    ``½·E[ᾱ_t ‖v_a − v_b‖²]``).

    Args:
        eps_a, eps_b: ``f(z_t, t, c̄) -> (b, C, H, W)``: ``z_t`` ``(b, C, H, W)`` in the latents' dtype and
            device, ``t`` ``(b,)`` int64, ``c̄`` the drawn conditions stacked along a new dim 0 if they are
            tensors (e.g. ``(b, L, D)`` encoder hidden states of non-customized prompts), else a list.
        latents: ``(N, C, H, W)`` data latents z₀ (already scaled by the VAE's scaling factor).
        conditions: K conditions (a list, or a tensor indexed along dim 0).
        scheduler: A diffusers scheduler of the models (``add_noise``, ``alphas_cumprod``, ``config``).
        num_samples: n ≥ 1 Monte Carlo samples.
        generator: The source of every random draw (on CPU or on the latents' device).
        prediction_type: ``epsilon`` or ``v_prediction``; None: the scheduler config's (default epsilon). It
            must agree with the scheduler config when that names one.
        batch_size: Samples per model call.

    Returns:
        ``{"lfd": ½·mean over samples and latent elements of (ε_a − ε_b)² — the reported value,
        "lfd_sum": ½·mean over samples of ‖ε_a − ε_b‖² summed over a sample's C·H·W elements (the
        definition's unnormalised value; = lfd · C·H·W), "lfd_se": standard error of "lfd" over the samples,
        "num_samples": n}``.

    Raises:
        ValueError: On an empty ``latents``/``conditions``, ``num_samples`` or ``batch_size`` < 1, or an
            unknown or mismatched ``prediction_type``.
    """
    prediction_type = _prediction_type(scheduler, prediction_type)
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise ValueError(f"latents: shape {tuple(latents.shape)}; allowed: (N, C, H, W), N >= 1")
    if len(conditions) == 0:
        raise ValueError("conditions: empty; allowed: at least one condition")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"{name}: {value}; allowed: >= 1")
    n, gdev = int(num_samples), generator.device
    n_train = int(scheduler.config.num_train_timesteps)
    z_idx = torch.randint(latents.shape[0], (n,), generator=generator, device=gdev).cpu()
    t_all = torch.randint(n_train, (n,), generator=generator, device=gdev).cpu()
    c_idx = torch.randint(len(conditions), (n,), generator=generator, device=gdev).cpu()
    noise_all = torch.randn((n, *latents.shape[1:]), generator=generator, device=gdev)  # (n, C, H, W) float32
    alphas = scheduler.alphas_cumprod.to(torch.float64).cpu()  # (T,)
    per_sample = torch.empty(n, dtype=torch.float64)  # ‖ε_a − ε_b‖² per sample
    for lo in range(0, n, int(batch_size)):
        sl = slice(lo, min(lo + int(batch_size), n))
        z0 = latents[z_idx[sl].to(latents.device)]  # (b, C, H, W)
        noise = noise_all[sl].to(z0.device, z0.dtype)
        t = t_all[sl].to(z0.device)  # (b,) int64
        z_t = scheduler.add_noise(z0, noise, t)  # (b, C, H, W)
        cond = _collate([conditions[int(j)] for j in c_idx[sl]], z0.device)
        out_a = eps_a(z_t, t, cond).double()  # (b, C, H, W)
        out_b = eps_b(z_t, t, cond).double()
        if prediction_type == "v_prediction":
            a_bar = alphas[t_all[sl]].to(z0.device)  # (b,)
            out_a, out_b = v_to_eps(out_a, z_t, a_bar), v_to_eps(out_b, z_t, a_bar)
        per_sample[sl] = (out_a - out_b).square().flatten(1).sum(dim=1).cpu()
    numel = math.prod(latents.shape[1:])
    per_elem = 0.5 * per_sample / numel  # (n,)
    se = float(per_elem.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"lfd": float(per_elem.mean()), "lfd_sum": float(0.5 * per_sample.mean()), "lfd_se": se,
            "num_samples": n}


# -------------------------------------------------------------------------------------------- helpers


def _unit64(x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` → float64 CPU unit rows; a zero-norm row becomes NaN (0/0)."""
    x = x.detach().double().cpu()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _embed(fn: Callable[[Sequence[Any]], torch.Tensor], items: Sequence[Any], batch_size: int) -> torch.Tensor:
    """Embed ``items`` ``batch_size`` at a time and concatenate the ``(N, D)`` rows."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: {batch_size}; allowed: >= 1")
    items = list(items)
    return torch.cat([fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)])


def _image_set_score(name: str, embedder: Any, generated: Sequence[Any], references: Sequence[Any],
                     batch_size: int) -> float:
    if len(generated) == 0 or len(references) == 0:
        raise ValueError(f"{name}: {len(generated)} generated and {len(references)} reference images; "
                         "allowed: >= 1 each")
    gen = _embed(embedder.embed_images, generated, batch_size)  # (N, D)
    ref = _embed(embedder.embed_images, references, batch_size)  # (M, D)
    return mean_pairwise_cosine(gen, ref)


def _gaussian(rows: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` + ``eps·I`` of ``(n, d)`` float64 rows."""
    mu = rows.mean(dim=0)
    centred = rows - mu
    cov = centred.T @ centred / (rows.shape[0] - 1)
    return mu, cov + eps * torch.eye(rows.shape[1], dtype=rows.dtype)


def _psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix by eigendecomposition; rounding's negative eigenvalues → 0."""
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _prediction_type(scheduler: Any, requested: str | None) -> str:
    configured = getattr(scheduler, "config", {}).get("prediction_type")
    chosen = requested if requested is not None else (configured or "epsilon")
    if chosen not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: {chosen!r}; allowed: {list(PREDICTION_TYPES)}")
    if configured is not None and chosen != configured:
        raise ValueError(f"prediction_type: {chosen!r} but the scheduler config says {configured!r}; "
                         "allowed: the scheduler's own")
    return chosen


def _collate(items: list[Any], device: torch.device) -> Any:
    """Drawn conditions → one batch: tensors stacked along a new dim 0 (on ``device``), others as a list."""
    if all(isinstance(c, torch.Tensor) for c in items):
        return torch.stack(items).to(device)
    return items
