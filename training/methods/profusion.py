"""ProFusion generation (SPEC §4.5): PromptNet → S*, fusion sampling on diffusers' DDIM, per-image fine-tuning.

Usage::

    gen = ProFusionGenerator(t2i_components, promptnet_components, cfg)   # cfg: build.profusion section
    with gen.finetuned(source_image, seed):                 # no-op unless cfg.finetune; restores weights after
        images = gen.sample([source_image] * k, sstar_prompts, ref_prompts, seeds)   # list of (H, W, 3) uint8

Fusion sampling, per DDIM step t (grid: the scheduler's, ``t_prev = t − T // N``, ᾱ_prev = final ᾱ below 0):

* ``refine_step`` times: ε̃ = ε_u + w_r(ε_γ − ε_u), ε_γ from the S* prompt with its slot *output* scaled by γ;
  ``x ← refine_update(x, ε̃, ᾱ_t, ᾱ_prev, σ_t, z)`` with σ_t = refine_eta·√Var(t, t_prev) (DDIM variance);
* main step: ε = ε_u + s₁(ε_S* − ε_u) + s₂(ε_ref − ε_u), then ``scheduler.step(..., eta=0)`` (deterministic).

A ``v_prediction`` UNet (the synthetic world's, with a zero-terminal-SNR schedule) is supported: guidance is
linear, so it is applied to the UNet outputs as they are and only the refinement update converts them to ε
(:meth:`ProFusionGenerator.to_eps`); fine-tuning then regresses the velocity instead of the noise.

S* is recomputed from the current z_t before every UNet call. It replaces the *output* of the text
encoder's embedding layer at the ``holder`` slot (so S* carries no position embedding — as the authors'
code does), and that slot of the encoder output is multiplied by the scale.

Every row draws its initial latent, its VAE posterior sample and its refinement noise from its own
``torch.Generator`` seeded by the row seed, so a row's image does not depend on the other rows' seeds.

Text context: sampling uses the usual padded ``tokenizer.model_max_length`` (77) tokens; fine-tuning uses the
prompt's tokens + S* + EOS with **no padding** (6 tokens for ``"a photo of holder"``), as the authors' code.

Precision (fine-tuning): the roles may be stored in float16/bfloat16 (paper.yaml). The trained parameters
(PromptNet + UNet attn1/attn2 ``to_q/to_k/to_v``) are cast to float32 for the fine-tuning and updated there
(diffusers' ``cast_training_params`` pattern — AdamW on half-precision weights turns them NaN), the frozen
parts keep their storage dtype and run under ``torch.autocast`` in ``cfg.finetune_precision`` (fp16 with a
``GradScaler``); with ``fp32`` the frozen weights are up-cast for the duration instead. Afterwards the
trained weights are cast back to their storage dtype, so sampling runs in the role's dtype, and
:meth:`ProFusionGenerator.restore` puts the base weights back bit for bit in that dtype. Float16 compute on
CPU (sampling and fp16 autocast) works with the pinned torch; a bf16 autocast over float16-stored weights
does not on CPU (LayerNorm/GroupNorm refuse the mixed dtypes; CUDA autocast runs norms in float32), so that
one combination is refused with a ``ValueError``.

Input guard: a source whose latent is not exactly the loaded PromptNet's ``latent_size`` (one S* token) is
refused with a ``ValueError`` naming the image size, the latent size and what PromptNet expects.
Failures are classified for retry vs quarantine by :func:`training.errors.is_transient` (re-exported here).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training.errors import is_transient  # noqa: F401  (re-exported: retry vs quarantine of a failed source)
from training.models.promptnet import clip_pixel_values

HOLDER_WORD = "holder"
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def _autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype``; a no-op context for float32 compute (``dtype`` None)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


# ----------------------------------------------------------------------------------------- pure math


def ddim_variance(alpha_t: float, alpha_prev: float) -> float:
    """DDIM's Var(t, t_prev) = (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)."""
    return (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)


def refine_update(x: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_prev: float, sigma: float,
                  noise: torch.Tensor) -> torch.Tensor:
    """One ProFusion refinement update at the same t (SPEC §4.5).

    ``x − ε·σ²·√(1−ᾱ_t)/(1−ᾱ_prev) + σ·z·√((1−ᾱ_t)(2−2ᾱ_prev−σ²))/(1−ᾱ_prev)``
    """
    denom = 1.0 - alpha_prev
    drift = sigma**2 * math.sqrt(1.0 - alpha_t) / denom
    diffusion = sigma * math.sqrt((1.0 - alpha_t) * (2.0 - 2.0 * alpha_prev - sigma**2)) / denom
    return x - eps * drift + noise * diffusion


def fused_guidance(eps_u: torch.Tensor, eps_sstar: torch.Tensor, eps_ref: torch.Tensor, s1: float,
                   s2: float) -> torch.Tensor:
    """ε = ε_u + s₁(ε_S* − ε_u) + s₂(ε_ref − ε_u)."""
    return eps_u + s1 * (eps_sstar - eps_u) + s2 * (eps_ref - eps_u)


# ----------------------------------------------------------------------------------------- augmentation


def generic_augmentations(image: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Generic augmentation policy (the authors' face-specific one is not reproduced).

    ``image``: (3, H, W) in [0, 1]. Returns (n, 3, H, W): random resized crop (scale 0.7–1, aspect 3/4–4/3),
    horizontal flip (p 0.5) and brightness/contrast jitter (±10 %), all drawn from ``generator``.
    """
    _, h, w = image.shape
    out = []
    for _ in range(n):
        r = torch.rand(7, generator=generator).tolist()
        scale = 0.7 + 0.3 * r[0]
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[1])
        ch = min(h, max(1, int(round(math.sqrt(scale * h * w / aspect)))))
        cw = min(w, max(1, int(round(math.sqrt(scale * h * w * aspect)))))
        top = int(r[2] * (h - ch + 1)) if h > ch else 0
        left = int(r[3] * (w - cw + 1)) if w > cw else 0
        crop = image[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False)[0]
        if r[4] < 0.5:
            crop = crop.flip(-1)
        contrast, brightness = 0.9 + 0.2 * r[5], 0.9 + 0.2 * r[6]
        crop = (((crop - crop.mean()) * contrast + crop.mean()) * brightness).clamp(0, 1)
        out.append(crop)
    return torch.stack(out) if out else image.new_zeros((0, *image.shape))


AUGMENTATIONS = {"generic": generic_augmentations, "none": lambda image, n, generator: image.new_zeros((0, *image.shape))}


# ----------------------------------------------------------------------------------------- generator


@dataclass
class _Conditioning:
    ref_latent: torch.Tensor  # (B, 4, h, w), scaled by the VAE scaling factor
    clip_hidden: torch.Tensor  # (B, 1+P, clip_width)


class ProFusionGenerator:
    """Holds the t2i components + PromptNet; samples targets for (source image, instruction) pairs."""

    def __init__(self, t2i, promptnet, cfg, device: str | torch.device = "cpu"):
        self.t2i, self.pn, self.cfg = t2i, promptnet, cfg
        self.device = torch.device(device)
        self.unet, self.vae, self.text_encoder = t2i.unet, t2i.vae, t2i.text_encoder
        self.tokenizer, self.scheduler = t2i.tokenizer, t2i.scheduler
        self.promptnet, self.image_encoder = promptnet.promptnet, promptnet.image_encoder
        self.image_processor = promptnet.image_processor
        self.holder_id = self._holder_token_id()
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self._base_state: dict[str, torch.Tensor] | None = None
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"ProFusion: scheduler prediction_type {self.prediction_type!r} is not supported "
                             "(epsilon or v_prediction)")

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, alpha_t: float) -> torch.Tensor:
        """The UNet's output as a noise prediction ε (a v-prediction model gives v = √ᾱ·ε − √(1−ᾱ)·x₀, so
        ε = √ᾱ·v + √(1−ᾱ)·x_t). Guidance combines outputs linearly, so it commutes with this conversion."""
        if self.prediction_type == "epsilon":
            return out
        return math.sqrt(alpha_t) * out + math.sqrt(1.0 - alpha_t) * x

    # -- prompts ----------------------------------------------------------------------------------

    def _holder_token_id(self) -> int:
        ids = self.tokenizer(HOLDER_WORD, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"ProFusion needs '{HOLDER_WORD}' to be one token; the t2i tokenizer splits it into {ids}")
        return ids[0]

    def _tokenize(self, prompts: Sequence[str], pad: bool = True) -> torch.Tensor:
        """Token ids (B, L): L = ``model_max_length`` when ``pad``, else the prompts' own (equal) length."""
        max_length = self.tokenizer.model_max_length
        if pad:
            return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                                  return_tensors="pt").input_ids.to(self.device)
        ids = self.tokenizer(list(prompts), padding=False, truncation=True, max_length=max_length).input_ids
        if len({len(row) for row in ids}) != 1:
            raise ValueError(f"unpadded prompts must have the same token length to batch: {list(prompts)}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def encode(self, prompts: Sequence[str], s_star: torch.Tensor | None = None, scale: float = 1.0,
               pad: bool = True) -> torch.Tensor:
        """Text-encoder hidden states (B, L, D); with ``s_star`` (B, 1, D) it fills the ``holder`` slot.

        ``pad=False`` gives the fine-tuning context: BOS + prompt tokens + EOS, no padding (L = 6 for
        ``"a photo of holder"``); sampling uses the padded L = ``tokenizer.model_max_length``.
        """
        ids = self._tokenize(prompts, pad=pad)
        if s_star is None:
            return self.text_encoder(ids)[0]
        rows, cols = (ids == self.holder_id).nonzero(as_tuple=True)
        if rows.numel() != ids.shape[0] or not torch.equal(rows, torch.arange(ids.shape[0], device=ids.device)):
            raise ValueError(f"every S* prompt needs exactly one '{HOLDER_WORD}' token: {list(prompts)}")

        def put_sstar(module, args, output):  # output: (B, L, D) token + position embeddings
            output = output.clone()
            output[rows, cols] = s_star[:, 0].to(output.dtype)
            return output

        embeddings = getattr(self.text_encoder, "text_model", self.text_encoder).embeddings  # transformers 4 | 5
        handle = embeddings.register_forward_hook(put_sstar)
        try:
            hidden = self.text_encoder(ids)[0]
        finally:
            handle.remove()
        if scale != 1.0:
            factor = torch.ones_like(hidden[..., :1])
            factor[rows, cols] = scale
            hidden = hidden * factor
        return hidden

    # -- images -----------------------------------------------------------------------------------

    def _to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        return x.to(self.device)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_source_size(self, height: int, width: int) -> None:
        """Refuse a source whose latent does not give exactly one S* token with the loaded PromptNet."""
        f, size = self.vae_scale_factor, self.promptnet.latent_size
        if height % f or width % f or (height // f, width // f) != (size, size):
            raise ValueError(
                f"ProFusion: a {height}×{width} source image gives a {height / f:g}×{width / f:g} latent "
                f"(VAE factor {f}), but the loaded PromptNet gives exactly one S* token only for {size}×{size} "
                f"latents, i.e. {size * f}×{size * f} images; resize the sources (build.sources.image_size)")

    def _clip_hidden(self, pixels01: torch.Tensor) -> torch.Tensor:
        """CLIP vision tokens (B, 1+P, width), no post-LN; input resized bicubic **without** antialias."""
        pix = clip_pixel_values(pixels01, self.image_encoder.config.image_size, self.image_processor.image_mean,
                                self.image_processor.image_std)  # (B, 3, S, S) float32
        pix = pix.to(self.device, self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pix).last_hidden_state

    def _encode_latents(self, pixels01: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        dist = self.vae.encode((pixels01 * 2 - 1).to(self.vae.dtype)).latent_dist
        if generators is None:
            return dist.mean * self.scaling
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(dist.mean)
        return (dist.mean + dist.std * noise) * self.scaling

    def _condition(self, sources: Sequence[np.ndarray], generators) -> _Conditioning:
        pixels = self._to_tensor(sources)
        dtype = self._promptnet_dtype()  # the promptnet role may be stored in another dtype than t2i
        return _Conditioning(self._encode_latents(pixels, generators).to(dtype), self._clip_hidden(pixels).to(dtype))

    def _promptnet_dtype(self) -> torch.dtype:
        return self.promptnet.prompt_out.weight.dtype

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, sources: Sequence[np.ndarray], sstar_prompts: Sequence[str], ref_prompts: Sequence[str],
               seeds: Sequence[int]) -> list[np.ndarray]:
        """Fusion sampling for a batch of pairs; returns (H, W, 3) uint8 images in input order."""
        cfg = self.cfg
        b = len(sources)
        if not (len(sstar_prompts) == len(ref_prompts) == len(seeds) == b):
            raise ValueError("sources, prompts and seeds must have the same length")
        for src in sources:
            self.check_source_size(*np.shape(src)[:2])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        cond = self._condition(sources, gens)
        unet = self.unet
        shape = (unet.config.in_channels, *cond.ref_latent.shape[-2:])
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device, unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        uncond = self.encode([""] * b)
        ref = self.encode(ref_prompts)
        sched = self.scheduler
        sched.set_timesteps(cfg.num_inference_steps)
        step = sched.config.num_train_timesteps // cfg.num_inference_steps
        for t in sched.timesteps:
            t_int = int(t)
            prev_t = t_int - step
            alpha_t = float(sched.alphas_cumprod[t_int])
            alpha_prev = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
            tt = torch.full((b,), t_int, device=self.device)
            for _ in range(cfg.refine_step):
                s_star = self.promptnet(cond.ref_latent, x.to(cond.ref_latent.dtype), tt, cond.clip_hidden)
                cond_gamma = self.encode(sstar_prompts, s_star, scale=cfg.gamma)
                eps_u, eps_g = unet(torch.cat([x, x]), t_int,
                                    encoder_hidden_states=torch.cat([uncond, cond_gamma])).sample.chunk(2)
                eps = self.to_eps(eps_u + cfg.w_r * (eps_g - eps_u), x, alpha_t)
                sigma = cfg.refine_eta * math.sqrt(ddim_variance(alpha_t, alpha_prev))
                z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(x)
                x = refine_update(x, eps, alpha_t, alpha_prev, sigma, z)
            s_star = self.promptnet(cond.ref_latent, x.to(cond.ref_latent.dtype), tt, cond.clip_hidden)
            cond_s = self.encode(sstar_prompts, s_star, scale=1.0)
            eps_u, eps_s, eps_r = unet(torch.cat([x, x, x]), t_int,
                                       encoder_hidden_states=torch.cat([uncond, cond_s, ref])).sample.chunk(3)
            x = sched.step(fused_guidance(eps_u, eps_s, eps_r, cfg.s1, cfg.s2), t, x, eta=0.0).prev_sample
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        if not bool(finite.all()):  # fp16 overflow or a broken checkpoint: never publish garbage as an image
            raise RuntimeError(f"non-finite latents for rows {torch.nonzero(~finite).flatten().tolist()}")
        images = self.vae.decode((x / self.scaling).to(self.vae.dtype)).sample  # (B, 3, H, W)
        finite = torch.isfinite(images.flatten(1)).all(dim=1)
        if not bool(finite.all()):  # a half-precision VAE overflow would otherwise become black pixels
            raise RuntimeError(f"non-finite decoded images for rows {torch.nonzero(~finite).flatten().tolist()}")
        images = ((images.float() + 1) / 2).clamp(0, 1)
        return list((images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())

    # -- per-image fine-tuning --------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """PromptNet + every UNet attention ``to_q``/``to_k``/``to_v`` (attn1 and attn2)."""
        params = {f"promptnet.{n}": p for n, p in self.promptnet.named_parameters()}
        for n, p in self.unet.named_parameters():
            if any(f".{proj}." in n for proj in ("to_q", "to_k", "to_v")) and (".attn1." in n or ".attn2." in n):
                params[f"unet.{n}"] = p
        return params

    def finetune_autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of fine-tuning from ``cfg.finetune_precision``; None = float32 compute."""
        precision = self.cfg.finetune_precision
        if precision == "auto":
            storage = self.unet.conv_in.weight.dtype  # a frozen weight: the t2i role's storage dtype
            return storage if storage in (torch.float16, torch.bfloat16) else None
        dtype = _AUTOCAST_DTYPES[precision]
        # frozen weights in the gradient path (PromptNet is all trained, so float32 while training)
        low = {p.dtype for p in (*self.unet.parameters(), *self.text_encoder.parameters())} - {torch.float32}
        if self.device.type == "cpu" and dtype is not None and low - {dtype}:
            raise ValueError(f"finetune_precision={precision!r} on CPU needs the t2i role stored in float32 or "
                             f"{dtype}, not {sorted(map(str, low))}: CPU norm layers do not mix half dtypes "
                             "under autocast; use 'auto', 'fp32' or a matching role dtype")
        return dtype

    @contextlib.contextmanager
    def _training_precision(self, params: dict[str, torch.nn.Parameter], autocast_dtype: torch.dtype | None):
        """Hold the trained parameters in float32 (and, for float32 compute, the frozen UNet/text-encoder/
        PromptNet weights too) for the duration; on exit cast every one back to its storage dtype (exact for
        the frozen weights: half → float32 → half round-trips bit for bit)."""
        frozen = []
        if autocast_dtype is None:
            trained = {id(p) for p in params.values()}
            frozen = [p for m in (self.unet, self.text_encoder, self.promptnet) for p in m.parameters()
                      if id(p) not in trained and p.is_floating_point()]
        saved = [(p, p.dtype) for p in (*params.values(), *frozen)]
        try:
            for p, _ in saved:
                p.data = p.data.float()
            yield
        finally:
            for p, dtype in saved:
                p.data = p.data.to(dtype)

    def finetune(self, source: np.ndarray, seed: int) -> list[float]:
        """Fine-tune on a mini-set of the source + augmentations; returns the losses. Call :meth:`restore` after.

        Trained parameters are float32 while training (see the module docstring); on return they hold the
        fine-tuned values in their storage dtype, ready for :meth:`sample`.
        """
        cfg = self.cfg
        self.check_source_size(*np.shape(source)[:2])
        autocast_dtype = self.finetune_autocast_dtype()
        params = self.trainable_parameters()
        if self._base_state is None:
            self._base_state = {n: p.detach().clone() for n, p in params.items()}  # storage dtype
        gen = torch.Generator().manual_seed(int(seed))
        image = self._to_tensor([source])[0]
        augment = AUGMENTATIONS[cfg.augmentation]
        miniset = torch.cat([image[None], augment(image.cpu(), cfg.num_augmentations, gen).to(self.device)])
        with torch.no_grad():  # frozen encoders in their storage dtype; training inputs in float32
            latents = self._encode_latents(miniset, None).float()  # (M, 4, h, w)
            clip_hidden = self._clip_hidden(miniset).float()  # (M, 1+P, clip_width)
        prompts = [cfg.finetune_prompt] * cfg.finetune_batch_size
        n_train = self.scheduler.config.num_train_timesteps
        losses = []
        with self._training_precision(params, autocast_dtype):
            for p in params.values():
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params.values(), lr=cfg.finetune_lr,
                                          weight_decay=cfg.finetune_weight_decay)  # over the float32 weights
            scaler = torch.amp.GradScaler(self.device.type, enabled=autocast_dtype == torch.float16)
            self.unet.train()
            self.promptnet.train()
            try:
                for _ in range(cfg.finetune_steps):
                    ref_idx = torch.randint(len(miniset), (cfg.finetune_batch_size,), generator=gen)
                    tgt_idx = torch.randint(len(miniset), (cfg.finetune_batch_size,), generator=gen)
                    noise = torch.randn(latents[tgt_idx].shape, generator=gen).to(latents)
                    t = torch.randint(0, n_train, (cfg.finetune_batch_size,), generator=gen).to(self.device)
                    z_t = self.scheduler.add_noise(latents[tgt_idx], noise, t)  # (b, 4, h, w) float32
                    with _autocast(self.device.type, autocast_dtype):
                        s_star = self.promptnet(latents[ref_idx], z_t, t, clip_hidden[ref_idx])  # (b, 1, D)
                        # (b, L, D): L_prompt (no padding, the authors') or the padded sampling length
                        hidden = self.encode(prompts, s_star, pad=getattr(cfg, "context_padding", "none") == "max_length")
                        eps = self.unet(z_t, t, encoder_hidden_states=hidden).sample
                    target = noise if self.prediction_type == "epsilon" else \
                        self.scheduler.get_velocity(latents[tgt_idx], noise, t)
                    loss = F.mse_loss(eps.float(), target)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)  # skipped (weights untouched) when fp16 gradients overflowed
                    scaler.update()
                    losses.append(loss.item())
            finally:
                self.unet.eval()
                self.promptnet.eval()
                for p in params.values():
                    p.requires_grad_(False)
                    p.grad = None
        return losses

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back (exactly, in their storage dtype) after :meth:`finetune`."""
        if self._base_state is None:
            return
        for n, p in self.trainable_parameters().items():
            base = self._base_state[n]
            if p.dtype == base.dtype and p.device == base.device:
                p.copy_(base)
            else:  # interrupted mid-cast: take the stored tensor's dtype back too
                p.data = base.clone()

    @contextlib.contextmanager
    def finetuned(self, source: np.ndarray, seed: int):
        """Fine-tune once for ``source`` if ``cfg.finetune``; always restore the base weights on exit."""
        if not self.cfg.finetune:
            yield []
            return
        try:
            yield self.finetune(source, seed)
        finally:
            self.restore()
