"""Explicit converter: the authors' released PromptNet checkpoint (drboog/ProFusion) → our ``promptnet`` layout.

Usage::

    from training.models.convert_promptnet import convert_authors_checkpoint
    convert_authors_checkpoint("promptnet.bin", "models/sd2-base", "models/clip-vit-h-14-vision", "models/promptnet")

(``cafe models convert-promptnet``.) The key mapping and its sources are in
``docs/profusion_checkpoint_mapping.md``. This is the only module that opens a pickle, with
``torch.load(weights_only=True)``; the model kit's loaders refuse pickles.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from training.models.kit import save_promptnet
from training.models.promptnet import PromptNet

#: authors' key prefix → ours (longest prefixes first); residual projections are unused (res_scale = 0)
AUTHORS_KEY_MAP = (
    ("promptnet_cond_embedding.conv_in.", "cond_embedding.0."),
    ("promptnet_cond_embedding.conv_out.", "cond_embedding.2."),
    ("first_prompt_projection.", "prompt_projections.0."),
    ("down_prompt_projections.0.", "prompt_projections.1."),
    ("down_prompt_projections.1.", "prompt_projections.2."),
    ("down_prompt_projections.2.", "prompt_projections.3."),
    ("down_prompt_projections.3.", "prompt_projections.4."),
    ("mid_prompt_projection.", "prompt_projections.5."),
    ("region_prompt_output.", "prompt_out."),
    ("vision_embedding.", "vision_embedding."),
    ("conv_in.", "unet.conv_in."),
    ("time_embedding.", "unet.time_embedding."),
    ("down_blocks.", "unet.down_blocks."),
    ("mid_block.", "unet.mid_block."),
)
AUTHORS_DROPPED_PREFIXES = ("residual_projections.", "residual_projections_2.", "mid_residual_projection.",
                            "mid_residual_projection_2.")


def convert_authors_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the authors' PromptNet keys to ours; drop the unused residual projections; refuse unknown keys."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(AUTHORS_DROPPED_PREFIXES):
            continue
        for theirs, ours in AUTHORS_KEY_MAP:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown PromptNet keys in the authors' checkpoint, e.g. {unknown[:3]}")
    return out


def convert_authors_checkpoint(src: str | Path, t2i_dir: str | Path, image_encoder_dir: str | Path,
                               out_dir: str | Path) -> Path:
    """The authors' PromptNet weights (+ a CLIP vision dir) → our ``promptnet`` role layout in ``out_dir``.

    ``src`` is a ``.safetensors`` file or a pickle checkpoint (``.bin``/``.pt``), the latter read with
    ``torch.load(weights_only=True)``.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    src = Path(src)
    state = load_file(str(src)) if src.suffix == ".safetensors" else torch.load(src, map_location="cpu",
                                                                                weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    unet_config = UNet2DConditionModel.load_config(str(Path(t2i_dir) / "unet"), local_files_only=True)
    vision = CLIPVisionConfig.from_pretrained(str(image_encoder_dir), local_files_only=True)
    net = PromptNet(unet_config, clip_vision_width=vision.hidden_size,
                    text_width=unet_config["cross_attention_dim"], proj_channels=128)
    net.load_state_dict(convert_authors_state_dict(state), strict=True)
    out = Path(out_dir)
    save_promptnet(net, out)
    shutil.copytree(image_encoder_dir, out / "image_encoder", dirs_exist_ok=True)
    return out
