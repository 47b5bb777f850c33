"""ICO — Image-specific Context Optimization (SPEC §4.1): per-concept fine-tuning and plain sampling.

Usage::

    concept = train_ico(t2i, reference_images, "circle", IcoParams(steps=900), seed=0,
                        prior=class_prior_images(t2i, "circle", n=8, seed=0))
    concept.save("out/concept")                                    # ico.safetensors + ico.json
    images = sample(t2i, IcoConcept.load("out/concept"), [f"a {concept_phrase(concept)} on a beach"], seeds=[0])

Training prompt for reference image i (``training_prompt_ids``)::

    [SOS] ctx_i (P) V (|V|) <noun> end_ctx_i (S) [EOS] [pad …]

``ctx_i``/``end_ctx_i`` are per-image float32 vectors and ``V`` the new-token rows, all in token-embedding
space: they replace the *output of the token-embedding layer* at their slots (a forward hook), so they get the
position embedding of the slot they occupy (SPEC decision). New tokens are never added to the tokenizer: the
text around them is tokenized and placeholder slots (id 0, whose embedding is replaced) are spliced in. At
inference the contexts are dropped and ``"<new1> <new2> <new3>"`` is parsed out of plain prompt text.
``prompt="manual"`` trains the same parameters on ``"a photo of <new1> <new2> <new3> {noun}"`` (no contexts).

Trained (AdamW, weight decay on every trained tensor): every ``attn2`` ``to_k``/``to_v`` (float32 copies in
:class:`~training.attention.ico.IcoAttnProcessor`, SOS key/value detached) and the V rows at
``learning_rate · batch_size``; the contexts at ``context_lr_scale`` times that. Loss: MSE on the scheduler's
prediction target (ε, or v for ``v_prediction``), mask all ones; a prior row's loss is weighted by
``prior_weight``. Prior preservation: the reference and class entries are mixed 1:1 at the dataset level —
``n = max(#references, #prior)`` entries of each (cycling the shorter list) — in one loader reshuffled every
epoch from the job's generator; a prior image is trained on its own caption (no contexts, plain
positions; a caption longer than the tokenizer's ``model_max_length`` is truncated, as diffusers does).

Decisions (SPEC silent): the training latents are the VAE posterior *means* (no posterior sampling): SD's
VAE has a posterior std far below the latent scale, so this changes little there, while the synthetic world's
VAE (KL weight 1e-6) has an uninformative std ≈ 1 and its UNet was trained on means (sampling made the training
loss ~3× the model's actual error). With neither ``init_token_ids`` nor ``init_word`` the V rows start from
the embedding of the noun's first token (any vocabulary has it; the authors' rare ids exist only in the
49408-token CLIP vocabulary). The contexts are per image and not used at inference; they are saved for
completeness. An optimiser step skips a tensor that received no gradient in the batch (a context of an image
not drawn, or V in an all-prior batch): PyTorch's AdamW leaves ``grad is None`` parameters alone.

The base model is never mutated: trained state lives in this module's tensors, the processors are installed
for the duration of a call and the previous ones restored, gradients are taken with ``torch.autograd.grad``
(nothing accumulates on base weights), and every random draw comes from ``torch.Generator``s seeded from the
job seed — the same job gives bit-identical results alone or after other jobs on the same loaded base.

Precision: the trained tensors are float32. ``precision="auto"`` (default) autocasts in the base's own storage
dtype (fp16/bf16) and computes in float32 for a float32 base. ``precision`` fp16/bf16 runs the frozen base in its stored dtype
under ``torch.autocast`` (fp16 with a ``GradScaler``); ``fp32`` computes in float32 — a half-stored
UNet/text encoder is then *copied* to float32 for the job (the shared base stays as it is). On CPU a bf16
autocast over float16-stored weights is refused (CPU norm layers do not mix half dtypes).

``code_compat=True`` reproduces the authors' position-id quirk in training only: prefix contexts get positions
1..P, suffix contexts 1..S (the authors: ``end_ctx`` position 1, their S = 1) and the V tokens 1..|V|.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training.methods.params import ICO_PROMPTS as _PROMPTS, IcoParams  # noqa: F401  (re-exported)
from training.attention.ico import IcoAttnProcessor, cross_attention_names, ico_processors, installed_processors

ARTIFACT = "ico.safetensors"
META = "ico.json"
FORMAT = "ico/1"
PLACEHOLDER_ID = 0  # id spliced into V/context slots; its embedding is always replaced
PRIOR_PROMPT = "a photo of a {noun}"
MANUAL_PROMPT = "a photo of {phrase}"
_AUTOCAST = {"auto": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of one prompt with spliced slots.

    Attributes:
        ids: (L,) token ids, L = ``tokenizer.model_max_length``; slots hold :data:`PLACEHOLDER_ID`.
        prefix: positions of the P prefix contexts.
        new: positions of the V tokens, in ``new_tokens`` order for training layouts; for parsed prompts the
            slot of each occurrence (see ``new_index``).
        noun: positions of the noun's tokens (training layout; empty for parsed prompts).
        suffix: positions of the S suffix contexts.
        eos: position of EOS (padding follows).
        new_index: for each entry of ``new``, which new token (row of V) fills it.
    """

    ids: torch.Tensor
    prefix: tuple[int, ...]
    new: tuple[int, ...]
    noun: tuple[int, ...]
    suffix: tuple[int, ...]
    eos: int
    new_index: tuple[int, ...]

    def position_ids(self, code_compat: bool = False) -> torch.Tensor:
        """(L,) position ids: the true slots, or the authors' quirk (1..P, 1..S, 1..|V|) with ``code_compat``."""
        pos = torch.arange(self.ids.numel())
        if code_compat:
            for slots in (self.prefix, self.suffix, self.new):
                if slots:
                    pos[list(slots)] = torch.arange(1, len(slots) + 1)
        return pos


def _words(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []


def _finish(tokenizer, body: list[int], what: str) -> tuple[torch.Tensor, int]:
    length = tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    if len(ids) > length:
        raise ValueError(f"{what}: {len(ids)} tokens with SOS/EOS, more than the tokenizer's model_max_length "
                         f"{length}")
    eos = len(ids) - 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (length - len(ids))
    return torch.tensor(ids, dtype=torch.long), eos


def training_prompt_ids(tokenizer, noun: str, num_prefix: int = 1, num_suffix: int = 1,
                        num_new: int = 3) -> PromptLayout:
    """The ICO training layout ``[SOS] ctx(P) V(|V|) <noun> end_ctx(S) [EOS] [pad…]`` (SPEC §4.1)."""
    noun_ids = _words(tokenizer, noun)
    if not noun_ids:
        raise ValueError(f"noun: {noun!r} gives no tokens; allowed: a non-empty class word")
    p, v, n = int(num_prefix), int(num_new), len(noun_ids)
    body = [PLACEHOLDER_ID] * (p + v) + noun_ids + [PLACEHOLDER_ID] * int(num_suffix)
    ids, eos = _finish(tokenizer, body, f"ICO training prompt for {noun!r}")
    start = 1
    return PromptLayout(ids=ids, prefix=tuple(range(start, start + p)), new=tuple(range(start + p, start + p + v)),
                        noun=tuple(range(start + p + v, start + p + v + n)),
                        suffix=tuple(range(start + p + v + n, eos)), eos=eos, new_index=tuple(range(v)))


def inference_prompt_ids(tokenizer, prompt: str, new_tokens: Sequence[str] = ()) -> PromptLayout:
    """Plain prompt text → ids; each occurrence of a string of ``new_tokens`` becomes one V slot (no contexts)."""
    body: list[int] = []
    new, new_index = [], []
    pieces = [prompt]
    if new_tokens:
        pattern = "(" + "|".join(re.escape(t) for t in sorted(new_tokens, key=len, reverse=True)) + ")"
        pieces = re.split(pattern, prompt)
    lookup = {t: i for i, t in enumerate(new_tokens)}
    for piece in pieces:
        if piece in lookup:
            new.append(1 + len(body))
            new_index.append(lookup[piece])
            body.append(PLACEHOLDER_ID)
        else:
            body += _words(tokenizer, piece)
    ids, eos = _finish(tokenizer, body, f"prompt {prompt!r}")
    return PromptLayout(ids=ids, prefix=(), new=tuple(new), noun=(), suffix=(), eos=eos, new_index=tuple(new_index))


def caption_ids(tokenizer, caption: str) -> torch.Tensor:
    """(L,) ids of a plain caption (a prior image's own), cut to ``model_max_length`` as ``tokenizer(caption,
    truncation=True, padding="max_length")`` does: SOS, the first L − 2 tokens, EOS, padding."""
    body = _words(tokenizer, caption)[: tokenizer.model_max_length - 2]
    return _finish(tokenizer, body, f"caption {caption!r}")[0]


def concept_phrase(concept: "IcoConcept") -> str:
    """The phrase naming the concept in prompts: ``"<new1> <new2> <new3> circle"``."""
    return " ".join((*concept.tokens, concept.noun))


def _token_embedding(text_encoder) -> torch.nn.Embedding:
    return getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding  # transformers 4 | 5


def encode_spliced(text_encoder, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   values: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Text-encoder hidden states (B, L, D) with the token-embedding output replaced at ``(rows, cols)``.

    ``values`` (n, D) go in before the position embedding is added, so each gets its slot's position
    embedding (or ``position_ids``' (B, L)). Gradients flow back to ``values``.
    """
    if values is None or rows.numel() == 0:
        return text_encoder(ids, position_ids=position_ids)[0]

    def splice(module, args, output):  # output: (B, L, D) token embeddings, no positions yet
        output = output.clone()
        output[rows, cols] = values.to(output.dtype)
        return output

    handle = _token_embedding(text_encoder).register_forward_hook(splice)
    try:
        return text_encoder(ids, position_ids=position_ids)[0]
    finally:
        handle.remove()


def encode_prompts(t2i, concept: "IcoConcept | None", prompts: Sequence[str], device) -> torch.Tensor:
    """Inference conditioning (B, L, D): plain prompts, the concept's V rows spliced where its tokens occur."""
    tokens = concept.tokens if concept is not None else ()
    layouts = [inference_prompt_ids(t2i.tokenizer, p, tokens) for p in prompts]
    ids = torch.stack([lay.ids for lay in layouts]).to(device)
    rows = torch.tensor([r for r, lay in enumerate(layouts) for _ in lay.new], dtype=torch.long, device=device)
    cols = torch.tensor([c for lay in layouts for c in lay.new], dtype=torch.long, device=device)
    values = None
    if concept is not None and rows.numel():
        index = torch.tensor([i for lay in layouts for i in lay.new_index], dtype=torch.long)
        values = concept.new_embeddings[index].to(device)
    return encode_spliced(t2i.text_encoder, ids, rows, cols, values)


# ----------------------------------------------------------------------------------------- images


def image_size(t2i) -> int:
    """Pixel size of the t2i's images: the UNet's sample size × the VAE's scale factor."""
    return int(t2i.unet.config.sample_size) * 2 ** (len(t2i.vae.config.block_out_channels) - 1)


def preprocess_images(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """HxWx3 uint8 images of any size → (n, 3, size, size) in [0, 1]: centre square crop, bicubic resize."""
    out = []
    for k, img in enumerate(images):
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"images[{k}]: shape {arr.shape} dtype {arr.dtype}; allowed: (H, W, 3) uint8")
        h, w = arr.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = torch.from_numpy(np.array(arr[top:top + s, left:left + s])).permute(2, 0, 1).float() / 255
        if s != size:
            x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False,
                              antialias=s > size)[0].clamp(0, 1)
        out.append(x)
    return torch.stack(out)


def _latent_means(vae, pixels01: torch.Tensor, device, chunk: int = 8) -> torch.Tensor:
    """VAE posterior means (n, 4, h, w) float32 of images in [0, 1] (no gradient, the VAE's stored dtype)."""
    means = []
    with torch.no_grad():
        for i in range(0, len(pixels01), chunk):
            x = (pixels01[i:i + chunk] * 2 - 1).to(device, vae.dtype)
            means.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(means)


def vae_scaling(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 0.18215))


def initial_latents(unet, generators: Sequence[torch.Generator], device, init_noise_sigma: float) -> torch.Tensor:
    """(B, C, h, w) starting noise, row b drawn (float32, CPU) from ``generators[b]``, in the UNet's dtype."""
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return (x * init_noise_sigma).to(device, unet.dtype)


def decode_latents(vae, x: torch.Tensor) -> list[np.ndarray]:
    """Latents (B, 4, h, w) → list of (H, W, 3) uint8; refuses non-finite results."""
    finite = torch.isfinite(x.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        raise RuntimeError(f"non-finite latents for rows {torch.nonzero(~finite).flatten().tolist()}")
    images = vae.decode((x / vae_scaling(vae)).to(vae.dtype)).sample  # (B, 3, H, W)
    images = ((images.float() + 1) / 2).clamp(0, 1)
    return list((images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def make_scheduler(t2i):
    """A private DDIM scheduler built from the t2i's config (the shared one is never stepped or moved)."""
    from training.sampling import ddim_scheduler

    sched = ddim_scheduler(t2i.scheduler.config)
    if sched.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {sched.config.prediction_type!r} not supported; allowed: "
                         "epsilon, v_prediction")
    return sched


def guided(out_u: torch.Tensor, out_c: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on raw UNet outputs (linear, so valid for ε and v): ``u + s(c − u)``."""
    return out_u + scale * (out_c - out_u)


# ----------------------------------------------------------------------------------------- the concept


def _on_device(layer: IcoAttnProcessor, device) -> IcoAttnProcessor:
    """``layer`` itself when it already lives on ``device``; else a copy there (the concept's own weights stay
    where they are: a served concept is moved to the GPU only while it samples, never left there)."""
    device = torch.device(device)
    if layer.to_k.weight.device == device or (device.type == layer.to_k.weight.device.type and device.index is None):
        return layer
    copy = IcoAttnProcessor(layer.to_k.in_features, layer.to_k.out_features, bias=layer.to_k.bias is not None)
    copy.load_state_dict(layer.state_dict())
    return copy.to(device)


class IcoConcept:
    """Trained ICO state: per-``attn2`` to_k/to_v (float32), V rows, per-image contexts, names, losses."""

    def __init__(self, tokens: Sequence[str], noun: str, layers: dict[str, IcoAttnProcessor],
                 new_embeddings: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor,
                 losses: Sequence[float] = (), params: dict | None = None):
        if new_embeddings.shape[0] != len(tokens):
            raise ValueError(f"IcoConcept: {len(tokens)} tokens but {new_embeddings.shape[0]} V rows")
        self.tokens = tuple(tokens)
        self.noun = noun
        self.layers = dict(layers)
        self.new_embeddings = new_embeddings  # (|V|, D) float32
        self.prefix = prefix  # (n_images, P, D) float32 — training only
        self.suffix = suffix  # (n_images, S, D) float32 — training only
        self.losses = [float(v) for v in losses]
        self.params = dict(params or {})

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def processors_for(self, unet, device) -> dict[str, IcoAttnProcessor]:
        """The layer processors, checked against ``unet``'s attn2 names and moved to ``device``."""
        names = cross_attention_names(unet)
        if sorted(names) != sorted(self.layers):
            raise ValueError(f"IcoConcept: layer names do not match the UNet's attn2 layers ({len(self.layers)} vs "
                             f"{len(names)}); was it trained on another base?")
        return {n: _on_device(self.layers[n], device) for n in names}

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write ``ico.safetensors`` and ``ico.json`` (temp name, then ``os.replace``); returns their paths."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"new_embeddings": self.new_embeddings, "contexts.prefix": self.prefix,
                   "contexts.suffix": self.suffix}
        for name, layer in self.layers.items():
            for key, t in layer.state_dict().items():
                tensors[f"{name}.{key}"] = t
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        meta = {"format": FORMAT, "tokens": list(self.tokens), "noun": self.noun, "layer_names": self.layer_names,
                "params": self.params, "losses": self.losses, "num_images": int(self.prefix.shape[0]),
                "contexts": "training only: per-image contexts are not used at inference"}
        paths = [d / ARTIFACT, d / META]
        save_file(tensors, str(d / f".{ARTIFACT}.tmp"), metadata={"format": FORMAT, "contexts": "training only"})
        (d / f".{META}.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(d / f".{ARTIFACT}.tmp", paths[0])
        os.replace(d / f".{META}.tmp", paths[1])
        return [str(p) for p in paths]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "IcoConcept":
        """Read a concept written by :meth:`save` (safetensors only)."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d / META}: format {meta.get('format')!r}; allowed: {FORMAT!r}")
        tensors = load_file(str(d / ARTIFACT))
        layers = {}
        for name in meta["layer_names"]:
            k = tensors[f"{name}.to_k.weight"]
            layer = IcoAttnProcessor(k.shape[1], k.shape[0], bias=f"{name}.to_k.bias" in tensors)
            layer.load_state_dict({key: tensors[f"{name}.{key}"] for key in layer.state_dict()})
            layers[name] = layer
        return cls(meta["tokens"], meta["noun"], layers, tensors["new_embeddings"], tensors["contexts.prefix"],
                   tensors["contexts.suffix"], meta.get("losses", ()), meta.get("params", {}))


# ----------------------------------------------------------------------------------------- training


def _autocast_dtype(precision: str, modules, device: torch.device) -> torch.dtype | None:
    low = {p.dtype for m in modules for p in m.parameters()} - {torch.float32}
    if precision == "auto":  # the frozen base runs in its stored dtype: no copy of a half-precision base
        return next(iter(low)) if len(low) == 1 else None
    dtype = _AUTOCAST[precision]
    if device.type == "cpu" and dtype is not None and low - {dtype}:
        raise ValueError(f"IcoParams.precision={precision!r} on CPU needs the t2i stored in float32 or {dtype}, "
                         f"not {sorted(map(str, low))}; allowed here: 'fp32' or the storage dtype")
    return dtype


def _compute_modules(t2i, autocast_dtype):
    """The (unet, text_encoder) to train through: the base ones, or float32 copies for fp32 over a half base."""
    unet, text_encoder = t2i.unet, t2i.text_encoder
    if autocast_dtype is None:
        if any(p.dtype != torch.float32 for p in unet.parameters()):
            unet = copy.deepcopy(unet).float()
        if any(p.dtype != torch.float32 for p in text_encoder.parameters()):
            text_encoder = copy.deepcopy(text_encoder).float()
    return unet, text_encoder


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _single_token_row(tokenizer, table: torch.Tensor, word: str, field: str) -> torch.Tensor:
    ids = _words(tokenizer, word)
    if len(ids) != 1:
        raise ValueError(f"IcoParams.{field}: {word!r} is {len(ids)} tokens for this tokenizer; allowed: one token")
    return table[ids[0]].float()


def _init_new_rows(tokenizer, table: torch.Tensor, noun: str, params: IcoParams) -> torch.Tensor:
    """(|V|, D) float32 initial V rows: ``init_token_ids`` | ``init_word`` | the noun's first token."""
    n = len(params.new_tokens)
    if params.init_token_ids is not None:
        bad = [i for i in params.init_token_ids if not 0 <= int(i) < table.shape[0]]
        if bad:
            raise ValueError(f"IcoParams.init_token_ids: {bad} out of the vocabulary; allowed: 0..{table.shape[0] - 1}")
        return table[list(map(int, params.init_token_ids))].float().clone()
    if params.init_word is not None:
        return _single_token_row(tokenizer, table, params.init_word, "init_word").expand(n, -1).clone()
    return table[_words(tokenizer, noun)[0]].float().expand(n, -1).clone()


def _dataset(num_refs: int, num_prior: int) -> list[tuple[str, int]]:
    """Entries ``(kind, index)``: the references, and with a prior as many class entries (1:1, cycled)."""
    if num_prior == 0:
        return [("ref", i) for i in range(num_refs)]
    n = max(num_refs, num_prior)
    return [("ref", i % num_refs) for i in range(n)] + [("prior", j % num_prior) for j in range(n)]


def train_ico(t2i, images: Sequence[np.ndarray], noun: str, params: IcoParams, seed: int,
              prior: Sequence[tuple[np.ndarray, str]] = (), device: str | torch.device = "cpu",
              on_step: Callable[[int, float], None] | None = None) -> IcoConcept:
    """Fine-tune one concept with ICO; returns the trained state (the base model is left as it was).

    Args:
        t2i: ``T2IComponents`` (already on ``device``).
        images: the concept's reference images, (H, W, 3) uint8, any size.
        noun: the class word (``<noun>``).
        params: :class:`IcoParams`.
        seed: seeds every random draw (shuffling, flips, noise, timesteps).
        prior: class images with their captions (e.g. :func:`class_prior_images`), mixed 1:1.
        device: where the t2i lives.
        on_step: called as ``on_step(step, loss)`` after every optimiser step.
    """
    if not images:
        raise ValueError("images: empty; allowed: at least one reference image")
    if not noun or not noun.strip():
        raise ValueError(f"noun: {noun!r}; allowed: a non-empty class word")
    device = torch.device(device)
    tokenizer = t2i.tokenizer
    autocast_dtype = _autocast_dtype(params.precision, (t2i.unet, t2i.text_encoder), device)
    unet, text_encoder = _compute_modules(t2i, autocast_dtype)
    sched = make_scheduler(t2i)
    gen = torch.Generator().manual_seed(int(seed))
    size = image_size(t2i)
    scaling = vae_scaling(t2i.vae)

    # data: scaled latents of every image in both orientations, (2·n, 4, h, w): [unflipped; flipped]
    refs = preprocess_images(images, size)
    prior_pix = preprocess_images([p[0] for p in prior], size) if prior else refs[:0]
    ref_lat = _latent_means(t2i.vae, torch.cat([refs, refs.flip(-1)]), device) * scaling
    pri_lat = _latent_means(t2i.vae, torch.cat([prior_pix, prior_pix.flip(-1)]), device) * scaling \
        if prior else ref_lat[:0]
    n_ref, n_prior = len(refs), len(prior_pix)

    # prompts
    n_new = len(params.new_tokens)
    if params.prompt == "ico":
        layout = training_prompt_ids(tokenizer, noun, params.num_prefix, params.num_suffix, n_new)
    else:
        layout = inference_prompt_ids(tokenizer, MANUAL_PROMPT.format(phrase=" ".join((*params.new_tokens, noun))),
                                      params.new_tokens)
    ref_pos = layout.position_ids(params.code_compat and params.prompt == "ico")
    prior_ids = torch.stack([caption_ids(tokenizer, caption) for _, caption in prior]) if prior \
        else layout.ids[None, :0]

    # trained state (float32)
    table = _token_embedding(t2i.text_encoder).weight.detach()
    layers = {n: p.float() for n, p in ico_processors(t2i.unet).items()}
    new_rows = torch.nn.Parameter(_init_new_rows(tokenizer, table, noun, params).to(device))
    ctx_a = _single_token_row(tokenizer, table, params.context_init_words[0], "context_init_words")
    ctx_b = _single_token_row(tokenizer, table, params.context_init_words[1], "context_init_words")
    prefix = [torch.nn.Parameter(ctx_a.expand(params.num_prefix, -1).clone().to(device)) for _ in range(n_ref)]
    suffix = [torch.nn.Parameter(ctx_b.expand(params.num_suffix, -1).clone().to(device)) for _ in range(n_ref)]
    kv_params = [p for layer in layers.values() for p in layer.parameters()]
    lr = params.learning_rate * params.batch_size
    groups = [{"params": kv_params + [new_rows], "lr": lr}]
    ctx_params = [p for p in (*prefix, *suffix) if p.numel()] if params.prompt == "ico" else []
    if ctx_params:
        groups.append({"params": ctx_params, "lr": lr * params.context_lr_scale})
    trained = [p for g in groups for p in g["params"]]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    entries = _dataset(n_ref, n_prior)
    queue: list[int] = []
    losses: list[float] = []
    n_train = sched.config.num_train_timesteps
    with installed_processors(unet, layers):
        for step in range(params.steps):
            # batch: entries from the shuffled loader (reshuffled every epoch)
            batch = []
            while len(batch) < params.batch_size:
                if not queue:
                    queue = torch.randperm(len(entries), generator=gen).tolist()
                batch.append(entries[queue.pop(0)])
            flips = (torch.rand(len(batch), generator=gen) < params.flip_p).tolist()
            z0 = torch.stack([ref_lat[i + n_ref * f] if k == "ref" else pri_lat[i + n_prior * f]
                              for (k, i), f in zip(batch, flips)])  # (B, 4, h, w)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            t = torch.randint(0, n_train, (len(batch),), generator=gen).to(device)
            z_t = sched.add_noise(z0, noise, t)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
            weights = torch.tensor([1.0 if k == "ref" else params.prior_weight for k, _ in batch], device=device)

            # prompts: ids (B, L), spliced rows/cols/values
            ids = torch.stack([layout.ids if k == "ref" else prior_ids[i] for k, i in batch]).to(device)
            pos = torch.stack([ref_pos if k == "ref" else torch.arange(ids.shape[1]) for k, _ in batch]).to(device)
            rows, cols, values = [], [], []
            for r, (k, i) in enumerate(batch):
                if k != "ref":
                    continue
                slots = [*layout.new]
                vals = [new_rows[list(layout.new_index)]]
                if params.prompt == "ico":
                    slots = [*layout.prefix, *layout.new, *layout.suffix]
                    vals = [prefix[i], new_rows[list(layout.new_index)], suffix[i]]
                rows += [r] * len(slots)
                cols += slots
                values += vals
            rows_t = torch.tensor(rows, dtype=torch.long, device=device)
            cols_t = torch.tensor(cols, dtype=torch.long, device=device)
            values_t = torch.cat(values) if values else None

            with _autocast(device, autocast_dtype):
                hidden = encode_spliced(text_encoder, ids, rows_t, cols_t, values_t, pos)  # (B, L, D)
                pred = unet(z_t.to(unet.dtype), t, encoder_hidden_states=hidden.to(unet.dtype)).sample
            per_row = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B,)
            loss = (weights * per_row).mean()
            grads = torch.autograd.grad(scaler.scale(loss), trained, allow_unused=True)
            for p, g in zip(trained, grads):
                p.grad = g
            scaler.step(optimizer)  # skipped when fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    for p in trained:
        p.requires_grad_(False)
    return IcoConcept(params.new_tokens, noun, layers, new_rows.detach().clone(),
                      torch.stack([p.detach() for p in prefix]), torch.stack([p.detach() for p in suffix]),
                      losses, asdict(params))


# ----------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(t2i, concept: IcoConcept | None, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50,
           guidance: float = 6.0, eta: float = 1.0, device: str | torch.device = "cpu") -> list[np.ndarray]:
    """DDIM sampling of plain prompts with the concept (or the base model for ``concept=None``).

    Row b draws its initial latent and its DDIM noise from ``torch.Generator().manual_seed(seeds[b])``, so
    its image does not depend on the other rows' seeds — up to the backend's batch-size-dependent rounding
    (a CPU GEMM may round differently for another number of rows). Returns (H, W, 3) uint8 images at
    :func:`image_size`. No contexts are used. All prompts run in one batch (chunk large requests).
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"prompts ({len(prompts)}) and seeds ({len(seeds)}) must be non-empty and equally long")
    if int(steps) < 1:
        raise ValueError(f"steps: {steps!r} must be ≥ 1")
    device = torch.device(device)
    unet = t2i.unet
    sched = make_scheduler(t2i)
    sched.set_timesteps(int(steps))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = initial_latents(unet, gens, device, sched.init_noise_sigma)  # (B, C, h, w)
    cond = encode_prompts(t2i, concept, prompts, device).to(unet.dtype)  # (B, L, D)
    uncond = encode_prompts(t2i, concept, [""] * len(prompts), device).to(unet.dtype)
    procs = concept.processors_for(unet, device) if concept is not None else {}
    with installed_processors(unet, procs):
        for t in sched.timesteps:
            out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = sched.step(guided(out_u, out_c, guidance), t, x, eta=eta, generator=gens).prev_sample
    return decode_latents(t2i.vae, x)


def class_prior_images(t2i, noun: str, n: int, seed: int, steps: int = 50, guidance: float = 6.0,
                       device: str | torch.device = "cpu", batch_size: int = 8) -> list[tuple[np.ndarray, str]]:
    """``n`` images of the base model for ``"a photo of a {noun}"`` (seeds ``seed + k``), with that caption.

    Sampled in chunks of ``batch_size`` (results are reproducible for a given ``batch_size``).
    """
    if int(n) < 0:
        raise ValueError(f"n: {n!r} must be ≥ 0")
    caption = PRIOR_PROMPT.format(noun=noun)
    out: list[tuple[np.ndarray, str]] = []
    for start in range(0, int(n), batch_size):
        k = min(batch_size, int(n) - start)
        imgs = sample(t2i, None, [caption] * k, [int(seed) + start + j for j in range(k)], steps, guidance,
                      device=device)
        out += [(img, caption) for img in imgs]
    return out


def customized_eps(t2i, concept: IcoConcept | None, device: str | torch.device = "cpu", output: str = "epsilon"):
    """The ICO model (base + the concept's attn2 k/v and V rows; ``None``: the base) as
    ``fn(z_t (B, C, h, w), t (B,) long | int, prompts) -> (B, C, h, w) float32`` — the signature of
    :func:`training.methods.infusion.customized_eps`, for the Latent Fisher divergence (SPEC §3).

    Unlike Infusion, every prompt goes through the fine-tuned k/v, so a non-customized prompt's output moves too.
    ``output="epsilon"`` converts a v-prediction to ε; ``"raw"`` returns the UNet output.
    """
    if output not in ("epsilon", "raw"):
        raise ValueError(f"output={output!r}: allowed 'epsilon', 'raw'")
    device = torch.device(device)
    sched = make_scheduler(t2i)
    alphas = sched.alphas_cumprod

    @torch.no_grad()
    def fn(z_t: torch.Tensor, t, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != z_t.shape[0]:
            raise ValueError(f"prompts ({len(prompts)}) and z_t rows ({z_t.shape[0]}) must match")
        unet = t2i.unet
        tt = torch.as_tensor(t, device=device).long()
        tt = tt.expand(z_t.shape[0]) if tt.ndim == 0 else tt.to(device)
        z = z_t.to(device, unet.dtype)
        cond = encode_prompts(t2i, concept, prompts, device).to(unet.dtype)
        procs = concept.processors_for(unet, device) if concept is not None else {}
        with installed_processors(unet, procs):
            out = unet(z, tt, encoder_hidden_states=cond).sample.float()
        if output == "raw" or sched.config.prediction_type == "epsilon":
            return out
        if sched.config.prediction_type != "v_prediction":
            raise ValueError(f"prediction_type {sched.config.prediction_type!r}: allowed epsilon, v_prediction")
        a = alphas.to(device)[tt].view(-1, 1, 1, 1).float()
        return a.sqrt() * out + (1 - a).sqrt() * z.float()   # ε = √ᾱ·v + √(1−ᾱ)·z_t

    return fn
