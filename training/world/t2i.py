"""The world's text-to-image model: an SD2-layout diffusers pipeline trained from scratch on captioned renders.

Usage::

    vae = train_vae(images, WorldT2IConfig().vae, seed=0)
    pipe = train_t2i(images, captions, vae, tokenizer, cfg, seed=0)     # StableDiffusionPipeline
    images = generate(pipe_components, prompts, seeds, steps=30, guidance=2.5)

Components (real library classes at tiny sizes, saved with ``save_pretrained``):

* ``AutoencoderKL`` with three levels (scale factor 4: 32×32 images → 4×8×8 latents). Its loss weights coloured
  pixels and edges above flat background and adds an image-gradient term, because a plain MSE blurs a
  32-pixel star into a blob; the KL weight is tiny (1e-6). ``scaling_factor`` is set to 1/std of the training
  latents.
* ``CLIPTextModel`` (2 layers) with the world's CLIP-BPE tokenizer (every vocabulary word one token), trained
  jointly with the ``UNet2DConditionModel``.
* ``DDIMScheduler`` with ``rescale_betas_zero_snr``, ``v_prediction`` and ``trailing`` timesteps: with an 8×8
  latent the standard schedule leaves enough signal at its noisiest step to fix where the object is, and the
  model then ignores position words (measured while designing the world).

Captions drop each optional attribute with p = 0.2 and shuffle the context phrases; 10 % are empty (the
unconditional branch of classifier-free guidance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.world.optim import optimizer_step, warmup_cosine


@dataclass(frozen=True)
class VAEConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-6
    #: decode the posterior mean while training (a sampled latent trains 2-3 dB worse in the same steps here)
    sample_posterior: bool = False


@dataclass(frozen=True)
class DiffusionConfig:
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    attention_heads: int = 8  # diffusers' `attention_head_dim` is the head *count*; 8 lets heads specialise per word
    text_width: int = 128
    text_layers: int = 2
    context_length: int = 32
    steps: int = 1400
    batch_size: int = 128
    lr: float = 1e-3
    uncond_prob: float = 0.1
    #: fraction of each batch whose timestep is drawn from [high_noise_from, T): the steps where the layout is
    #: decided from the text alone (zero terminal SNR), which uniform sampling visits rarely
    high_noise_fraction: float = 0.25
    high_noise_from: int = 800


def make_vae(cfg: VAEConfig, image_size: int):
    from diffusers import AutoencoderKL

    n = len(cfg.channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, block_out_channels=tuple(cfg.channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=8, sample_size=image_size,
    )


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights (N, 1, H, W): 1 on flat background, up to 6 on coloured pixels and edges."""
    sat = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)  # colourful (objects; backgrounds are grey)
    gx, gy = _grad(x)
    edge = F.pad(gx.abs().amax(1, keepdim=True), (0, 1, 0, 0)) + F.pad(gy.abs().amax(1, keepdim=True), (0, 0, 0, 1))
    return 1 + 2.5 * (sat > 0.3).float() + 2.5 * (edge > 0.3).float()


def train_vae(images: np.ndarray, cfg: VAEConfig, seed: int, progress=None, device: str = "cpu"):
    """Batches and noise are drawn on the CPU from a seeded generator and moved to ``device``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = make_vae(cfg, images.shape[1]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps, 0.05)
    data = _pixels(images)
    vae.train()
    for step in range(cfg.steps):
        x = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean
        if cfg.sample_posterior:
            z = z + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        w = vae_loss_weights(x)
        err = rec - x
        loss = (w * (err**2 + 0.5 * err.abs())).mean()
        (rgx, rgy), (xgx, xgy) = _grad(rec), _grad(x)
        loss = loss + (rgx - xgx).abs().mean() + (rgy - xgy).abs().mean()
        loss = loss + cfg.kl_weight * post.kl().mean()
        value = optimizer_step(opt, sched, loss)
        if progress is not None:
            progress(step, {"loss": value})
    vae.eval()
    with torch.no_grad():
        lat = encode_latents(vae, images[:2048], scaled=False)
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae.cpu()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, scaled: bool = True, batch_size: int = 512) -> torch.Tensor:
    """Posterior means (N, 4, h, w), times ``scaling_factor`` when ``scaled``."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(vae.encode(_pixels(images[i: i + batch_size]).to(vae.device, vae.dtype)).latent_dist.mean.float().cpu())
    lat = torch.cat(out)
    return lat * vae.config.scaling_factor if scaled else lat


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    img = vae.decode((latents / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample.float().cpu()
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=0, prediction_type="v_prediction",
        rescale_betas_zero_snr=True, timestep_spacing="trailing",
    )


def make_text_encoder(cfg: DiffusionConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_attention_heads=4, num_hidden_layers=cfg.text_layers, max_position_embeddings=cfg.context_length,
        projection_dim=cfg.text_width, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def make_unet(cfg: DiffusionConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.attention_heads, norm_num_groups=16,
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def train_t2i(latents: torch.Tensor, caption_fn, tokenizer, cfg: DiffusionConfig, seed: int, progress=None,
              device: str = "cpu"):
    """Train UNet + text encoder on (latent, caption) pairs; ``caption_fn(indices, rng) -> list[str]``.

    Indices, captions, noise and timesteps are drawn on the CPU from seeded generators, then moved to
    ``device``. Returns ``(unet, text_encoder, scheduler)`` on the CPU.
    """
    import random

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    unet = make_unet(cfg, latents.shape[-1]).to(device)
    text_encoder = make_text_encoder(cfg, tokenizer).to(device)
    scheduler = make_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = warmup_cosine(opt, cfg.steps, 0.05)
    unet.train()
    text_encoder.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        prompts = caption_fn(idx.tolist(), rng)
        prompts = ["" if rng.random() < cfg.uncond_prob else p for p in prompts]
        hidden = text_encoder(tokenize(tokenizer, prompts).to(device))[0]
        x0 = latents[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        n_t = scheduler.config.num_train_timesteps
        t = torch.randint(0, n_t, (cfg.batch_size,), generator=gen)
        n_high = int(round(cfg.high_noise_fraction * cfg.batch_size))
        if n_high:
            t[:n_high] = torch.randint(cfg.high_noise_from, n_t, (n_high,), generator=gen)
        t = t.to(device)
        xt = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, target)
        value = optimizer_step(opt, sched, loss, clip_params=params)
        if progress is not None:
            progress(step, {"loss": value})
    unet.eval()
    text_encoder.eval()
    return unet.cpu(), text_encoder.cpu(), scheduler


@torch.no_grad()
def generate(components, prompts: list[str], seeds: list[int], steps: int = 30, guidance: float = 2.5,
             batch_size: int = 256, progress=None) -> np.ndarray:
    """Classifier-free-guided DDIM with the ``t2i`` components (kit's T2IComponents) → (N, H, W, 3) uint8.

    Each row's starting noise comes from its own generator seeded by its seed (rows are independent).
    ``progress``: called with a line every 5 denoising steps of each batch (long runs on a CPU say where they are).
    """
    unet, vae, te, tok = components.unet, components.vae, components.text_encoder, components.tokenizer
    sched = components.scheduler
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i: i + batch_size], seeds[i: i + batch_size]
        cond = te(tokenize(tok, p).to(unet.device))[0]
        uncond = te(tokenize(tok, [""] * len(p)).to(unet.device))[0]
        size = unet.config.sample_size
        x = torch.stack([torch.randn(4, size, size, generator=torch.Generator().manual_seed(int(z))) for z in s])
        x = x.to(unet.device, unet.dtype) * sched.init_noise_sigma
        sched.set_timesteps(steps)
        ctx = torch.cat([uncond, cond]).to(unet.dtype)
        for k, t in enumerate(sched.timesteps, 1):
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
            if progress is not None and (k % 5 == 0 or k == len(sched.timesteps)):
                progress(f"  images {i + 1}–{i + len(p)} of {len(prompts)}: step {k}/{len(sched.timesteps)}")
        out.append(decode_latents(vae, x.float()))
    return np.concatenate(out)
