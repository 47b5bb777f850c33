"""Infusion (SPEC §4.3, D6): a residual value embedding Δ per cross-attention layer, learned on F's maps.

Usage::

    concept = train_infusion(t2i, images, "cat", InfusionParams(), seed=0)    # t2i: kit T2IComponents
    concept.save("out/cat")                                                   # infusion.safetensors + .json
    customized, foundational = sample(t2i, [InfusionConcept.load("out/cat")],
                                      ["a photo of a cat on the beach"], seeds=[0])

Method (the processors are in :mod:`training.attention.infusion`): one UNet batch holds a foundational stream
F and a customized stream C. In every attn2 layer F attends ordinarily; C reuses F's attention maps and adds
Δ_l to the value of the concept token (the class word's last BPE token; no new token): ``P_F (V + e Δ_l^T)``.
Self-attention is untouched, so the streams diverge through later layers. Only Δ trains.

Training: the image is centre-cropped to a square, flipped with p ``flip_p`` and resized bicubic (PIL) to the
model size (flip after the resize: the bicubic kernel is mirror-symmetric). z0 is the VAE posterior mean
(decision; ``sample_posterior=True`` samples it each step as diffusers' scripts do). SD's posterior std is
small against its latents, so the choice hardly matters there, while the synthetic world's VAE was trained on
means and its posterior std (≈ 1, measured) is as large as the latents: sampling it drowns the concept.
``z_t`` from ``scheduler.add_noise``, t uniform in [0, T); target ε or,
for a ``v_prediction`` UNet, the velocity. Loss: MSE on C's output, weighted by a soft foreground mask when
given (area-resized to the latent, flipped with the image): ``Σ m (ŷ − y)² / (C · Σ m)`` (= plain MSE for
m ≡ 1). AdamW (lr ``learning_rate``, torch's default weight decay 0.01 — SPEC names no other), ``batch_size``
rows × ``grad_accum`` micro-batches per optimizer step (loss divided by ``grad_accum``), Δ initialised to 0.
Gradients are taken with ``torch.autograd.grad`` w.r.t. Δ only, so no base parameter's ``.grad`` is touched.

Sampling: F runs ordinary classifier-free-guided DDIM; C starts from the same noise (its own latent) and its
conditional branch uses F's conditional maps + Δ; C's unconditional branch is the plain model on C's latent
(no Δ, own maps: prompt-to-prompt edits only the conditional half). Guidance is linear on the raw UNet
outputs (ε or v). A prompt containing none of the concepts' nouns goes through F alone (customized image =
foundational image). Multi-concept (Eq. 9): each concept's Δ is added at its own noun's token in the prompt.

Precision: Δ is float32 (it is the only trained tensor); the frozen base keeps its storage dtype and runs under
``torch.autocast`` in ``precision`` (fp16 with a ``GradScaler``); ``"auto"`` (default) picks the base's own storage
dtype (fp32 for a float32 base). ``precision="fp32"`` needs a float32 base
(no weight of the shared base is ever re-cast); on CPU a half base runs only under autocast in its own dtype
(CPU norm layers do not mix half dtypes). Sampling runs in the base's storage dtype without autocast.

Determinism: every random draw comes from ``torch.Generator`` objects seeded from the given seed(s) (one per
training job, one per sampled row), never the global RNG; processors are installed for a call and the previous
ones restored, and the scheduler is a private copy, so a job gives the same bits alone or after other jobs.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from training.attention.infusion import (
    PLACEMENTS,
    InfusionAttnProcessor,
    InfusionKVAttnProcessor,
    InfusionRouting,
    cross_attention_layers,
    installed,
    route,
)

from training.methods.params import INFUSION_MODES as MODES, InfusionParams  # noqa: E402,F401
PRECISIONS = {"auto": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS_FILE = "infusion.safetensors"
META_FILE = "infusion.json"


@dataclass
class InfusionConcept:
    """A trained concept: Δ per attn2 layer (float32 after training, fp16-exact after :meth:`load`).

    ``deltas[layer]``: (dim,) for ``mode="paper"``, (2, dim) = [key, value] for ``mode="code_compat"``;
    dim = the layer's inner_dim (``post_v``) or the text width (``pre_v``).
    """

    noun: str
    layer_names: list[str]
    placement: str
    mode: str
    deltas: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    base_fingerprint: str | None = None  # set by the caller (the kit's LoadedRole.fingerprint); saved in the JSON

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write ``infusion.safetensors`` (Δ of every layer, fp16) and ``infusion.json``; returns the paths.

        Each file is written to a temporary name and renamed into place.
        """
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {n: self.deltas[n].detach().to("cpu", torch.float16).contiguous() for n in self.layer_names}
        meta = {"noun": self.noun, "layer_names": list(self.layer_names), "placement": self.placement,
                "mode": self.mode, "params": self.params, "base_fingerprint": self.base_fingerprint,
                "num_values": sum(t.numel() for t in tensors.values()), "nbytes": self.nbytes,
                "dtype": "float16", "losses": list(self.losses)}
        paths = [d / WEIGHTS_FILE, d / META_FILE]
        tmp = d / f".{WEIGHTS_FILE}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "infusion"})
        os.replace(tmp, paths[0])
        tmp = d / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, paths[1])
        return [str(p) for p in paths]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "InfusionConcept":
        """Read a concept written by :meth:`save` (safetensors only; Δ come back as float16 tensors)."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / META_FILE).read_text())
        tensors = load_file(str(d / WEIGHTS_FILE))
        names = list(meta["layer_names"])
        if set(tensors) != set(names):
            raise ValueError(f"{d / WEIGHTS_FILE}: tensors {sorted(tensors)} do not match the JSON's layer names")
        return cls(noun=meta["noun"], layer_names=names, placement=meta["placement"], mode=meta["mode"],
                   deltas={n: tensors[n] for n in names}, losses=list(meta.get("losses", [])),
                   params=dict(meta.get("params", {})), base_fingerprint=meta.get("base_fingerprint"))

    @property
    def nbytes(self) -> int:
        """Bytes of Δ in fp16 (2 × number of values) = the tensor payload of the saved safetensors file
        (the file adds its JSON header on top)."""
        return 2 * sum(self.deltas[n].numel() for n in self.layer_names)


# ----------------------------------------------------------------------------------------- prompts


def _noun_ids(tokenizer, noun: str) -> list[int]:
    ids = tokenizer(noun, add_special_tokens=False).input_ids
    if not noun.strip() or not ids:
        raise ValueError(f"noun={noun!r}: tokenizes to no tokens")
    return list(ids)


def _find(ids: Sequence[int], sub: Sequence[int]) -> int | None:
    n = len(sub)
    for i in range(len(ids) - n + 1):
        if list(ids[i : i + n]) == list(sub):
            return i + n - 1
    return None


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def concept_token_index(tokenizer, prompt: str, noun: str) -> int:
    """Position (in the padded context, SOS = 0) of the last BPE token of the noun's first occurrence.

    Matches whole tokens, so ``"cat"`` is not found in ``"category"``. Raises ``ValueError`` if absent
    (including when the prompt is truncated before it).
    """
    pos = _find(_prompt_ids(tokenizer, prompt), _noun_ids(tokenizer, noun))
    if pos is None:
        raise ValueError(f"noun {noun!r} does not occur in prompt {prompt!r} (token-level match)")
    return pos


def _slots_for(tokenizer, prompt: str, nouns: Sequence[str]) -> list[tuple[int, int]]:
    """(position, concept index) for each concept noun that occurs in the prompt."""
    ids = _prompt_ids(tokenizer, prompt)
    found = [(_find(ids, _noun_ids(tokenizer, noun)), k) for k, noun in enumerate(nouns)]
    slots = [(pos, k) for pos, k in found if pos is not None]
    if len({pos for pos, _ in slots}) != len(slots):
        raise ValueError(f"two concepts map to the same token in prompt {prompt!r}: nouns {list(nouns)}")
    return slots


def _encode(t2i, prompts: Sequence[str], device) -> torch.Tensor:
    """Text-encoder hidden states (B, L, D), padded to ``model_max_length``, in the UNet's dtype."""
    tok = t2i.tokenizer
    ids = tok(list(prompts), padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return t2i.text_encoder(ids)[0].to(t2i.unet.dtype)


# ----------------------------------------------------------------------------------------- processors


def _processor_class(mode: str):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {MODES}")
    return InfusionAttnProcessor if mode == "paper" else InfusionKVAttnProcessor


def _build_processors(unet, concepts: Sequence[InfusionConcept]) -> dict:
    """One processor per attn2 layer holding the concepts' Δ stacked along dim 0 (validated against the UNet)."""
    if not concepts:
        raise ValueError("concepts: at least one InfusionConcept is needed")
    modes, placements = {c.mode for c in concepts}, {c.placement for c in concepts}
    if len(modes) != 1 or len(placements) != 1:
        raise ValueError(f"concepts mix modes {sorted(modes)} / placements {sorted(placements)}; one call "
                         "takes concepts of one mode and one placement")
    nouns = [c.noun for c in concepts]
    if len(set(nouns)) != len(nouns):
        raise ValueError(f"two concepts share a noun: {nouns}")
    layers = cross_attention_layers(unet)
    cls, placement = _processor_class(modes.pop()), placements.pop()
    procs = {}
    for c in concepts:
        if sorted(c.layer_names) != sorted(layers):
            raise ValueError(f"concept {c.noun!r} was trained for layers {sorted(c.layer_names)}, this UNet has "
                             f"{sorted(layers)}")
    for name, attn in layers.items():
        delta = torch.stack([c.deltas[name].to(attn.to_v.weight.device, torch.float32) for c in concepts])
        procs[name] = cls.from_attention(attn, delta, placement)
    return procs


# ----------------------------------------------------------------------------------------- images


def _square_resize(array: np.ndarray, size: int, resample) -> np.ndarray:
    h, w = array.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.ascontiguousarray(array[top : top + s, left : left + s])
    return np.asarray(Image.fromarray(crop).resize((size, size), resample=resample))


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop + bicubic resize (PIL) of an (H, W, 3) uint8 image → (size, size, 3) uint8."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"images: expected (H, W, 3) uint8 arrays, got shape {a.shape} dtype {a.dtype}")
    return _square_resize(a, size, Image.BICUBIC)


def prepare_mask(mask: np.ndarray, image_shape: tuple[int, int], size: int, mode: str = "area") -> np.ndarray:
    """Soft mask (H, W) in [0, 1] (float, bool or uint8 /255): same centre crop, resized to (size, size) —
    ``area`` (averaging), or ``bilinear`` then divided by its max (the authors' ``mask / mask.max()``)."""
    m = np.asarray(mask)
    if m.shape != tuple(image_shape):
        raise ValueError(f"masks: a mask of shape {m.shape} does not match its image's (H, W) = {image_shape}")
    m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
    if not (np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0):
        raise ValueError("masks: values must lie in [0, 1] (or be uint8 0..255 / bool)")
    h, w = m.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = torch.from_numpy(np.ascontiguousarray(m[top : top + s, left : left + s]))[None, None]
    if mode == "bilinear":
        out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear")[0, 0]
        return (out / out.max()).numpy() if float(out.max()) > 0 else out.numpy()
    return torch.nn.functional.interpolate(crop, size=(size, size), mode="area")[0, 0].numpy()


def _image_size(t2i) -> tuple[int, int]:
    """(image size, latent size) of the model."""
    factor = 2 ** (len(t2i.vae.config.block_out_channels) - 1)
    latent = int(t2i.unet.config.sample_size)
    return latent * factor, latent


def _scheduler(t2i):
    from training.sampling import ddim_scheduler

    sched = ddim_scheduler(t2i.scheduler.config)
    if sched.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {sched.config.prediction_type!r}: allowed epsilon, v_prediction")
    return sched


def _autocast(device_type: str, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _check_precision(t2i, precision: str, device: torch.device) -> torch.dtype | None:
    low = {p.dtype for p in t2i.unet.parameters()} - {torch.float32}
    if precision == "auto":  # autocast in the base's stored half dtype; fp32 for a float32 base
        if len(low) > 1:
            raise ValueError(f"precision='auto': the t2i base mixes {sorted(map(str, low))}; choose fp16 or bf16")
        return next(iter(low)) if low else None
    dtype = PRECISIONS[precision]
    if dtype is None and low:
        raise ValueError(f"precision='fp32' needs a float32 t2i base, this one holds {sorted(map(str, low))}; "
                         "use precision 'fp16'/'bf16' (autocast) or load the role in float32")
    if device.type == "cpu" and dtype is not None and low - {dtype}:
        raise ValueError(f"precision={precision!r} on CPU needs the t2i base in float32 or {dtype}, not "
                         f"{sorted(map(str, low))}: CPU norm layers do not mix half dtypes under autocast")
    return dtype


# ----------------------------------------------------------------------------------------- training


def _encode_posteriors(t2i, pixels: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std (N, 4, h, w) float32 of (N, S, S, 3) uint8 images (unscaled)."""
    vae = t2i.vae
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device, vae.dtype)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return dist.mean.float(), dist.std.float()


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                  how: str = "normalized") -> torch.Tensor:
    """Plain MSE when ``mask`` is None; else (mask (B, 1, h, w)) ``how`` = ``authors``: mean((m·ŷ − m·y)²) over every
    element (the authors' ``p_losses``); ``normalized``: ``Σ m (ŷ − y)² / (C · Σ m)`` over the batch."""
    if mask is None:
        return ((pred.float() - target.float()) ** 2).mean()
    if how == "authors":
        return ((pred.float() * mask - target.float() * mask) ** 2).mean()
    err = (pred.float() - target.float()) ** 2  # (B, C, h, w)
    return (err * mask).sum() / (mask.sum() * err.shape[1]).clamp_min(1e-8)


def train_infusion(t2i, images: Sequence[np.ndarray], noun: str, params: InfusionParams, seed: int,
                   masks: Sequence[np.ndarray] | None = None, device: str | torch.device = "cpu",
                   on_step: Callable[[int, float], None] | None = None) -> InfusionConcept:
    """Learn Δ (every attn2 layer) for ``noun`` from reference ``images`` ((H, W, 3) uint8, any size).

    Args:
        t2i: the kit's ``T2IComponents`` (not modified; processors are installed for the call only).
        images: reference images; masks: optional soft foreground masks (H, W) per image.
        noun: the class word (its last BPE token carries Δ); params: :class:`InfusionParams`.
        seed: seeds the one ``torch.Generator`` every random draw comes from.
        on_step: called after each optimizer step with (step index from 1, that step's mean loss).

    Returns:
        The concept (float32 Δ, per-step losses).
    """
    device = torch.device(device)
    if not images:
        raise ValueError("images: at least one reference image is needed")
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"masks: {len(masks)} masks for {len(images)} images")
    autocast_dtype = _check_precision(t2i, params.precision, device)
    unet, sched = t2i.unet, _scheduler(t2i)
    size, latent = _image_size(t2i)
    prompts = [t.format(noun) for t in params.templates]
    positions = [concept_token_index(t2i.tokenizer, p, noun) for p in prompts]
    contexts = _encode(t2i, prompts, device)  # (n_templates, L, D) storage dtype

    pixels = np.stack([prepare_image(im, size) for im in images])  # (N, S, S, 3)
    both = np.concatenate([pixels, pixels[:, :, ::-1]])  # [original ; flipped]
    mean, std = _encode_posteriors(t2i, np.ascontiguousarray(both), device)  # (2N, 4, h, w)
    scaling = float(getattr(t2i.vae.config, "scaling_factor", 0.18215))
    mask_t = None
    if masks is not None:
        mode = "bilinear" if params.mask_loss == "authors" else "area"
        m = np.stack([prepare_mask(mk, np.shape(im)[:2], latent, mode) for mk, im in zip(masks, images)])  # (N, h, w)
        mask_t = torch.from_numpy(np.concatenate([m, m[:, :, ::-1]]).copy())[:, None].to(device)  # (2N, 1, h, w)

    layers = cross_attention_layers(unet)
    cls = _processor_class(params.mode)
    procs = {n: cls.from_attention(a, None, params.placement) for n, a in layers.items()}
    deltas = [procs[n].delta for n in layers]
    optimizer = torch.optim.AdamW(deltas, lr=params.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    gen = torch.Generator().manual_seed(int(seed))
    n_img, bs, n_train = len(images), params.batch_size, sched.config.num_train_timesteps
    routings = {}
    losses: list[float] = []
    with installed(unet, procs):
        for step in range(1, params.steps + 1):
            step_loss = 0.0
            for _ in range(params.grad_accum):
                idx = torch.randint(n_img, (bs,), generator=gen)
                flip = (torch.rand(bs, generator=gen) < params.flip_p).long()
                tmpl = torch.randint(len(prompts), (bs,), generator=gen)
                post_noise = torch.randn((bs, *mean.shape[1:]), generator=gen).to(device)  # drawn either way
                noise = torch.randn((bs, *mean.shape[1:]), generator=gen).to(device)
                t = torch.randint(0, n_train, (bs,), generator=gen).to(device)
                row = (idx + flip * n_img).to(device)
                z0 = mean[row] + std[row] * post_noise if params.sample_posterior else mean[row]
                z0 = z0 * scaling  # (bs, 4, h, w) float32
                z_t = sched.add_noise(z0, noise, t)
                target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
                key = tuple(tmpl.tolist())
                if key not in routings:
                    routings[key] = InfusionRouting.build(
                        bs, list(range(bs)), [True] * bs, [(j, positions[k], 0) for j, k in enumerate(key)], device)
                route(procs, routings[key])
                ctx = contexts[tmpl.to(device)]
                with _autocast(device.type, autocast_dtype):
                    out = unet(torch.cat([z_t, z_t]).to(unet.dtype), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([ctx, ctx])).sample
                loss = _weighted_mse(out[bs:], target, None if mask_t is None else mask_t[row], params.mask_loss)
                grads = torch.autograd.grad(scaler.scale(loss / params.grad_accum), deltas)
                for p, g in zip(deltas, grads):
                    p.grad = g if p.grad is None else p.grad + g
                step_loss += loss.item() / params.grad_accum
            scaler.step(optimizer)  # skipped (Δ untouched) when fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
    names = list(layers)
    out_deltas = {n: procs[n].delta.detach().float().clone()[0] for n in names}
    return InfusionConcept(noun=noun, layer_names=names, placement=params.placement, mode=params.mode,
                           deltas=out_deltas, losses=losses, params=asdict(params))


# ----------------------------------------------------------------------------------------- sampling


def _to_eps(out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, sched) -> torch.Tensor:
    """Model output as ε: a v-prediction gives ε = √ᾱ·v + √(1−ᾱ)·z_t."""
    if sched.config.prediction_type == "epsilon":
        return out
    a = sched.alphas_cumprod.to(z_t.device)[t.long()].float().view(-1, *([1] * (z_t.ndim - 1)))
    return a.sqrt() * out.float() + (1 - a).sqrt() * z_t.float()


def _decode(t2i, x: torch.Tensor) -> list[np.ndarray]:
    scaling = float(getattr(t2i.vae.config, "scaling_factor", 0.18215))
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError("Infusion sampling produced non-finite latents")
    with torch.no_grad():
        images = t2i.vae.decode((x / scaling).to(t2i.vae.dtype)).sample  # (B, 3, H, W)
    if not bool(torch.isfinite(images).all()):
        raise RuntimeError("Infusion sampling decoded non-finite images (half-precision VAE overflow?)")
    images = ((images.float() + 1) / 2).clamp(0, 1)
    return list((images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def _sample_batch(t2i, procs, nouns, prompts, seeds, steps, guidance, eta, device):
    unet, sched = t2i.unet, _scheduler(t2i)
    n = len(prompts)
    slots = [_slots_for(t2i.tokenizer, p, nouns) for p in prompts]
    cust = [i for i in range(n) if slots[i]]  # rows with a concept → a C stream
    m = len(cust)
    _, latent = _image_size(t2i)
    shape = (unet.config.in_channels, latent, latent)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x_f = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, unet.dtype)
    x_f = x_f * sched.init_noise_sigma
    x_c = x_f[cust].clone()  # C starts from F's noise, keeps its own latent
    ctx = _encode(t2i, [""] * n + list(prompts), device)  # [F_u (n) ; F_c (n)]
    # C rows: [C_u (m) paired with F_u, own maps ; C_c (m) paired with F_c, F's maps, Δ at the slots]
    routing = InfusionRouting.build(
        2 * n, cust + [n + i for i in cust], [False] * m + [True] * m,
        [(m + j, pos, k) for j, i in enumerate(cust) for pos, k in slots[i]], device)
    cust_t = torch.tensor(cust, dtype=torch.long, device=device)
    ctx_all = torch.cat([ctx, ctx[cust_t], ctx[n + cust_t]])
    sched.set_timesteps(steps, device=device)
    with installed(unet, procs, routing) if m else contextlib.nullcontext():
        for t in sched.timesteps:
            if m:
                out = unet(torch.cat([x_f, x_f, x_c, x_c]), t, encoder_hidden_states=ctx_all).sample
                f_u, f_c, c_u, c_c = out.split([n, n, m, m])
            else:
                f_u, f_c = unet(torch.cat([x_f, x_f]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = torch.cat([x_f, x_c])
            guided = [f_u + guidance * (f_c - f_u)] + ([c_u + guidance * (c_c - c_u)] if m else [])
            noise = None
            if eta > 0:  # per-row noise from the row's generator; F and C of a row get the same draw
                z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, x.dtype)
                noise = torch.cat([z, z[cust_t]])
            x = sched.step(torch.cat(guided), t, x, eta=eta, variance_noise=noise).prev_sample
            x_f, x_c = x[:n], x[n:]
    foundational = _decode(t2i, x_f)
    customized = [im.copy() for im in foundational]
    if m:
        for j, im in zip(cust, _decode(t2i, x_c)):
            customized[j] = im
    return customized, foundational


def sample(t2i, concepts: Sequence[InfusionConcept], prompts: Sequence[str], seeds: Sequence[int],
           steps: int = 50, guidance: float = 8.0, eta: float = 0.0, device: str | torch.device = "cpu",
           batch_size: int = 16) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Customized and foundational images ((H, W, 3) uint8 each, input order) for ``prompts``.

    Each row draws its initial latent (and, for ``eta > 0``, its DDIM noise) from its own generator seeded by
    its seed; F and C of a row share those draws. A prompt containing none of the concepts' nouns goes through
    F alone and its customized image is the foundational one. ``batch_size`` prompts go through one UNet batch.
    """
    device = torch.device(device)
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts ({len(prompts)}) and seeds ({len(seeds)}) must have the same length")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}: must be >= 1")
    if eta < 0:
        raise ValueError(f"eta={eta}: must be >= 0")
    procs = _build_processors(t2i.unet, concepts)
    nouns = [c.noun for c in concepts]
    customized, foundational = [], []
    for i in range(0, len(prompts), batch_size):
        c, f = _sample_batch(t2i, procs, nouns, list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size]),
                             steps, guidance, eta, device)
        customized += c
        foundational += f
    return customized, foundational


def foundational_eps(t2i, device: str | torch.device = "cpu", output: str = "epsilon"):
    """The base model as ``fn(z_t (B, C, h, w), t (B,) long | int, prompts) -> (B, C, h, w) float32``.

    ``output="epsilon"`` converts a v-prediction to ε (LFD, SPEC §3); ``"raw"`` returns the UNet output.
    """
    if output not in ("epsilon", "raw"):
        raise ValueError(f"output={output!r}: allowed 'epsilon', 'raw'")
    sched = _scheduler(t2i)
    device = torch.device(device)

    @torch.no_grad()
    def fn(z_t: torch.Tensor, t, prompts: Sequence[str]) -> torch.Tensor:
        z, t = z_t.to(device, t2i.unet.dtype), _timesteps(t, z_t).to(device)
        if len(prompts) != z.shape[0]:
            raise ValueError(f"prompts ({len(prompts)}) and z_t rows ({z.shape[0]}) must match")
        out = t2i.unet(z, t, encoder_hidden_states=_encode(t2i, prompts, device)).sample
        return out.float() if output == "raw" else _to_eps(out, z, t, sched).float()

    return fn


def _timesteps(t, z_t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=z_t.device).long()
    return t.expand(z_t.shape[0]) if t.ndim == 0 else t


def customized_eps(t2i, concepts: Sequence[InfusionConcept], device: str | torch.device = "cpu",
                   output: str = "epsilon"):
    """The customized model as ``fn(z_t (B, C, h, w), t (B,) long | int, prompts) -> (B, C, h, w) float32``.

    Same signature as :func:`foundational_eps` (for the Latent Fisher divergence). Rows whose prompt holds a
    concept noun get C's output of a dual-stream batch (F's maps + Δ, no guidance); every other row is the
    plain base UNet's output computed exactly as :func:`foundational_eps` does on the whole batch, so
    LFD = 0 for non-customized prompts by construction.
    """
    if output not in ("epsilon", "raw"):
        raise ValueError(f"output={output!r}: allowed 'epsilon', 'raw'")
    procs = _build_processors(t2i.unet, concepts)
    nouns = [c.noun for c in concepts]
    base = foundational_eps(t2i, device, output)
    sched = _scheduler(t2i)
    device = torch.device(device)

    @torch.no_grad()
    def fn(z_t: torch.Tensor, t, prompts: Sequence[str]) -> torch.Tensor:
        t = _timesteps(t, z_t)
        slots = [_slots_for(t2i.tokenizer, p, nouns) for p in prompts]
        cust = [i for i, s in enumerate(slots) if s]
        result = base(z_t, t, prompts)
        if not cust:
            return result
        m = len(cust)
        idx = torch.tensor(cust, dtype=torch.long, device=z_t.device)
        z, tt = z_t[idx].to(device, t2i.unet.dtype), t[idx].to(device)
        ctx = _encode(t2i, [prompts[i] for i in cust], device)
        routing = InfusionRouting.build(m, list(range(m)), [True] * m,
                                        [(j, pos, k) for j, i in enumerate(cust) for pos, k in slots[i]], device)
        with installed(t2i.unet, procs, routing):
            out = t2i.unet(torch.cat([z, z]), torch.cat([tt, tt]),
                           encoder_hidden_states=torch.cat([ctx, ctx])).sample[m:]  # C rows
        out = out.float() if output == "raw" else _to_eps(out, z, tt, sched).float()
        return result.index_copy(0, idx.to(result.device), out.to(result.device))

    return fn
