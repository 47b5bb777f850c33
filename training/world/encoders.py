"""The world's image/text encoders: ``clip_filter`` (open_clip), ``dino_filter`` (transformers ViT), trained here,
and the exact conversions that give ``clip_cond``, PromptNet's image encoder and ``dino_cond`` from them.

Usage::

    clip = train_clip(images, labels, CLIPTrainConfig(), seed=0)            # open_clip.CLIP
    vit = train_dino(images, labels, DinoTrainConfig(), seed=0)             # transformers.ViTModel
    cond = open_clip_to_hf_vision(clip, projection=True)                    # CLIPVisionModelWithProjection
    dinov2 = vit_to_dinov2(vit)                                             # transformers.Dinov2Model

Objectives (honest and stated):

* ``clip_filter`` — contrastive (image, caption) training with **multi-positive** targets: a caption is a
  positive for every image in the batch whose ground truth it describes (captions leave attributes out, so
  one caption fits several images); soft-target cross-entropy in both directions, learnable temperature.
* ``dino_filter`` — supervised contrastive learning on **instance identity**: two renders of the same instance
  in different contexts are positives, every other image a negative (SupCon, τ = 0.1), on the CLS token that
  the build's DINO scorer uses, plus a normalised-softmax instance-proxy term (one learned proxy per instance,
  cosine logits / τ, weight ``proxy_weight``; the proxies are discarded after training). It is not DINO's
  self-distillation; it is what makes "same instance across contexts" measurable in this world.
* ``clip_cond`` / PromptNet's encoder and ``dino_cond`` are *converted*, not trained: the CLIP conditioner is
  the clip_filter image tower in transformers' CLIP vision layout (``image_embeds`` equal to open_clip's
  ``encode_image``), and dino_cond is the ViT in DINOv2's layout (layer scale 1, same features). The tests
  check both equalities.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.world.optim import optimizer_step, warmup_cosine

from training.world import domain as D

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CLIPTrainConfig:
    embed_dim: int = 64
    vision_width: int = 96
    vision_layers: int = 3
    patch_size: int = 4
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 32
    steps: int = 1800
    batch_size: int = 128
    lr: float = 1e-3
    #: fraction of batches made of hard negatives: all classes of a few colours, several renders of each
    #: (class, colour) in other contexts, so a caption must get class and context right to find its images
    hard_batches: float = 0.5
    hard_colours: int = 2


@dataclass(frozen=True)
class DinoTrainConfig:
    width: int = 96
    layers: int = 3
    heads: int = 3
    patch_size: int = 4
    steps: int = 2000
    instances_per_batch: int = 64
    lr: float = 1e-3
    temperature: float = 0.1
    #: fraction of batches drawn from instances of a few colours only (hard negatives: same colour, other shape
    #: or mark), so that colour alone cannot solve the batch
    hard_batches: float = 0.0
    renders_per_instance: int = 2
    #: weight of a normalised-softmax instance classifier (one learned proxy per instance, cosine logits × 1/τ,
    #: discarded after training) added to SupCon; 0 = SupCon alone
    proxy_weight: float = 1.0


def normalize(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def open_clip_config(cfg: CLIPTrainConfig) -> dict:
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": D.IMAGE_SIZE, "layers": cfg.vision_layers, "width": cfg.vision_width,
                       "head_width": 32, "patch_size": cfg.patch_size},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.text_width,
                     "heads": 2, "layers": cfg.text_layers},
    }


# ------------------------------------------------------------------------------------------ captions


def stated_labels(inst: D.Instance, ctx: D.Context, drop: frozenset[str]) -> list[int]:
    """The labels a caption states, -1 where it leaves the attribute out (order of ``D.ATTRIBUTES``)."""
    labels = D.labels_of(inst, ctx)
    return [-1 if a in drop else labels[a] for a in D.ATTRIBUTES]


def random_caption(inst: D.Instance, ctx: D.Context, rng) -> tuple[str, list[int]]:
    """A training caption and the labels it states (a mark-less caption says nothing about the mark)."""
    drop = {a for a in ("colour", "mark", *D.CONTEXT_ATTRIBUTES) if rng.random() < 0.3}
    if inst.mark == "none":
        drop.add("mark")  # "a red star" does not say "no mark"
    order = list(range(4))
    rng.shuffle(order)
    text = D.caption(inst, ctx, drop=frozenset(drop), order=order, photo=rng.random() < 0.2)
    return text, stated_labels(inst, ctx, frozenset(drop))


def compatible(stated: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B_img, B_txt) bool: caption j's stated labels all agree with image i's ground truth."""
    s = stated[None, :, :]
    t = truth[:, None, :]
    return ((s < 0) | (s == t)).all(-1)


class _Tokens:
    """Caches open_clip token ids per caption text (the caption space is finite)."""

    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.tok = SimpleTokenizer(context_length=context_length)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, ids in zip(missing, self.tok(missing)):
                self.cache[t] = ids
        return torch.stack([self.cache[t] for t in texts])


def train_clip(images: np.ndarray, pairs: list[tuple[D.Instance, D.Context]], cfg: CLIPTrainConfig, seed: int,
               progress=None, device: str = "cpu"):
    """Batches and captions are drawn on the CPU from seeded generators and moved to ``device``."""
    import random

    import open_clip

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    model = open_clip.CLIP(**open_clip_config(cfg)).to(device)
    tokens = _Tokens(cfg.context_length)
    pixels = normalize(images, OPENAI_MEAN, OPENAI_STD)
    truth_all = torch.tensor([[D.labels_of(i, c)[a] for a in D.ATTRIBUTES] for i, c in pairs])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = warmup_cosine(opt, cfg.steps, 0.1)
    by_cc: dict[tuple[int, int], list[int]] = {}
    for i, (inst, _) in enumerate(pairs):
        by_cc.setdefault((D.CLASSES.index(inst.cls), list(D.COLOURS).index(inst.colour)), []).append(i)
    by_cc_t = {k: torch.tensor(v) for k, v in by_cc.items()}
    model.train()
    for step in range(cfg.steps):
        if torch.rand((), generator=gen).item() < cfg.hard_batches:
            idx = _hard_clip_batch(by_cc_t, cfg, gen)
        else:
            idx = torch.randint(len(pixels), (cfg.batch_size,), generator=gen)
        caps = [random_caption(*pairs[i], rng) for i in idx.tolist()]
        stated = torch.tensor([s for _, s in caps])
        img = F.normalize(model.encode_image(pixels[idx].to(device)), dim=-1)
        txt = F.normalize(model.encode_text(tokens([c for c, _ in caps]).to(device)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        pos = compatible(stated, truth_all[idx]).float().to(device)  # (B, B); the diagonal is always compatible
        loss = 0.5 * (F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
                      + F.cross_entropy(logits.T, (pos / pos.sum(0, keepdim=True)).T))
        value = optimizer_step(opt, sched, loss)
        if progress is not None:
            progress(step, {"loss": value, "scale": model.logit_scale.exp().item()})
    return model.eval().cpu()


def _hard_clip_batch(by_cc: dict[tuple[int, int], torch.Tensor], cfg: CLIPTrainConfig, gen) -> torch.Tensor:
    """Every class of ``hard_colours`` random colours, ``batch_size`` images split evenly among those
    (class, colour) groups (random renders: other contexts and marks)."""
    colours = torch.randperm(len(D.COLOURS), generator=gen)[: cfg.hard_colours].tolist()
    keys = [(c, col) for col in colours for c in range(len(D.CLASSES)) if (c, col) in by_cc]
    per = max(1, cfg.batch_size // len(keys))
    idx = [by_cc[k][torch.randint(len(by_cc[k]), (per,), generator=gen)] for k in keys]
    return torch.cat(idx)[: cfg.batch_size]


# ------------------------------------------------------------------------------------------ DINO


def make_vit(cfg: DinoTrainConfig):
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=D.IMAGE_SIZE, patch_size=cfg.patch_size, hidden_size=cfg.width,
                              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                              intermediate_size=2 * cfg.width, hidden_act="gelu"), add_pooling_layer=False)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) over unit rows ``z`` (N, D) with integer ``labels`` (N,)."""
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp_min(1)).mean()


def train_dino(images: np.ndarray, instance_ids: np.ndarray, cfg: DinoTrainConfig, seed: int, progress=None,
               device: str = "cpu", groups_of: np.ndarray | None = None):
    """``instance_ids``: (N,) int instance index of each image; batches hold ``renders_per_instance`` renders of
    each of k instances (drawn on the CPU from a seeded generator, moved to ``device``). ``groups_of``: (K,) a
    nuisance group per instance index (the colour): a ``hard_batches`` fraction of batches takes its instances
    from as few groups as fill it, so every negative shares the query's group."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_vit(cfg).to(device)
    pixels = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    by_inst = {}
    for i, k in enumerate(instance_ids.tolist()):
        by_inst.setdefault(k, []).append(i)
    keys = sorted(k for k, v in by_inst.items() if len(v) >= 2)
    groups = [torch.tensor(by_inst[k]) for k in keys]
    by_group: dict[int, list[int]] = {}
    if groups_of is not None:
        for g, k in enumerate(keys):
            by_group.setdefault(int(groups_of[k]), []).append(g)
    proxies = torch.nn.Parameter(torch.randn(len(groups), cfg.width, generator=gen).to(device) * 0.02)
    params = list(model.parameters()) + ([proxies] if cfg.proxy_weight else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    sched = warmup_cosine(opt, cfg.steps, 0.1)
    model.train()
    for step in range(cfg.steps):
        hard = by_group and torch.rand((), generator=gen).item() < cfg.hard_batches
        if hard:
            order = sorted(by_group)
            chosen = []
            for gi in torch.randperm(len(order), generator=gen).tolist():
                chosen += by_group[order[gi]]
                if len(chosen) >= cfg.instances_per_batch:
                    break
            chosen = chosen[: cfg.instances_per_batch]
        else:
            chosen = torch.randperm(len(groups), generator=gen)[: cfg.instances_per_batch].tolist()
        idx, lab = [], []
        for g in chosen:
            members = groups[g]
            pick = members[torch.randperm(len(members), generator=gen)[: cfg.renders_per_instance]]
            idx += pick.tolist()
            lab += [g] * len(pick)
        z = F.normalize(model(pixel_values=pixels[idx].to(device)).last_hidden_state[:, 0], dim=-1)
        target = torch.tensor(lab, device=device)
        loss = supcon_loss(z, target, cfg.temperature)
        if cfg.proxy_weight:
            logits = z @ F.normalize(proxies, dim=-1).T / cfg.temperature
            loss = loss + cfg.proxy_weight * F.cross_entropy(logits, target)
        value = optimizer_step(opt, sched, loss)
        if progress is not None:
            progress(step, {"loss": value})
    return model.eval().cpu()


# ------------------------------------------------------------------------------------------ conversions


@torch.no_grad()
def open_clip_to_hf_vision(clip, projection: bool = True):
    """The open_clip image tower as transformers ``CLIPVisionModelWithProjection`` (``projection``) or
    ``CLIPVisionModel``; ``image_embeds`` equal ``clip.encode_image`` (up to float rounding)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    v = clip.visual
    width = v.conv1.out_channels
    blocks = v.transformer.resblocks
    heads = blocks[0].attn.num_heads
    cfg = CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=heads, image_size=v.image_size[0] if isinstance(v.image_size, tuple) else v.image_size,
        patch_size=v.conv1.kernel_size[0], projection_dim=v.proj.shape[1], hidden_act="gelu",
        layer_norm_eps=v.ln_pre.eps,
    )
    model = CLIPVisionModelWithProjection(cfg).eval()
    tower = model.vision_model
    emb = tower.embeddings
    emb.patch_embedding.weight.copy_(v.conv1.weight)
    emb.class_embedding.copy_(v.class_embedding)
    emb.position_embedding.weight.copy_(v.positional_embedding)
    tower.pre_layrnorm.load_state_dict(v.ln_pre.state_dict())
    for blk, layer in zip(blocks, tower.encoder.layers):
        wq, wk, wv = blk.attn.in_proj_weight.chunk(3)
        bq, bk, bv = blk.attn.in_proj_bias.chunk(3)
        for proj, w, b in ((layer.self_attn.q_proj, wq, bq), (layer.self_attn.k_proj, wk, bk),
                           (layer.self_attn.v_proj, wv, bv)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        layer.self_attn.out_proj.load_state_dict(blk.attn.out_proj.state_dict())
        layer.layer_norm1.load_state_dict(blk.ln_1.state_dict())
        layer.layer_norm2.load_state_dict(blk.ln_2.state_dict())
        layer.mlp.fc1.load_state_dict(blk.mlp.c_fc.state_dict())
        layer.mlp.fc2.load_state_dict(blk.mlp.c_proj.state_dict())
    tower.post_layernorm.load_state_dict(v.ln_post.state_dict())
    model.visual_projection.weight.copy_(v.proj.T)
    if projection:
        return model
    plain = CLIPVisionModel(cfg).eval()  # transformers 5 keeps this one's tower at the top level
    plain.load_state_dict({k.removeprefix("vision_model."): t for k, t in tower.state_dict(prefix="vision_model.").items()},
                          strict=True)
    return plain


@torch.no_grad()
def vit_to_dinov2(vit):
    """A transformers ``ViTModel`` (no pooler) as ``Dinov2Model`` with layer scale 1: the same hidden states."""
    from transformers import Dinov2Config, Dinov2Model

    c = vit.config
    model = Dinov2Model(Dinov2Config(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        mlp_ratio=c.intermediate_size // c.hidden_size, image_size=c.image_size, patch_size=c.patch_size,
        hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, layerscale_value=1.0, qkv_bias=c.qkv_bias,
    )).eval()
    renames = (("layers.", "encoder.layer."), (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."))
    state = {}
    for key, value in vit.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        state[key] = value
    target = model.state_dict()
    for key, value in target.items():
        if key.endswith("lambda1"):
            state[key] = torch.ones_like(value)
    state["embeddings.mask_token"] = target["embeddings.mask_token"]  # unused without a bool_masked_pos
    model.load_state_dict(state, strict=True)
    return model
