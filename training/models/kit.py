"""The model kit: model roles → loaded models from local directories in their libraries' standard layouts.

Usage::

    from training.models.kit import load_role
    t2i = load_role("t2i", "models/tiny/t2i")          # -> LoadedRole; t2i.components.unet, ...

This is the single place that knows on-disk layouts. Every loader

* runs with the libraries' offline switches on (:mod:`training.models.offline`) and ``local_files_only``;
* reads safetensors only, and refuses a directory whose weights are only pickles (``.bin``, ``.pt``,
  ``.pth``, ``.ckpt``) *before* any library opens it (open_clip's ``local-dir:`` loader would otherwise
  fall back to ``torch.load``);
* checks every safetensors file's header against the file length (truncation / corruption), and after
  loading compares the model's state dict with the file's tensor names and shapes (config/weights
  mismatch), raising :class:`ModelLoadError` naming the role, the path and what was expected.

Layouts (paper-scale weights use the same ones):

============  ===========================================================================================
role          layout
============  ===========================================================================================
t2i           diffusers pipeline folder (SD2): ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
              ``tokenizer/``, ``scheduler/``
clip_filter   open_clip ``local-dir:``: ``open_clip_config.json`` + ``open_clip_model.safetensors``
dino_filter   transformers ``ViTModel`` (DINO ViT-S/16): ``config.json``, ``model.safetensors``,
              ``preprocessor_config.json``
clip_cond     transformers ``CLIPVisionModelWithProjection`` (ViT-L/14@336), same files
dino_cond     transformers ``Dinov2Model`` (DINOv2), same files
llm           transformers causal LM (Llama chat) + tokenizer files
dialogue_llm  as ``llm``
promptnet     :class:`training.models.promptnet.PromptNet`: ``config.json`` (its ``config`` dict:
              ``unet_config``, ``clip_vision_width``, ``text_width``, ``proj_channels``, ``latent_size``),
              ``promptnet.safetensors`` (its state dict) and ``image_encoder/`` (transformers
              ``CLIPVisionModel`` + ``preprocessor_config.json``); written by :func:`save_promptnet`
============  ===========================================================================================
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.models import offline  # noqa: F401  (must precede diffusers/transformers imports)
from training.models.fingerprint import fingerprint  # noqa: F401  (re-exported: kit.fingerprint)

import torch

from training.errors import ModelLoadError  # noqa: F401  (re-exported: defined torch-free)

from training.models.promptnet import PromptNet, clip_pixel_values

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPTNET_WEIGHTS = "promptnet"




@dataclass
class T2IComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


@dataclass
class OpenClipComponents:
    model: Any
    preprocess: Any
    tokenizer: Any


@dataclass
class VisionComponents:
    model: Any
    processor: Any


@dataclass
class CausalLMComponents:
    model: Any
    tokenizer: Any


@dataclass
class PromptNetComponents:
    promptnet: PromptNet
    image_encoder: Any  # transformers CLIPVisionModel
    image_processor: Any


@dataclass
class LoadedRole:
    role: str
    path: Path
    components: Any
    fingerprint: str
    load_seconds: float
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.modules.values() for p in m.parameters())

    @property
    def dtype(self) -> str:
        dtypes = {str(p.dtype).replace("torch.", "") for m in self.modules.values() for p in m.parameters()}
        return ",".join(sorted(dtypes))

    @property
    def class_name(self) -> str:
        return "+".join(type(m).__name__ for m in self.modules.values())


# ---------------------------------------------------------------------------------------------
# file checks (before any library opens anything)
# ---------------------------------------------------------------------------------------------


def _check_safetensors(role: str, path: Path) -> dict[str, tuple[str, list[int]]]:
    """Validate one safetensors file; return {tensor name: (dtype, shape)} from its header."""
    size = path.stat().st_size
    if size < 8:
        raise ModelLoadError(role, path, f"truncated or corrupt safetensors file ({size} bytes, no header)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise ModelLoadError(
                role, path, f"truncated or corrupt safetensors file (header claims {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(role, path, "truncated or corrupt safetensors file (header is not JSON)") from None
    data_len = size - 8 - header_len
    tensors = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = meta["data_offsets"]
            tensors[name] = (meta["dtype"], list(meta["shape"]))
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(role, path, f"corrupt safetensors header entry for {name!r}") from None
        end = max(end, stop)
    if end != data_len:
        raise ModelLoadError(
            role, path,
            f"truncated or corrupt safetensors file (tensors need {end} data bytes, file holds {data_len})",
        )
    return tensors


def _weights(role: str, directory: Path, stem: str) -> dict[str, tuple[str, list[int]]]:
    """Find ``stem.safetensors`` (or its sharded index) in ``directory``, check it, return its tensor table.

    Refuses pickle-only directories and names the file that was expected.
    """
    if not directory.is_dir():
        raise ModelLoadError(role, directory, "directory not found")
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ModelLoadError(role, index, "sharded index is not valid JSON with a 'weight_map'") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(role, f, f"shard listed in {index.name} is missing")
    else:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                role, directory,
                f"pickle-only checkpoint refused ({', '.join(pickles)}); expected {single.name}. "
                "Convert it to safetensors with an explicit converter first.",
            )
        raise ModelLoadError(role, directory, f"missing weights: expected {single.name}")
    table: dict[str, tuple[str, list[int]]] = {}
    for f in files:
        table.update(_check_safetensors(role, f))
    return table


def _require(role: str, directory: Path, *names: str) -> None:
    if not directory.is_dir():
        raise ModelLoadError(role, directory, "directory not found")
    for name in names:
        if not (directory / name).is_file():
            raise ModelLoadError(role, directory / name, f"missing file: expected {name}")


def _compare_state(role: str, path: Path, module: torch.nn.Module, table: dict, prefix: str = "") -> None:
    """Raise if the loaded module's parameters/buffers disagree with the file's tensors (names, shapes)."""
    state = module.state_dict()
    file_keys = {k[len(prefix):] if k.startswith(prefix) else k for k in table}
    missing = []
    seen_ptrs = {state[k].data_ptr() for k in state if k in file_keys and state[k].numel()}
    for k, v in state.items():
        if k not in file_keys and not (v.numel() and v.data_ptr() in seen_ptrs):  # tied weights are fine
            missing.append(k)
    unexpected = sorted(file_keys - set(state))
    wrong = []
    for k in set(state) & file_keys:
        file_shape = table.get(prefix + k, table.get(k))[1]
        if list(state[k].shape) != list(file_shape):
            wrong.append(f"{k}: file {file_shape} vs config {list(state[k].shape)}")
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) the config expects are absent, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) in the file the config does not know, e.g. {unexpected[0]}")
        raise ModelLoadError(role, path, "config/weights mismatch: " + "; ".join(parts))


def _hf_load(role: str, path: Path, cls, **kwargs):
    """``cls.from_pretrained`` (transformers or diffusers) that fails on any missing/unexpected/mismatched key.

    transformers 5 renames checkpoint keys while loading (conversion mappings), so the file's tensor names
    are compared by the library itself: its loading info is the authority here.
    """
    kwargs.update(local_files_only=True, use_safetensors=True, output_loading_info=True)
    model, info = _library_call(role, path, cls.from_pretrained, path, **kwargs)
    parts = []
    for key, what in (("mismatched_keys", "shape mismatch(es)"),
                      ("missing_keys", "tensor(s) the config expects are absent"),
                      ("unexpected_keys", "tensor(s) in the file the config does not know")):
        items = sorted(map(str, info.get(key) or []))
        if items:
            parts.append(f"{len(items)} {what}, e.g. {items[0]}")
    if info.get("error_msgs"):
        parts.append("; ".join(map(str, info["error_msgs"]))[:300])
    if parts:
        raise ModelLoadError(role, path, "config/weights mismatch: " + "; ".join(parts))
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------
# loaders, one per layout
# ---------------------------------------------------------------------------------------------


def _library_call(role: str, path: Path, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # the library's own message, wrapped with the role and the path
        raise ModelLoadError(role, path, f"{type(exc).__name__}: {exc}") from exc


def _load_t2i(role: str, d: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _require(role, d, "model_index.json")
    _require(role, d / "scheduler", "scheduler_config.json")
    _require(role, d / "tokenizer", "tokenizer_config.json")
    if not (d / "tokenizer" / "tokenizer.json").is_file():
        _require(role, d / "tokenizer", "vocab.json", "merges.txt")
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        _require(role, d / sub, "config.json")
        _weights(role, d / sub, stem)
    unet = _hf_load(role, d / "unet", UNet2DConditionModel, torch_dtype=dtype)
    vae = _hf_load(role, d / "vae", AutoencoderKL, torch_dtype=dtype)
    text_encoder = _hf_load(role, d / "text_encoder", CLIPTextModel, dtype=dtype)
    tokenizer = _library_call(role, d / "tokenizer", CLIPTokenizer.from_pretrained, d / "tokenizer",
                              local_files_only=True)
    scheduler = _library_call(role, d / "scheduler", DDIMScheduler.from_pretrained, d / "scheduler",
                              local_files_only=True)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    if text_encoder.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ModelLoadError(role, d, f"config/weights mismatch: tokenizer has {len(tokenizer)} tokens, "
                             f"text encoder embeds {text_encoder.get_input_embeddings().num_embeddings}")
    return T2IComponents(unet, vae, text_encoder, tokenizer, scheduler), modules


_OPEN_CLIP_WEIGHTS = ("open_clip_model", "open_clip_pytorch_model", "model")


def _load_open_clip(role: str, d: Path, dtype: torch.dtype):
    import open_clip

    _require(role, d, "open_clip_config.json")
    table = None
    for stem in _OPEN_CLIP_WEIGHTS:
        if (d / f"{stem}.safetensors").is_file():
            table = _weights(role, d, stem)
            break
    if table is None:
        _weights(role, d, _OPEN_CLIP_WEIGHTS[0])  # raises: pickle-only or missing, with the expected name
    model, _, preprocess = _library_call(
        role, d, open_clip.create_model_and_transforms, f"local-dir:{d}", precision="fp32"
    )
    tokenizer = _library_call(role, d, open_clip.get_tokenizer, f"local-dir:{d}")
    model = model.to(dtype).eval()
    _compare_state(role, d, model, table)
    return OpenClipComponents(model, preprocess, tokenizer), {"model": model}


def _load_vision(cls_name: str):
    def load(role: str, d: Path, dtype: torch.dtype):
        import transformers
        from transformers import AutoImageProcessor

        _require(role, d, "config.json", "preprocessor_config.json")
        _weights(role, d, "model")
        kw = {"add_pooling_layer": False} if cls_name == "ViTModel" else {}
        model = _hf_load(role, d, getattr(transformers, cls_name), dtype=dtype, **kw).eval()
        processor = _library_call(role, d, AutoImageProcessor.from_pretrained, d, local_files_only=True)
        return VisionComponents(model, processor), {"model": model}

    return load


def _load_causal_lm(role: str, d: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require(role, d, "config.json", "tokenizer_config.json")
    _weights(role, d, "model")
    model = _hf_load(role, d, AutoModelForCausalLM, dtype=dtype).eval()
    tokenizer = _library_call(role, d, AutoTokenizer.from_pretrained, d, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ModelLoadError(role, d, f"config/weights mismatch: tokenizer has {len(tokenizer)} tokens, "
                             f"model embeds {model.get_input_embeddings().num_embeddings}")
    return CausalLMComponents(model, tokenizer), {"model": model}


def save_promptnet(net: PromptNet, out: Path) -> None:
    """Write ``net`` in the ``promptnet`` layout (``config.json`` + ``promptnet.safetensors``) under ``out``.

    The caller adds ``out/image_encoder/`` and writes ``out`` under a temporary name if it needs atomicity.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(net.config, indent=2, default=list))
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
              str(out / f"{PROMPTNET_WEIGHTS}.safetensors"))


def load_promptnet_dir(role: str, d: Path, dtype: torch.dtype):
    """Loader for the ``promptnet`` role: :class:`PromptNet` + its CLIP vision encoder and image processor."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPVisionModel

    _require(role, d, "config.json")
    table = _weights(role, d, PROMPTNET_WEIGHTS)
    try:
        cfg = json.loads((d / "config.json").read_text())
        net = PromptNet(cfg["unet_config"], cfg["clip_vision_width"], cfg["text_width"],
                        cfg.get("proj_channels", 128), cfg.get("latent_size"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(role, d / "config.json", f"invalid PromptNet config: {exc}") from None
    _compare_state(role, d, net, table)
    net.load_state_dict(load_file(str(d / f"{PROMPTNET_WEIGHTS}.safetensors")), strict=True)
    net = net.to(dtype).eval()
    enc_dir = d / "image_encoder"
    _require(role, enc_dir, "config.json", "preprocessor_config.json")
    _weights(role, enc_dir, "model")
    enc = _hf_load(role, enc_dir, CLIPVisionModel, dtype=dtype).eval()
    if enc.config.hidden_size != net.config["clip_vision_width"]:
        raise ModelLoadError(role, d, f"config/weights mismatch: image encoder width {enc.config.hidden_size} "
                             f"!= PromptNet clip_vision_width {net.config['clip_vision_width']}")
    processor = _library_call(role, enc_dir, AutoImageProcessor.from_pretrained, enc_dir, local_files_only=True)
    return PromptNetComponents(net, enc, processor), {"promptnet": net, "image_encoder": enc}


LOADERS = {
    "t2i": _load_t2i,
    "clip_filter": _load_open_clip,
    "dino_filter": _load_vision("ViTModel"),
    "clip_cond": _load_vision("CLIPVisionModelWithProjection"),
    "dino_cond": _load_vision("Dinov2Model"),
    "llm": _load_causal_lm,
    "dialogue_llm": _load_causal_lm,
    "promptnet": load_promptnet_dir,
}


def load_role(role: str, path: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> LoadedRole:
    """Load one role from ``path``; raise :class:`ModelLoadError` for any unusable directory."""
    if role not in LOADERS:
        raise ValueError(f"unknown model role {role!r}; allowed: {', '.join(LOADERS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not allowed; allowed: {', '.join(_DTYPES)}")
    d = Path(path)
    if not d.is_dir():
        raise ModelLoadError(role, d, "directory not found")
    t0 = time.perf_counter()
    components, modules = LOADERS[role](role, d, _DTYPES[dtype])
    dev = resolve_device(device)
    for m in modules.values():
        m.to(dev)
        m.requires_grad_(False)
        m.eval()
    seconds = time.perf_counter() - t0
    return LoadedRole(role, d, components, fingerprint(d), seconds, modules)


def load_from_config(models_cfg, role: str) -> LoadedRole:
    """Load ``role`` as ``models_cfg`` (a :class:`pipeline.config.ModelsConfig`-shaped object) places it."""
    spec = models_cfg.role_spec(role)
    return load_role(role, models_cfg.role_dir(role), dtype=spec.dtype, device=spec.device)


# ---------------------------------------------------------------------------------------------
# one forward pass per role (``cafe models check``)
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def smoke_forward(loaded: LoadedRole) -> dict[str, tuple[int, ...]]:
    """Run one small forward pass; return output name → shape."""
    c = loaded.components
    role = loaded.role
    if role == "t2i":
        dev = c.unet.device
        ids = c.tokenizer(["a photo of a cat"], padding="max_length", truncation=True,
                          max_length=c.tokenizer.model_max_length, return_tensors="pt").input_ids.to(dev)
        hidden = c.text_encoder(ids)[0]
        size = c.unet.config.sample_size
        latents = torch.randn(1, c.unet.config.in_channels, size, size, device=dev, dtype=c.unet.dtype)
        eps = c.unet(latents, torch.tensor([10], device=dev), encoder_hidden_states=hidden.to(c.unet.dtype)).sample
        image = c.vae.decode(latents[:, : c.vae.config.latent_channels].to(c.vae.dtype)).sample
        return {"text_hidden": tuple(hidden.shape), "eps": tuple(eps.shape), "image": tuple(image.shape)}
    if role == "clip_filter":
        size = c.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        dev = next(c.model.parameters()).device
        img = c.model.encode_image(torch.zeros(1, 3, size, size, device=dev), normalize=True)
        txt = c.model.encode_text(c.tokenizer(["a photo of a cat"]).to(dev), normalize=True)
        return {"image_embed": tuple(img.shape), "text_embed": tuple(txt.shape)}
    if role in ("dino_filter", "clip_cond", "dino_cond"):
        from PIL import Image

        pix = c.processor(images=[Image.new("RGB", (80, 64), (128, 64, 32))], return_tensors="pt").pixel_values
        out = c.model(pixel_values=pix.to(c.model.device, c.model.dtype))
        shapes = {"last_hidden_state": tuple(out.last_hidden_state.shape)}
        if getattr(out, "image_embeds", None) is not None:
            shapes["image_embeds"] = tuple(out.image_embeds.shape)
        return shapes
    if role in ("llm", "dialogue_llm"):
        enc = c.tokenizer(["a photo of a cat"], return_tensors="pt").to(c.model.device)
        logits = c.model(**enc).logits
        return {"logits": tuple(logits.shape)}
    if role == "promptnet":
        return smoke_forward_promptnet(c)
    raise ValueError(f"unknown role {role!r}")


def smoke_forward_promptnet(c: PromptNetComponents) -> dict[str, tuple[int, ...]]:
    """CLIP vision tokens of a blank image → one S* token from zero latents."""
    clip_size = c.image_encoder.config.image_size
    pix = clip_pixel_values(torch.zeros(1, 3, clip_size, clip_size), clip_size, c.image_processor.image_mean,
                            c.image_processor.image_std)
    hidden = c.image_encoder(pixel_values=pix.to(c.image_encoder.dtype)).last_hidden_state  # (1, 1+P, width)
    size = c.promptnet.latent_size
    lat = torch.zeros(1, c.promptnet.unet.config.in_channels, size, size, dtype=hidden.dtype)
    s = c.promptnet(lat, lat, torch.tensor([500]), hidden)  # (1, 1, text_width)
    return {"clip_hidden": tuple(hidden.shape), "s_star": tuple(s.shape)}
