"""Recipe: CAFE's conditioned diffusion model (SPEC §2, D1).

Trains the whole t2i UNet (text encoder removed) plus the conditioner (CLIP projection, DINO projection,
per-layer DINO k/v) on (DINO patches of the input x, CLIP embedding of the target y) → y. Each condition is
dropped with its own probability (0.1 each, independently) by zeroing it. The loss is the MSE against the
scheduler's training target: ε for an ε-prediction UNet (SD2-base, the paper), v for a v-prediction one (the
synthetic world's). VAE, ``clip_cond`` and ``dino_cond`` stay frozen in their role dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data import schema
from training.encoders import row_generator, sample_latents
from training.models.conditioned import ConditionedUNet, drop_conditions
from training.trainers.base import Recipe, batch_features, condition_dims, load, load_encoders

WANT = ("latent_mean", "latent_std", "clip_target", "dino_input")


class DiffusionModule(nn.Module):
    def __init__(self, model: ConditionedUNet, scheduler):
        super().__init__()
        self.model = model
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")

    def forward(self, latents, noise, timesteps, clip, dino, drop_clip, drop_dino):
        dtype = self.model.clip_proj.weight.dtype
        z_t = self.scheduler.add_noise(latents, noise, timesteps)
        clip, dino = drop_conditions(clip, dino, drop_clip, drop_dino)
        out = self.model(z_t.to(dtype), timesteps, clip.to(dtype), dino.to(dtype), scale_dino=1.0)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        mse = F.mse_loss(out.float(), target.float())
        return {"loss": mse, "mse": mse}


class DiffusionRecipe(Recipe):
    name = "diffusion"
    features = WANT

    def setup(self, device: str = "cpu", encoders: bool = True, zero3_config: dict | None = None) -> "DiffusionRecipe":
        t2i = load("t2i", self.roles["t2i"], device)
        self.encoders = load_encoders(self.roles, device, WANT, t2i=t2i) if encoders else None
        clip_dim, dino_width = self._dims(device)
        unet = t2i.components.unet.float()  # trained: float32 (DeepSpeed keeps an fp32 master under bf16)
        with torch.random.fork_rng(devices=[]):  # new layers initialise the same on every worker and every run
            torch.manual_seed(0)
            model = ConditionedUNet.from_unet(unet, clip_dim, dino_width, self.section.n_clip_tokens).float()
        if getattr(self.section, "init_from", None):  # continue from exported weights (a local directory)
            model.load_state_dict(ConditionedUNet.load(self.section.init_from).state_dict())
        model = model.to(device)  # the new layers are created on the CPU
        model.requires_grad_(True)
        if getattr(self.section, "gradient_checkpointing", False):
            model.unet.enable_gradient_checkpointing()
        self.scheduler = t2i.components.scheduler
        self.scaling = float(getattr(t2i.components.vae.config, "scaling_factor", 0.18215))
        self.module = DiffusionModule(model, self.scheduler)
        return self

    def _dims(self, device: str) -> tuple[int, int]:
        if self.encoders is not None:
            return self.encoders.clip_dim, self.encoders.dino_width
        dims = condition_dims(self.roles)
        return dims["clip_dim"], dims["dino_width"]

    def prepare(self, batch: dict, epoch: int, seed: int) -> dict:
        feats = batch_features(batch, self.encoders, WANT)
        ids = [str(i) for i in batch[schema.ID]]
        n_train = self.scheduler.config.num_train_timesteps
        gens = {s: [row_generator(seed, epoch, i, s) for i in ids] for s in ("latent", "noise", "t", "drop")}
        latents = sample_latents(feats["latent_mean"], feats["latent_std"], gens["latent"], self.scaling)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens["noise"]])
        t = torch.stack([torch.randint(0, n_train, (), generator=g) for g in gens["t"]])
        u = torch.stack([torch.rand(2, generator=g) for g in gens["drop"]])  # (B, 2): clip, dino
        dev = next(self.module.parameters()).device
        return {"latents": latents.to(dev), "noise": noise.to(dev), "timesteps": t.to(dev),
                "clip": feats["clip_target"].to(dev), "dino": feats["dino_input"].to(dev),
                "drop_clip": (u[:, 0] < self.section.drop_clip).to(dev),
                "drop_dino": (u[:, 1] < self.section.drop_dino).to(dev)}

    def save_weights(self, module, out) -> None:
        module.model.save(out)
