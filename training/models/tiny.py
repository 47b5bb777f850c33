"""Write a complete, seeded tiny set of every model role in the real on-disk layouts (``cafe models make-tiny``).

Usage::

    from training.models.tiny import make_tiny
    make_tiny("models/tiny", seed=0)

Every role is a real library class at a tiny config, saved with its library's own ``save_pretrained``
(or open_clip's ``local-dir:`` layout) as safetensors, so that :mod:`training.models.kit` loads it with
exactly the code that loads paper-scale weights. Tokenizers are built offline by code:

* the ``t2i`` CLIP tokenizer is the real CLIP BPE (the vocabulary file open_clip ships) cut to its first
  ``TINY_CLIP_MERGES`` merges, with merges appended so that every word of :data:`TINY_WORDS` is one token;
* the Llama tokenizers are byte-level BPEs trained in-process on :data:`TINY_CORPUS`.

Image size is 64×64 everywhere (VAE scale factor 2 → 32×32 latents), so a CPU test run stays fast.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from training.models import offline  # noqa: F401  (sets the libraries' offline switches first)
from training.models.kit import save_promptnet
from training.models.promptnet import PromptNet

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
TINY_CLIP_MERGES = 4000
#: words that must be single tokens in the tiny CLIP BPE (``holder`` is where ProFusion's S* goes)
TINY_WORDS = (
    "a", "an", "the", "photo", "of", "holder", "in", "on", "with", "and", "person", "cat", "dog", "car",
    "face", "man", "woman", "style", "comic", "book", "beach", "wearing", "red", "hat", "realistic",
    "picture", "new1", "new2", "new3",
)
TINY_CORPUS = [
    "Generate an image for this person in comic book style.",
    "Can you generate an image of this cat on the beach?",
    "Here is the picture you asked for: the dog wearing a red hat.",
    "I made the photo realistic, with sharp focus and soft light.",
    '{"user": "Make this face smile.", "assistant": "Here it is, smiling."}',
    "<|user|> hello <|assistant|> hi, how can I help with your image?",
] * 4

TINY_LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# open_clip config of the tiny `clip_filter` (open_clip CLIP class, ViT tower)
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _clip_bpe_vocab(num_merges: int = TINY_CLIP_MERGES, words=TINY_WORDS):
    """Return (vocab dict, merges list of tuples) of a truncated CLIP BPE where ``words`` are single tokens."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines[:num_merges]]
    ranks = {m: i for i, m in enumerate(merges)}

    def bpe(word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
        return parts

    for word in words:
        parts = bpe(word)
        while len(parts) > 1:  # append merges left to right until the word is one token
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_clip_tokenizer(max_length: int = 77, words=TINY_WORDS, num_merges: int = TINY_CLIP_MERGES):
    """Tiny offline ``CLIPTokenizer`` (transformers), CLIP BPE format; every one of ``words`` is one token."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe_vocab(num_merges, words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_llama_tokenizer():
    """Tiny byte-level BPE for the Llama roles, trained in-process (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TINY_CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = TINY_LLAMA_CHAT_TEMPLATE
    return tokenizer


def _write_t2i(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE, norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_bpe_files(out / "tokenizer")


def write_clip_bpe_files(tokenizer_dir: Path, num_merges: int = TINY_CLIP_MERGES, words=TINY_WORDS) -> None:
    """The published SD2 layout ships the CLIP BPE as vocab.json + merges.txt: write them beside the tokenizer."""
    vocab, merges = _clip_bpe_vocab(num_merges, words)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tokenizer_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )


def write_open_clip_dir(out: Path, model_cfg: dict, seed: int = 0) -> int:
    """Write a seeded open_clip ``CLIP(**model_cfg)`` in the ``local-dir:`` layout; return its parameter count."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": model_cfg["vision_cfg"]["image_size"],
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return sum(p.numel() for p in model.parameters())


def _write_open_clip(out: Path, seed: int) -> None:
    write_open_clip_dir(out, TINY_OPEN_CLIP_CFG, seed)


def image_processor_kwargs(mean, std, center_crop: bool = False, size: int = IMAGE_SIZE) -> dict:
    """Resize to size² (or shortest side + centre crop, as CLIP/DINOv2 processors do), bicubic, normalise."""
    kw = dict(do_resize=True, size={"height": size, "width": size}, do_center_crop=False,
              do_rescale=True, do_normalize=True, image_mean=list(mean), image_std=list(std), resample=3)
    if center_crop:
        kw.update(size={"shortest_edge": size}, do_center_crop=True, crop_size={"height": size, "width": size})
    return kw


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _write_dino_filter(out: Path, seed: int) -> None:
    """DINO ViT-S/16 is a transformers ``ViTModel`` (no pooler); its CLS token is the embedding."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(
        ViTConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=128),
        add_pooling_layer=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(**image_processor_kwargs(IMAGENET_MEAN, IMAGENET_STD)).save_pretrained(out)


def _write_clip_cond(out: Path, seed: int) -> None:
    """CLIP vision tower with projection (ViT-L/14@336 in the paper): patches + global embedding."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    )
    model.save_pretrained(out, safe_serialization=True)
    kw = image_processor_kwargs(OPENAI_MEAN, OPENAI_STD, center_crop=True)
    CLIPImageProcessor(**kw).save_pretrained(out)


def _write_dino_cond(out: Path, seed: int) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(
        Dinov2Config(image_size=IMAGE_SIZE, patch_size=16, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=128)
    )
    model.save_pretrained(out, safe_serialization=True)
    kw = image_processor_kwargs(IMAGENET_MEAN, IMAGENET_STD, center_crop=True)
    BitImageProcessor(**kw).save_pretrained(out)


def _write_llama(out: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_llama_tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def write_tiny_promptnet(out: Path, seed: int, t2i_dir: Path) -> None:
    """Tiny PromptNet initialised from the tiny ``t2i`` UNet, plus a tiny CLIP vision encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(t2i_dir / "unet", local_files_only=True, use_safetensors=True)
    enc = CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=48,
                                           intermediate_size=96, num_hidden_layers=2, num_attention_heads=2))
    text_width = unet.config.cross_attention_dim
    net = PromptNet.from_unet(unet, clip_vision_width=enc.config.hidden_size, text_width=text_width,
                              proj_channels=16)
    save_promptnet(net, out)
    enc.save_pretrained(out / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=True,
                       image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD), resample=3,
                       ).save_pretrained(out / "image_encoder")


TINY_WRITERS = {
    "t2i": _write_t2i,
    "clip_filter": _write_open_clip,
    "dino_filter": _write_dino_filter,
    "clip_cond": _write_clip_cond,
    "dino_cond": _write_dino_cond,
    "llm": _write_llama,
    "dialogue_llm": _write_llama,
}


def make_tiny(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write every role's tiny checkpoint under ``out_dir/<role>``; return role → directory.

    Each role is written to a temporary sibling and renamed into place, so an interrupted run never
    leaves a half-written role behind. Existing roles are kept unless ``overwrite``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    roles = list(TINY_WRITERS) + ["promptnet"]
    for i, role in enumerate(roles):
        final = out / role
        if final.exists() and not overwrite:
            log.info("make-tiny: %s exists, kept", final)
            written[role] = final
            continue
        tmp = out / f".{role}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        role_seed = seed * 1000 + i  # distinct, reproducible weights per role
        if role == "promptnet":
            write_tiny_promptnet(tmp, role_seed, out / "t2i")
        else:
            TINY_WRITERS[role](tmp, role_seed)
        (tmp / "cafe_tiny.json").write_text(json.dumps({"role": role, "seed": role_seed}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        log.info("make-tiny: wrote %s", final)
        written[role] = final
    return written
