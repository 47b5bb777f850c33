"""Recipe: PromptNet pre-training (SPEC §4.5), so ProFusion's generator can be trained on any domain.

Reference = target image; prompt ``"A photo of holder"`` (S* in the ``holder`` slot, no padding, as in
ProFusion's fine-tuning); loss: MSE of the frozen UNet's output against its training target (ε, or v for a
v-prediction UNet) with PromptNet the only trained module — UNet, text encoder, CLIP image encoder and VAE
frozen in their role dtypes. The result is written as a complete ``promptnet`` role directory (weights +
config + the image encoder it was trained with), usable as ``models.promptnet.path`` by ``cafe build``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data import schema
from training.encoders import images_to_tensor, row_generator
from training.methods.profusion import ProFusionGenerator
from training.trainers.base import Recipe, decode_image, load

IMAGE_COLUMN = "image"  # an image-folder source (ray.data.read_images)


class PromptNetModule(nn.Module):
    def __init__(self, generator: ProFusionGenerator, prompt: str, pad: bool = False):
        super().__init__()
        self.promptnet = generator.promptnet
        self.unet = generator.unet
        self.text_encoder = generator.text_encoder
        self.__dict__["generator"] = generator  # not a submodule: its modules are registered above
        self.prompt, self.pad = prompt, pad

    def forward(self, ref_latents, clip_hidden, latents, noise, timesteps):
        gen = self.generator
        dtype = self.promptnet.prompt_out.weight.dtype
        z_t = gen.scheduler.add_noise(latents, noise, timesteps)
        s_star = self.promptnet(ref_latents.to(dtype), z_t.to(dtype), timesteps, clip_hidden.to(dtype))
        hidden = gen.encode([self.prompt] * len(latents), s_star, pad=self.pad)
        out = self.unet(z_t.to(self.unet.dtype), timesteps, encoder_hidden_states=hidden.to(self.unet.dtype)).sample
        target = noise if gen.prediction_type == "epsilon" else gen.scheduler.get_velocity(latents, noise, timesteps)
        mse = F.mse_loss(out.float(), target.float())
        return {"loss": mse, "mse": mse}


class PromptNetRecipe(Recipe):
    name = "promptnet"

    def setup(self, device: str = "cpu", encoders: bool = True, zero3_config: dict | None = None) -> "PromptNetRecipe":
        t2i = load("t2i", self.roles["t2i"], device)
        pn = load("promptnet", self.roles["promptnet"], device)
        pn.components.promptnet.float().requires_grad_(True)  # trained: float32
        self.generator = ProFusionGenerator(t2i.components, pn.components, cfg=None, device=device)
        self.module = PromptNetModule(self.generator, self.section.prompt,
                                      pad=getattr(self.section, "context_padding", "none") == "max_length")
        return self

    def module_train_mode(self, module) -> None:
        module.train()
        module.unet.eval()
        module.text_encoder.eval()

    def images(self, batch: dict) -> list[np.ndarray]:
        column = IMAGE_COLUMN if IMAGE_COLUMN in batch else schema.INPUT_IMAGE
        return [decode_image(c) for c in batch[column]]

    def batch_rows(self, batch: dict) -> int:
        return len(next(iter(batch.values())))

    @staticmethod
    def row_ids(batch: dict) -> list[str]:
        if schema.ID in batch:
            return [str(i) for i in batch[schema.ID]]
        return [str(p) for p in batch["path"]]

    def prepare(self, batch: dict, epoch: int, seed: int) -> dict:
        gen = self.generator
        images = self.images(batch)
        for im in images:
            gen.check_source_size(*im.shape[:2])
        ids = self.row_ids(batch)
        pixels = images_to_tensor(images).to(gen.device)
        with torch.no_grad():
            latents = gen._encode_latents(pixels, [row_generator(seed, epoch, i, "latent") for i in ids]).float()
            clip_hidden = gen._clip_hidden(pixels).float()
        n_train = gen.scheduler.config.num_train_timesteps
        noise = torch.stack([torch.randn(latents.shape[1:], generator=row_generator(seed, epoch, i, "noise"))
                             for i in ids]).to(latents)
        t = torch.stack([torch.randint(0, n_train, (), generator=row_generator(seed, epoch, i, "t")) for i in ids])
        return {"ref_latents": latents, "clip_hidden": clip_hidden, "latents": latents, "noise": noise,
                "timesteps": t.to(latents.device)}

    def save_weights(self, module, out) -> None:
        from training.models.kit import save_promptnet

        out = Path(out)
        save_promptnet(module.promptnet, out)
        src = Path(self.roles["promptnet"].path) / "image_encoder"
        shutil.copytree(src, out / "image_encoder", dirs_exist_ok=True)
