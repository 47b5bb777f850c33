"""EM concept masks (SPEC §4.4, D7): learn K new tokens and their masks together, from images without masks.

Usage::

    concept = train_em(t2i, [scene], EmParams(tokens=("[v1]", "[v2]"), init="word", init_words=("star", "heart")),
                       seed=0, gt_masks={"[v1]": star_mask, "[v2]": heart_mask})   # gt: evaluation only
    concept.save("out/scene")          # em.safetensors, em_unet_delta.safetensors, em.json, masks/*.png, figure
    images = sample(t2i, EmConcept.load("out/scene"), ["a photo of [v1] and [v2] on a striped background"], [0])
    labels, masks = concept_masks(t2i, concept, other_image)            # the learned tokens' masks on any image

Method ("Visual Concept-driven Image Generation with Text-to-Image Diffusion Model", on Break-A-Scene): the
masks are the E-step, the tokens (and in stage 3 the UNet) the M-step.

* **Mask extraction** (:func:`extract_token_maps`, :func:`masks_from_maps`): the prompt names every token of the
  image; ``mask_timesteps`` random timesteps with fresh noise; the cross-attention probabilities of each token,
  averaged over heads, over the attn2 layers (``layers``: all, each resized to ``attn_res``, or only the layers
  of one native side) and over the timesteps; max-normalised per token; thresholded (``threshold``); upsampled and
  refined by DenseCRF (:func:`crf_labels`; pydensecrf with CutLER's parameters). The unary is CutLER's
  ``[1 − fg, fg]`` generalised to K labels: ``[background, token_1 … token_K]`` with background
  ``1 − max_k(token_k)``, upsampled bilinearly to the image, softmaxed over labels; the CRF's argmax labels every
  pixel once, so overlapping maps are resolved by the CRF. A background *token* is one of the K labels.
  ``crf=False`` takes the argmax of the same label probabilities without the pairwise terms (the baseline).
* **Losses** (:func:`masked_diffusion_loss`, :func:`attention_loss`): ``mean(((ŷ − y)·M∪)²)`` over all elements,
  with M∪ the union of the prompt's token masks resized (nearest) to the latent; plus ``attn_weight`` ×
  ``Σ_k mean((A_k / max A_k − M_k)²) / B`` with the masks resized (nearest) to ``attn_res``. Each row's prompt
  names a random non-empty subset of its image's tokens, in random order: ``prompt.format("[v1] and [v2]")``.
* **Schedule**: stage 1 initialises the tokens (``init``: a word's embedding, a random draw with the
  vocabulary's per-dimension mean/std, or ``init_steps`` steps of unmasked inversion) and estimates the masks;
  stage 2 trains the tokens with both losses under fixed masks and re-estimates them every ``reestimate_every``
  steps (1 = seed 003's every step); stage 3 trains tokens + UNet (``unet_params``) with the masks fixed. Each
  stage has its own AdamW (weight decay ``weight_decay``), gradients are clipped to ``grad_clip``.

Decisions (SPEC silent): training latents are the VAE posterior means (as ICO and Infusion here); the image is
flipped with p ``flip_p`` together with its masks; mask estimation uses the unflipped image. The UNet delta is
saved in float16 (its magnitude at lr 2e-6 is far above fp16's resolution at that scale; the base is not stored).
No prior preservation yet (Break-A-Scene's "a photo at the beach" prior is not implemented).

The base model is never mutated: the tokens are spliced into the token-embedding output (ICO's mechanism),
stage 3 trains a float32 copy of the UNet, gradients come from ``torch.autograd.grad`` w.r.t. the trained
tensors only, and every random draw comes from the job's ``torch.Generator``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training.attention.em import AttentionStore, capturing
from training.methods.ico import (decode_latents, encode_prompts, encode_spliced, guided, image_size, inference_prompt_ids,
                                  initial_latents, make_scheduler, preprocess_images, vae_scaling)
from training.methods.params import EmParams  # noqa: F401  (re-exported)

WEIGHTS_FILE = "em.safetensors"
DELTA_FILE = "em_unet_delta.safetensors"
META_FILE = "em.json"
FIGURE_FILE = "mask_history.png"
FORMAT = "em/1"
MASK_CHUNK = 10  # UNet rows per call when estimating masks
FIGURE_SNAPSHOTS = 8
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- masks


def label_probabilities(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(K+1, H, W) float32 label probabilities from K token maps (K, h, w) in [0, 1] (usually thresholded).

    CutLER's unary generalised to K labels: ``[1 − max_k fg_k, fg_1 … fg_K]`` upsampled bilinearly to ``size``
    and softmaxed over the label axis (for K = 1 exactly CutLER's ``[1 − fg, fg]``).
    """
    fg = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if fg.ndim != 3 or fg.shape[0] < 1:
        raise ValueError(f"maps: shape {tuple(fg.shape)}; allowed: (K ≥ 1, h, w)")
    logits = torch.cat([1 - fg.max(dim=0, keepdim=True).values, fg])  # (K+1, h, w)
    up = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return torch.softmax(up, dim=0).numpy()


def crf_labels(image: np.ndarray, probs: np.ndarray, params: EmParams) -> np.ndarray:
    """DenseCRF (pydensecrf) labels (H, W) int64 in 0..K of ``image`` (H, W, 3) uint8 from ``probs`` (K+1, H, W).

    The spatial widths (sxy) are CutLER's in pixels, or — with ``crf_reference_size`` — scaled by the image's side
    over that size (the parameters were set for natural images of about 512 px; at 32 px a bilateral sxy of 50
    spans the whole image).
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image: shape {image.shape} dtype {image.dtype}; allowed: ({h}, {w}, 3) uint8")
    scale = 1.0 if params.crf_reference_size is None else max(h, w) / params.crf_reference_size
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=params.crf_gaussian_sxy * scale, compat=params.crf_gaussian_compat)
    d.addPairwiseBilateral(sxy=params.crf_bilateral_sxy * scale, srgb=params.crf_bilateral_srgb,
                           rgbim=np.ascontiguousarray(image), compat=params.crf_bilateral_compat)
    q = np.array(d.inference(params.crf_iterations))
    return np.argmax(q, axis=0).reshape(h, w).astype(np.int64)


def masks_from_maps(image: np.ndarray, maps: np.ndarray, params: EmParams) -> tuple[np.ndarray, np.ndarray]:
    """Max-normalised token maps (K, r, r) → ``(labels (H, W) in 0..K, masks (K, H, W) bool)``.

    Thresholded at ``params.threshold``, then the K-label unary and DenseCRF (or, with ``crf=False``, the argmax
    of the unary alone). Label 0 is "no token"; ``masks[k] = labels == k + 1``.
    """
    binary = (np.asarray(maps) >= params.threshold).astype(np.float32)
    probs = label_probabilities(binary, image.shape[:2])
    labels = crf_labels(image, probs, params) if params.crf else np.argmax(probs, axis=0).astype(np.int64)
    return labels, np.stack([labels == k + 1 for k in range(binary.shape[0])])


def normalise_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``(..., r, r)`` divided by its maximum (so its maximum is 1)."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


def token_columns(layout, tokens: Sequence[str], wanted: Sequence[int]) -> list[int]:
    """Text positions of the tokens ``wanted`` (indices into ``tokens``) in a parsed prompt layout.

    Raises:
        ValueError: a wanted token does not occur in the prompt (an absent token has no map, not an empty one).
    """
    cols = []
    for k in wanted:
        hits = [pos for pos, idx in zip(layout.new, layout.new_index) if idx == k]
        if not hits:
            raise ValueError(f"token {tokens[k]!r} does not occur in the prompt: it has no attention map")
        cols.append(hits[0])
    return cols


# ----------------------------------------------------------------------------------------- losses


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean(((pred − target)·mask)²)`` over all elements; ``mask`` (B, 1, h, w) broadcasts over channels."""
    return F.mse_loss(pred.float() * mask, target.float() * mask, reduction="mean")


def attention_loss(maps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """``Σ_k mean((A_k / max A_k − M_k)²) / batch`` over the (row, token) pairs given as lists of (r, r) maps."""
    total = sum(F.mse_loss(normalise_max(a.float()), m.float(), reduction="mean") for a, m in zip(maps, masks))
    return total / batch


# ----------------------------------------------------------------------------------------- the concept


@dataclass
class EmConcept:
    """Trained EM state: token rows (K, D) float32, the UNet delta (trained − base, per parameter), masks."""

    tokens: list[str]
    background_tokens: list[str]
    embeddings: torch.Tensor
    unet_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: np.ndarray | None = None           # (K, H, W) bool, the final masks on each token's image
    token_images: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)   # per estimation: step, stage, area and IoU per token
    losses: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    base_fingerprint: str | None = None
    snapshots: list[tuple[int, np.ndarray]] = field(default_factory=list, repr=False)  # (step, labels) for the figure
    images: list[np.ndarray] = field(default_factory=list, repr=False)
    _unet_cache: dict = field(default_factory=dict, repr=False)

    @property
    def new_embeddings(self) -> torch.Tensor:
        """The token rows under ICO's name, so :func:`training.methods.ico.encode_prompts` splices them."""
        return self.embeddings

    @property
    def subjects(self) -> list[str]:
        return [t for t in self.tokens if t not in self.background_tokens]

    def phrase(self) -> str:
        """The subject tokens joined as a prompt phrase: ``"[v1] and [v2]"``."""
        return " and ".join(self.subjects)

    def unet_for(self, unet):
        """The base UNet with the delta added (a cached copy), or ``unet`` itself without a delta."""
        if not self.unet_delta:
            return unet
        key = id(unet)
        if key not in self._unet_cache:
            patched = copy.deepcopy(unet)
            params = dict(patched.named_parameters())
            with torch.no_grad():
                for name, delta in self.unet_delta.items():
                    p = params[name]
                    p.copy_((p.float() + delta.to(p.device, torch.float32)).to(p.dtype))
            self._unet_cache = {key: patched}
        return self._unet_cache[key]

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write tokens, UNet delta (safetensors), ``em.json``, ``masks/*.png`` and the mask-history figure."""
        from PIL import Image
        from safetensors.torch import save_file

        d = Path(directory)
        (d / "masks").mkdir(parents=True, exist_ok=True)
        written = []

        def put_tensors(name: str, tensors: dict, fmt: str) -> None:
            tmp = d / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata={"format": fmt})
            os.replace(tmp, d / name)
            written.append(str(d / name))

        put_tensors(WEIGHTS_FILE, {"embeddings": self.embeddings.detach().to("cpu", torch.float32).contiguous()}, FORMAT)
        if self.unet_delta:
            put_tensors(DELTA_FILE, {n: t.detach().to("cpu", torch.float16).contiguous()
                                     for n, t in self.unet_delta.items()}, FORMAT + "-unet-delta")
        if self.masks is not None:
            for k, token in enumerate(self.tokens):
                path = d / "masks" / f"{k:02d}.png"
                Image.fromarray(self.masks[k].astype(np.uint8) * 255).save(path)
                written.append(str(path))
        if self.snapshots and self.images:
            path = d / FIGURE_FILE
            mask_history_figure(self.images, self.token_images, self.tokens, self.snapshots).save(path)
            written.append(str(path))
        meta = {"format": FORMAT, "tokens": self.tokens, "background_tokens": self.background_tokens,
                "token_images": self.token_images, "mask_files": [f"masks/{k:02d}.png" for k in range(len(self.tokens))],
                "unet_delta": sorted(self.unet_delta), "history": self.history, "losses": self.losses,
                "params": self.params, "base_fingerprint": self.base_fingerprint}
        tmp = d / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, d / META_FILE)
        written.append(str(d / META_FILE))
        return written

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "EmConcept":
        """Read a concept written by :meth:`save` (safetensors only)."""
        from PIL import Image
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d / META_FILE}: format {meta.get('format')!r}; allowed: {FORMAT}")
        emb = load_file(str(d / WEIGHTS_FILE))["embeddings"]
        if emb.shape[0] != len(meta["tokens"]):
            raise ValueError(f"{d / WEIGHTS_FILE}: {emb.shape[0]} rows for {len(meta['tokens'])} tokens")
        delta = load_file(str(d / DELTA_FILE)) if meta.get("unet_delta") else {}
        masks = None
        if all((d / f).is_file() for f in meta.get("mask_files", [])) and meta.get("mask_files"):
            masks = np.stack([np.asarray(Image.open(d / f)) > 127 for f in meta["mask_files"]])
        return cls(tokens=list(meta["tokens"]), background_tokens=list(meta["background_tokens"]), embeddings=emb,
                   unet_delta=delta, masks=masks, token_images=list(meta["token_images"]),
                   history=list(meta.get("history", [])), losses=list(meta.get("losses", [])),
                   params=dict(meta.get("params", {})), base_fingerprint=meta.get("base_fingerprint"))


def mask_history_figure(images: Sequence[np.ndarray], token_images: Sequence[int], tokens: Sequence[str],
                        snapshots: Sequence[tuple[int, np.ndarray]], scale: int = 4):
    """One row per token, one column per snapshot: the token's mask (red) over its image (PIL image)."""
    from PIL import Image, ImageDraw

    h, w = images[0].shape[:2]
    cell = (w * scale, h * scale + 12)
    fig = Image.new("RGB", (cell[0] * len(snapshots), cell[1] * len(tokens)), "white")
    draw = ImageDraw.Draw(fig)
    for col, (step, labels_per_image) in enumerate(snapshots):
        for row, (token, img_index) in enumerate(zip(tokens, token_images)):
            img = images[img_index].astype(np.float32)
            mask = labels_per_image[img_index] == row + 1
            over = img.copy()
            over[mask] = 0.45 * img[mask] + 0.55 * np.array([255.0, 0.0, 0.0])
            tile = Image.fromarray(over.round().astype(np.uint8)).resize((cell[0], cell[1] - 12), Image.NEAREST)
            fig.paste(tile, (col * cell[0], row * cell[1] + 12))
            draw.text((col * cell[0] + 2, row * cell[1]), f"{token} s{step}", fill="black")
    return fig


# ----------------------------------------------------------------------------------------- training


def _autocast_dtype(precision: str, unet, device: torch.device) -> torch.dtype | None:
    low = {p.dtype for p in unet.parameters()} - {torch.float32}
    if precision == "auto":
        return next(iter(low)) if len(low) == 1 else None
    if precision == "fp32":
        return None
    dtype = _AUTOCAST[precision]
    if device.type == "cpu" and low - {dtype}:
        raise ValueError(f"EmParams.precision={precision!r} on CPU needs the t2i stored in float32 or {dtype}")
    return dtype


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _token_ids(tokenizer, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False).input_ids) if word.strip() else []


class _Run:
    """The state of one EM job: images, latents, tokens, masks, the generator (one recipe, read top to bottom)."""

    def __init__(self, t2i, images, params: EmParams, seed: int, gt_masks, device):
        self.t2i, self.p, self.device = t2i, params, torch.device(device)
        self.tokens = list(params.tokens)
        self.image_of = list(params.images_of_tokens)
        if not images:
            raise ValueError("EM: no images (a job needs at least one)")
        bad = [(t, i) for t, i in zip(self.tokens, self.image_of) if i >= len(images)]
        if bad:
            raise ValueError(f"EmParams.token_images: {bad} name images beyond the {len(images)} given")
        unused = [i for i in range(len(images)) if i not in self.image_of]
        if unused:
            raise ValueError(f"images {unused} have no token (token_images ties each token to one image)")
        self.size = image_size(t2i)
        pixels = preprocess_images(images, self.size)  # (n, 3, S, S) in [0, 1]
        self.images = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in pixels]
        self.gt = self._check_gt(gt_masks or {})
        self.gen = torch.Generator().manual_seed(int(seed))
        self.rng = random.Random(int(seed))
        self.unet = t2i.unet
        self.dtype = _autocast_dtype(params.precision, self.unet, self.device)
        scale = vae_scaling(t2i.vae)
        with torch.no_grad():
            both = torch.cat([pixels, torch.flip(pixels, dims=[3])])
            z = t2i.vae.encode((both * 2 - 1).to(self.device, t2i.vae.dtype)).latent_dist.mean.float() * scale
        self.latents = z.view(2, len(images), *z.shape[1:])  # [flip, image]
        self.sched = make_scheduler(t2i)
        self.rows = torch.nn.Parameter(self._init_rows())
        self.masks = np.zeros((len(self.tokens), self.size, self.size), dtype=bool)
        self.labels: list[np.ndarray] = [np.zeros((self.size, self.size), np.int64) for _ in images]
        self.history: list[dict] = []
        self.snapshots: list[tuple[int, list[np.ndarray]]] = []
        self.losses: list[float] = []

    def _check_gt(self, gt: dict) -> dict:
        unknown = sorted(set(gt) - set(self.tokens))
        if unknown:
            raise ValueError(f"ground-truth masks for unknown tokens {unknown}; tokens: {self.tokens}")
        out = {}
        for token, mask in gt.items():
            m = np.asarray(mask).astype(bool)
            if m.shape != (self.size, self.size):
                raise ValueError(f"ground-truth mask of {token}: shape {m.shape}; allowed: ({self.size}, {self.size}) "
                                 "(the model's image size)")
            out[token] = m
        return out

    # -- tokens ------------------------------------------------------------------------------------------------

    def _init_rows(self) -> torch.Tensor:
        emb = self.t2i.text_encoder.get_input_embeddings().weight.detach().float().cpu()  # (V, D)
        p = self.p
        if p.init == "word":
            rows = []
            for token, word in zip(self.tokens, p.init_words):
                ids = _token_ids(self.t2i.tokenizer, word)
                if len(ids) != 1:
                    raise ValueError(f"EmParams.init_words: {word!r} (for {token}) is {len(ids)} tokens; allowed: one")
                rows.append(emb[ids[0]])
            return torch.stack(rows).to(self.device)
        mean, std = emb.mean(0), emb.std(0)
        noise = torch.randn((len(self.tokens), emb.shape[1]), generator=self.gen)
        return (mean + std * noise).to(self.device)  # "random"; "inversion" starts here too

    def encode(self, prompts: Sequence[str]):
        """(B, L, D) text states with the token rows spliced in, and each prompt's layout."""
        layouts = [inference_prompt_ids(self.t2i.tokenizer, p, self.tokens) for p in prompts]
        ids = torch.stack([lay.ids for lay in layouts]).to(self.device)
        rows = torch.tensor([r for r, lay in enumerate(layouts) for _ in lay.new], dtype=torch.long, device=self.device)
        cols = torch.tensor([c for lay in layouts for c in lay.new], dtype=torch.long, device=self.device)
        index = torch.tensor([i for lay in layouts for i in lay.new_index], dtype=torch.long, device=self.device)
        states = encode_spliced(self.t2i.text_encoder, ids, rows, cols, self.rows[index])
        return states, layouts

    def prompt(self, token_indices: Sequence[int]) -> str:
        return self.p.prompt.format(self.p.joiner.join(self.tokens[k] for k in token_indices))

    def tokens_of(self, image: int) -> list[int]:
        return [k for k, i in enumerate(self.image_of) if i == image]

    # -- the E-step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def estimate(self, step: int, stage: int, unet=None) -> None:
        """Re-estimate every token's mask (and record area and IoU against the ground truth)."""
        for image in range(len(self.images)):
            ks = self.tokens_of(image)
            maps = extract_token_maps(self, unet or self.unet, image, ks)
            labels, masks = masks_from_maps(self.images[image], maps, self.p)
            self.labels[image] = labels
            for j, k in enumerate(ks):
                self.masks[k] = masks[j]
        record = {"step": step, "stage": stage, "area": {}, "iou": {}}
        for k, token in enumerate(self.tokens):
            record["area"][token] = round(float(self.masks[k].mean()), 5)
            if token in self.gt:
                record["iou"][token] = round(mask_iou(self.masks[k], self.gt[token]), 5)
        self.history.append(record)
        self.snapshots.append((step, [lab.copy() for lab in self.labels]))

    # -- the M-step ------------------------------------------------------------------------------------------

    def loss(self, unet, masked: bool) -> torch.Tensor:
        """One batch's loss: masked diffusion + attention (``masked``) or the plain inversion loss."""
        p, b = self.p, self.p.batch_size
        pick = [self.rng.randrange(len(self.images)) for _ in range(b)]
        flips = [self.rng.random() < p.flip_p for _ in range(b)]
        subsets = []
        for image in pick:
            ks = self.tokens_of(image)
            sub = self.rng.sample(ks, self.rng.randint(1, len(ks))) if masked else list(ks)
            subsets.append(sub)
        z0 = torch.stack([self.latents[int(f), i] for f, i in zip(flips, pick)])
        noise = torch.randn(z0.shape, generator=self.gen).to(self.device)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (b,), generator=self.gen).to(self.device)
        z_t = self.sched.add_noise(z0, noise, t)
        target = noise if self.sched.config.prediction_type == "epsilon" else self.sched.get_velocity(z0, noise, t)
        states, layouts = self.encode([self.prompt(s) for s in subsets])
        store = AttentionStore()
        with _autocast(self.device, self.dtype), (capturing(unet, store) if masked else contextlib.nullcontext()):
            pred = unet(z_t.to(unet.dtype), t, encoder_hidden_states=states.to(unet.dtype)).sample
        if not masked:
            return F.mse_loss(pred.float(), target.float())
        masks = torch.from_numpy(self.masks).float().to(self.device)  # (K, S, S)
        union = torch.stack([masks[s].amax(0) for s in subsets])[:, None]  # (B, 1, S, S)
        union = torch.where(torch.tensor(flips, device=self.device)[:, None, None, None], union.flip(-1), union)
        loss = masked_diffusion_loss(pred, target, F.interpolate(union, size=z0.shape[-2:], mode="nearest"))
        if p.attn_weight > 0:
            agg = store.aggregate(p.attn_res, p.layers)  # (B, r, r, L)
            maps, targets = [], []
            for row, (sub, lay) in enumerate(zip(subsets, layouts)):
                for k, col in zip(sub, token_columns(lay, self.tokens, sub)):
                    m = masks[k].flip(-1) if flips[row] else masks[k]
                    maps.append(agg[row, :, :, col])
                    targets.append(F.interpolate(m[None, None], size=(p.attn_res, p.attn_res), mode="nearest")[0, 0])
            loss = loss + p.attn_weight * attention_loss(maps, targets, b)
        return loss

    def optimise(self, steps: int, stage: int, unet, trained: list[torch.Tensor], groups: list[dict], masked: bool,
                 on_step, reestimate: bool = False) -> None:
        if steps == 0:
            return
        opt = torch.optim.AdamW(groups, weight_decay=self.p.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        for step in range(1, steps + 1):
            loss = self.loss(unet, masked)
            grads = torch.autograd.grad(scaler.scale(loss), trained, allow_unused=True)
            for param, grad in zip(trained, grads):
                param.grad = grad
            scaler.unscale_(opt)
            if self.p.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained, self.p.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            self.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(self.losses), self.losses[-1])
            if reestimate and step % self.p.reestimate_every == 0:
                self.estimate(len(self.losses), stage)


def extract_token_maps(run: _Run, unet, image: int, token_indices: Sequence[int]) -> np.ndarray:
    """(len(token_indices), r, r) max-normalised maps of the tokens on ``image`` (averaged over timesteps)."""
    p = run.p
    states, layouts = run.encode([run.prompt(token_indices)])
    cols = token_columns(layouts[0], run.tokens, token_indices)
    n = p.mask_timesteps
    ts = torch.randint(0, run.sched.config.num_train_timesteps, (n,), generator=run.gen)
    noise = torch.randn((n, *run.latents.shape[2:]), generator=run.gen)
    total = torch.zeros(len(cols), p.attn_res, p.attn_res)
    for start in range(0, n, MASK_CHUNK):
        t = ts[start:start + MASK_CHUNK].to(run.device)
        z0 = run.latents[0, image].expand(len(t), -1, -1, -1)
        z_t = run.sched.add_noise(z0, noise[start:start + MASK_CHUNK].to(run.device), t)
        store = AttentionStore()
        with _autocast(run.device, run.dtype), capturing(unet, store):
            unet(z_t.to(unet.dtype), t, encoder_hidden_states=states.expand(len(t), -1, -1).to(unet.dtype))
        agg = store.aggregate(p.attn_res, p.layers)  # (b, r, r, L)
        total += agg[..., cols].sum(0).permute(2, 0, 1).float().cpu()
    return normalise_max(total / n).numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _unet_trainables(unet, which: str) -> dict[str, torch.nn.Parameter]:
    names = {"all": lambda n: True, "attention": lambda n: ".attn1." in n or ".attn2." in n,
             "cross_attention": lambda n: ".attn2." in n}[which]
    return {n: p for n, p in unet.named_parameters() if names(n)}


def train_em(t2i, images: Sequence[np.ndarray], params: EmParams, seed: int, gt_masks: dict | None = None,
             device: str | torch.device = "cpu", on_step: Callable[[int, float], None] | None = None) -> EmConcept:
    """Learn the tokens and masks of one EM job (stages 1–3 of SPEC §4.4); the base model is left as it was.

    Args:
        t2i: ``T2IComponents`` on ``device``.
        images: (H, W, 3) uint8 images (centre-cropped and resized to the model size).
        params: :class:`EmParams`; ``token_images`` ties each token to one image.
        seed: seeds every random draw of the job.
        gt_masks: optional ``{token: (S, S) bool}`` at the model size, for the IoU history only.
        on_step: called with ``(step, loss)`` after every optimiser step.
    """
    run = _Run(t2i, images, params, seed, gt_masks, device)
    p = params
    # stage 1: initialise the tokens, then the masks
    if p.init == "inversion" and p.init_steps:
        run.optimise(p.init_steps, 1, run.unet, [run.rows], [{"params": [run.rows], "lr": p.lr_tokens}], False, on_step)
    run.estimate(len(run.losses), 1)
    # stage 2: tokens under the current masks, re-estimated every reestimate_every steps
    run.optimise(p.steps_tokens, 2, run.unet, [run.rows], [{"params": [run.rows], "lr": p.lr_tokens}], True, on_step,
                 reestimate=True)
    # stage 3: tokens + UNet (a float32 copy), masks fixed
    delta: dict[str, torch.Tensor] = {}
    if p.steps_joint:
        unet = copy.deepcopy(t2i.unet).float()
        unet.requires_grad_(False)
        trainable = _unet_trainables(unet, p.unet_params)
        for param in trainable.values():
            param.requires_grad_(True)
        trained = [run.rows, *trainable.values()]
        groups = [{"params": [run.rows], "lr": p.lr_tokens}, {"params": list(trainable.values()), "lr": p.lr_unet}]
        run.optimise(p.steps_joint, 3, unet, trained, groups, True, on_step)
        base = dict(t2i.unet.named_parameters())
        with torch.no_grad():
            delta = {n: (w.detach().float() - base[n].detach().float()).cpu() for n, w in trainable.items()}
        del unet
    run.rows.requires_grad_(False)
    return EmConcept(tokens=run.tokens, background_tokens=list(p.background_tokens),
                     embeddings=run.rows.detach().float().cpu().clone(), unet_delta=delta, masks=run.masks.copy(),
                     token_images=run.image_of, history=run.history, losses=run.losses, params=asdict(p),
                     snapshots=_pick_snapshots(run.snapshots), images=run.images)


def _pick_snapshots(snapshots: list, k: int = FIGURE_SNAPSHOTS) -> list:
    if len(snapshots) <= k:
        return list(snapshots)
    picks = sorted({round(i * (len(snapshots) - 1) / (k - 1)) for i in range(k)})
    return [snapshots[i] for i in picks]


# ----------------------------------------------------------------------------------------- inference


def _concept_run(t2i, concept: EmConcept, params: EmParams, images: Sequence[np.ndarray], seed: int, device) -> _Run:
    """A :class:`_Run` holding the trained rows (no training): mask estimation for :func:`concept_masks`."""
    run = _Run.__new__(_Run)
    run.t2i, run.p, run.device = t2i, params, torch.device(device)
    run.tokens, run.image_of = list(concept.tokens), [0] * len(concept.tokens)
    run.size = image_size(t2i)
    pixels = preprocess_images(images, run.size)
    run.images = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in pixels]
    run.gen = torch.Generator().manual_seed(int(seed))
    run.unet = concept.unet_for(t2i.unet)
    run.dtype = _autocast_dtype(params.precision, run.unet, run.device)
    with torch.no_grad():
        z = t2i.vae.encode((pixels * 2 - 1).to(run.device, t2i.vae.dtype)).latent_dist.mean.float()
    run.latents = (z * vae_scaling(t2i.vae))[None]
    run.sched = make_scheduler(t2i)
    run.rows = concept.embeddings.to(run.device).float()
    return run


def concept_masks(t2i, concept: EmConcept, image: np.ndarray, tokens: Sequence[str] | None = None, seed: int = 0,
                  device: str | torch.device = "cpu") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The trained tokens' masks on any ``image``: ``(labels (S, S), {token: (S, S) bool})`` at the model size.

    ``tokens`` (default: all of the concept's) are named together in the prompt, as during training.
    """
    tokens = list(tokens or concept.tokens)
    unknown = [t for t in tokens if t not in concept.tokens]
    if unknown:
        raise ValueError(f"tokens {unknown} are not this concept's; allowed: {concept.tokens}")
    params = EmParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in concept.params.items()})
    with torch.no_grad():
        run = _concept_run(t2i, concept, params, [image], seed, device)
        ks = [concept.tokens.index(t) for t in tokens]
        maps = extract_token_maps(run, run.unet, 0, ks)
        labels, masks = masks_from_maps(run.images[0], maps, params)
    return labels, {t: masks[j] for j, t in enumerate(tokens)}


@torch.no_grad()
def sample(t2i, concept: EmConcept, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50,
           guidance: float = 7.5, eta: float = 0.0, device: str | torch.device = "cpu") -> list[np.ndarray]:
    """DDIM sampling of prompts that name the concept's tokens (base UNet + delta, tokens spliced in).

    Row b draws its noise from ``torch.Generator().manual_seed(seeds[b])``. A prompt naming none of the tokens
    is sampled by the customized model all the same (the UNet delta applies to every prompt).
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"prompts ({len(prompts)}) and seeds ({len(seeds)}) must be non-empty and equally long")
    device = torch.device(device)
    unet = concept.unet_for(t2i.unet)
    sched = make_scheduler(t2i)
    sched.set_timesteps(int(steps))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = initial_latents(unet, gens, device, sched.init_noise_sigma)

    cond = encode_prompts(t2i, concept, prompts, device).to(unet.dtype)
    uncond = encode_prompts(t2i, concept, [""] * len(prompts), device).to(unet.dtype)
    for t in sched.timesteps:
        out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        x = sched.step(guided(out_u, out_c, guidance), t, x, eta=eta, generator=gens).prev_sample
    return decode_latents(t2i.vae, x)
