"""The world's gates: every figure that says whether a world model *works*, measured from ground truth.

Usage::

    results = measure_gates("models/world")            # loads every role through the model kit
    print(format_table(results)); ok = all(g.passed for g in results)

Each gate is a :class:`Gate` (name, figure, target, comparison, chance level, detail). The pure computations
(:func:`retrieval_top1`, :func:`attribute_rates`, :func:`margin_stats`, :func:`oracle_agreement`) take arrays and
are unit-tested on hand-made cases; :func:`measure_gates` renders fresh evaluation data from fixed seeds (never
the training seeds), runs the models and fills the table.

Gates (targets from the world's specification; none is lowered silently — a missed one fails ``cafe world check``):

* ``oracle``: every attribute right on fresh ground-truth renders (all pairs), ≥ 0.98.
* ``t2i.*``: images generated for **held-out** full captions (DDIM 30, CFG 2.5), judged by the oracle: class and
  colour both right, and each context attribute right, each ≥ 0.80.
* ``vae.class+colour``: the same held-out pairs rendered, encoded and decoded by the t2i's VAE, judged by the
  oracle: class and colour both right, ≥ 0.95. What the VAE loses, no UNet can generate: this is the t2i gate's
  ceiling (the third world's VAE reached 0.85, and its t2i 0.77).
* ``clip.retrieval``: zero-shot caption retrieval top-1 on held-out renders among all
  ``class × colour × context`` captions (1,728; the mark is left to the DINO gates), ≥ 0.90.
  ``clip.context_margin``: the fraction of (image, wrong-context caption) pairs — one context phrase changed —
  in which the correct caption scores higher, ≥ 0.95; the mean margin is stated.
* ``dino_filter.retrieval`` / ``dino_cond.retrieval``: same-instance retrieval top-1 across contexts (query context
  ≠ gallery context, held-out renders), ≥ 0.90; ``*.margin``: mean cosine of same-instance pairs minus
  different-instance pairs of the same class, > 0 (the figure is the fraction of such comparisons won).
* ``clip_cond.consistent``: max |clip_cond image_embeds − clip_filter encode_image|, ≤ 1e-3.
* ``llm.reply``: greedy replies of the world ``llm`` to requests for (class, phrase) pairs it never saw in
  training name the requested class and phrase (and no other class), ≥ 0.90 (:mod:`training.world.llm`).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.world import domain as D  # numpy + PIL only: the report imports this module without torch

EVAL_SEED = 10_007  # evaluation renders and generations never reuse a training seed


@dataclass
class Gate:
    name: str
    figure: float
    target: float
    chance: float
    comparison: str = ">="  # ">=", ">" or "<="
    detail: str = ""

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.figure):
            return False
        return {">=": self.figure >= self.target, ">": self.figure > self.target,
                "<=": self.figure <= self.target}[self.comparison]

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


# ------------------------------------------------------------------------------------------ pure computations


def retrieval_top1(queries: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray,
                   gallery_labels: np.ndarray) -> float:
    """Fraction of queries whose most similar gallery row (cosine) has the query's label."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    best = np.argmax(q @ g.T, axis=1)
    return float(np.mean(gallery_labels[best] == query_labels))


def attribute_rates(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy, plus ``class+colour`` (both right) and ``all`` (every given attribute right)."""
    rates = {k: float(np.mean(pred[k] == truth[k])) for k in truth}
    if "class" in truth and "colour" in truth:
        rates["class+colour"] = float(np.mean((pred["class"] == truth["class"]) & (pred["colour"] == truth["colour"])))
    rates["all"] = float(np.mean(np.all([pred[k] == truth[k] for k in truth], axis=0)))
    return rates


def margin_stats(emb: np.ndarray, instance: np.ndarray, cls: np.ndarray) -> tuple[float, float, float]:
    """(mean same-instance cosine, mean different-instance same-class cosine, fraction of comparisons won).

    "Won": for each image, its mean similarity to same-instance images exceeds its mean similarity to
    different instances of the same class. Pairs of an image with itself are excluded.
    """
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    n = len(e)
    eye = np.eye(n, dtype=bool)
    same = (instance[:, None] == instance[None, :]) & ~eye
    diff = (cls[:, None] == cls[None, :]) & (instance[:, None] != instance[None, :])
    rows = same.any(1) & diff.any(1)
    s_row = np.where(same, sim, 0).sum(1)[rows] / same.sum(1)[rows]
    d_row = np.where(diff, sim, 0).sum(1)[rows] / diff.sum(1)[rows]
    return float(sim[same].mean()), float(sim[diff].mean()), float(np.mean(s_row > d_row))


def oracle_agreement(kept: np.ndarray, good: np.ndarray) -> dict[str, float]:
    """Precision/recall of the filter's "kept" against the oracle's "good" (instruction followed and identity
    kept), plus counts. NaN where a ratio has no denominator."""
    kept, good = np.asarray(kept, bool), np.asarray(good, bool)
    tp = int(np.sum(kept & good))
    return {
        "rows": int(len(kept)), "kept": int(kept.sum()), "oracle_good": int(good.sum()), "kept_and_good": tp,
        "precision": tp / kept.sum() if kept.sum() else float("nan"),
        "recall": tp / good.sum() if good.sum() else float("nan"),
        "agreement": float(np.mean(kept == good)) if len(kept) else float("nan"),
    }


# ------------------------------------------------------------------------------------------ measurement


def _eval_pairs(n: int, split: str, salt: str) -> list[tuple[D.Instance, D.Context]]:
    return D.sample_pairs(n, D._u64("eval", salt, EVAL_SEED) % 2**31, split)


def full_caption_grid() -> tuple[list[str], np.ndarray]:
    """Every ``class × colour × context`` caption (canonical phrase order, no mark) and its labels (N, 6)."""
    caps, labels = [], []
    for cls in D.CLASSES:
        for col in D.COLOURS:
            for ctx in D.all_contexts():
                inst = D.Instance(cls, col, "none")
                caps.append(D.caption(inst, ctx))
                lab = D.labels_of(inst, ctx)
                labels.append([lab[a] for a in ("class", "colour", *D.CONTEXT_ATTRIBUTES)])
    return caps, np.array(labels)


def _clip_embed(clip_loaded, images: np.ndarray | None = None, texts: list[str] | None = None) -> np.ndarray:
    import torch

    from training.world.encoders import OPENAI_MEAN, OPENAI_STD, normalize

    c = clip_loaded.components
    p = next(c.model.parameters())
    with torch.no_grad():
        if images is not None:
            pixels = normalize(images, OPENAI_MEAN, OPENAI_STD).to(p.device, p.dtype)
            return c.model.encode_image(pixels).float().cpu().numpy()
        out = [c.model.encode_text(c.tokenizer(texts[i: i + 1024]).to(p.device)).float().cpu().numpy()
               for i in range(0, len(texts), 1024)]
        return np.concatenate(out)


def _vision_embed(loaded, images: np.ndarray) -> np.ndarray:
    import torch
    from PIL import Image

    c = loaded.components
    pix = c.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        return c.model(pixel_values=pix.to(c.model.device, c.model.dtype)).last_hidden_state[:, 0].float().cpu().numpy()


def measure_gates(world_dir: str | os.PathLike, *, n_oracle: int = 2000, n_t2i: int = 288, n_clip: int = 500,
                  progress=print, device: str = "cpu", samples_path: str | os.PathLike | None = None) -> list[Gate]:
    """Measure every gate on the models in ``world_dir`` (see the module docstring); ``samples_path`` also
    writes a grid of the first 48 t2i generations (held-out captions) as a PNG."""
    import torch

    from training.models.kit import load_role
    from training.world.oracle import accuracy, load_oracle
    from training.world.t2i import decode_latents, encode_latents, generate

    world = Path(world_dir)
    gates: list[Gate] = []
    attr_k = {a: len(v) for a, v in D.ATTRIBUTES.items()}

    oracle = load_oracle(world / "oracle", device)
    imgs, labels = D.render_pairs(_eval_pairs(n_oracle, "all", "oracle"), EVAL_SEED)
    acc = accuracy(oracle.predict(imgs), labels)
    gates.append(Gate("oracle", acc["all"], 0.98, math.prod(1 / k for k in attr_k.values()),
                      detail=" ".join(f"{k}={v:.3f}" for k, v in acc.items() if k != "all")))
    progress(f"gate oracle: {acc['all']:.4f}")

    # t2i on held-out full captions
    t2i = load_role("t2i", world / "t2i", device=device)
    pairs = _eval_pairs(n_t2i, "held_out", "t2i")
    prompts = [D.caption(i, c) for i, c in pairs]
    seeds = [D._u64("t2i-seed", EVAL_SEED, k) % 2**31 for k in range(len(pairs))]
    progress(f"gate t2i: sampling {len(prompts)} held-out captions × 30 steps (the slowest gate on a CPU)")
    gen = generate(t2i.components, prompts, seeds, steps=30, guidance=2.5, progress=progress)
    if samples_path is not None:
        from PIL import Image

        k = D.IMAGE_SIZE
        grid = gen[:48].reshape(6, 8, k, k, 3).transpose(0, 2, 1, 3, 4).reshape(6 * k, 8 * k, 3)
        Image.fromarray(grid).save(samples_path)
        Path(samples_path).with_suffix(".txt").write_text("\n".join(prompts[:48]) + "\n")
    truth = {a: np.array([D.labels_of(i, c)[a] for i, c in pairs]) for a in D.ATTRIBUTES}
    rates = attribute_rates(oracle.predict(gen), truth)
    gates.append(Gate("t2i.class+colour", rates["class+colour"], 0.80, 1 / 36, detail=f"mark={rates['mark']:.3f} "
                      f"all-7={rates['all']:.3f} (held-out captions, DDIM 30, CFG 2.5)"))
    for a in D.CONTEXT_ATTRIBUTES:
        gates.append(Gate(f"t2i.{a}", rates[a], 0.80, 1 / attr_k[a]))
    progress(f"gate t2i: {rates}")

    # the t2i's ceiling: the same held-out pairs rendered, passed through the t2i's VAE, judged by the oracle
    renders, _ = D.render_pairs(pairs, EVAL_SEED)
    rec = decode_latents(t2i.components.vae, encode_latents(t2i.components.vae, renders))
    vae_rates = attribute_rates(oracle.predict(rec), truth)
    gates.append(Gate("vae.class+colour", vae_rates["class+colour"], 0.95, 1 / 36,
                      detail=f"mark={vae_rates['mark']:.3f} style={vae_rates['style']:.3f} (reconstructions of the "
                      f"t2i gate's held-out pairs; the t2i gate's ceiling)"))
    progress(f"gate vae: {vae_rates}")

    # clip_filter
    clip = load_role("clip_filter", world / "clip_filter", device=device)
    pairs = _eval_pairs(n_clip, "held_out", "clip")
    imgs, _ = D.render_pairs(pairs, EVAL_SEED + 1)
    img_emb = _clip_embed(clip, images=imgs)
    caps, cap_labels = full_caption_grid()
    txt_emb = _clip_embed(clip, texts=caps)
    q_lab = np.array([[D.labels_of(i, c)[a] for a in ("class", "colour", *D.CONTEXT_ATTRIBUTES)] for i, c in pairs])
    key = lambda lab: lab @ np.array([10**k for k in range(lab.shape[1])])  # noqa: E731  (a row's unique code)
    top1 = retrieval_top1(img_emb, txt_emb, key(q_lab), key(cap_labels))
    gates.append(Gate("clip.retrieval", top1, 0.90, 1 / len(caps), detail=f"{len(pairs)} held-out images × "
                      f"{len(caps)} captions"))
    rng = random.Random(EVAL_SEED)
    right, wrong = [], []
    for inst, ctx in pairs:
        attr = rng.choice(D.CONTEXT_ATTRIBUTES)
        other = rng.choice([v for v in D.ATTRIBUTES[attr] if v != getattr(ctx, attr)])
        right.append(D.caption(inst, ctx))
        wrong.append(D.caption(inst, D.Context(**{**ctx.labels(), attr: other})))
    e_r, e_w = _clip_embed(clip, texts=right), _clip_embed(clip, texts=wrong)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos_r = np.sum(unit(img_emb) * unit(e_r), 1)
    cos_w = np.sum(unit(img_emb) * unit(e_w), 1)
    gates.append(Gate("clip.context_margin", float(np.mean(cos_r > cos_w)), 0.95, 0.5,
                      detail=f"CLIP-T correct {cos_r.mean():.3f} vs one-context-phrase-wrong {cos_w.mean():.3f} "
                      f"(mean margin {np.mean(cos_r - cos_w):.3f})"))
    progress(f"gate clip: top1={top1:.3f}")

    # clip_cond = clip_filter's image tower
    cond = load_role("clip_cond", world / "clip_cond", device=device)
    from training.world.encoders import OPENAI_MEAN, OPENAI_STD, normalize

    with torch.no_grad():
        emb_c = cond.components.model(pixel_values=normalize(imgs[:64], OPENAI_MEAN, OPENAI_STD).to(device)
                                      ).image_embeds.cpu().numpy()
    diff = float(np.abs(emb_c - img_emb[:64]).max())
    gates.append(Gate("clip_cond.consistent", diff, 1e-3, float("nan"), "<=",
                      "max |clip_cond image_embeds − clip_filter encode_image| on 64 renders"))

    # dino roles: same instance across contexts
    insts = D.all_instances()
    rng = random.Random(EVAL_SEED + 2)
    ctxs = D.all_contexts()
    gallery_pairs, query_pairs = [], []
    for inst in insts:
        held = [c for c in ctxs if D.is_held_out(inst, c)]
        gc = rng.choice([c for c in ctxs if not D.is_held_out(inst, c)])
        gallery_pairs.append((inst, gc))
        query_pairs += [(inst, c) for c in rng.sample(held, min(3, len(held))) if c != gc]
    g_img, _ = D.render_pairs(gallery_pairs, EVAL_SEED + 3)
    q_img, _ = D.render_pairs(query_pairs, EVAL_SEED + 4)
    q_inst = np.array([insts.index(i) for i, _ in query_pairs])
    g_inst = np.arange(len(insts))
    q_cls = np.array([D.CLASSES.index(i.cls) for i, _ in query_pairs])
    q_col = np.array([list(D.COLOURS).index(i.colour) for i, _ in query_pairs])
    for role in ("dino_filter", "dino_cond"):
        loaded = load_role(role, world / role, device=device)
        qe, ge = _vision_embed(loaded, q_img), _vision_embed(loaded, g_img)
        top1 = retrieval_top1(qe, ge, q_inst, g_inst)
        gates.append(Gate(f"{role}.retrieval", top1, 0.90, 1 / len(insts),
                          detail=f"{len(query_pairs)} held-out queries × {len(insts)} instances, other contexts"))
        s, d, won = margin_stats(qe, q_inst, q_cls)
        _, d_col, won_col = margin_stats(qe, q_inst, q_col)  # the harder comparison: same colour, other shape/mark
        gates.append(Gate(f"{role}.margin", won, 0.5, 0.5, ">",
                          detail=f"same-instance cos {s:.3f} vs other-instance same-class {d:.3f} "
                          f"(margin {s - d:.3f}); figure = fraction of images with same > other; "
                          f"vs other-instance same-colour {d_col:.3f} (won {won_col:.3f})"))
        progress(f"gate {role}: top1={top1:.3f} margin={s - d:.3f}")

    gates.append(_llm_gate(world, device))
    progress(f"gate llm: {gates[-1].figure:.3f}")
    return gates


def _llm_gate(world: Path, device: str) -> Gate:
    from training.models.kit import load_role
    from training.world.llm import reply_accuracy, requests

    llm = load_role("llm", world / "llm", device=device).components
    rate, examples = reply_accuracy(llm.model, llm.tokenizer, "held_out")
    n = len(requests("held_out"))
    first = examples[0]
    return Gate("llm.reply", rate, 0.90, float("nan"), detail=f"{n} held-out requests (class × phrase never in "
                f"training); e.g. {first[0]!r} → {first[1]!r}")


def format_table(gates: list[Gate]) -> str:
    lines = [f"{'gate':24s} {'figure':>9s} {'target':>10s} {'chance':>8s}  ok  detail"]
    for g in gates:
        chance = "—" if not math.isfinite(g.chance) else (f"{g.chance:.2e}" if g.chance < 1e-3 else f"{g.chance:.3f}")
        fig = f"{g.figure:.2e}" if abs(g.figure) < 1e-2 and g.figure != 0 else f"{g.figure:.4f}"
        lines.append(f"{g.name:24s} {fig:>9s} {g.comparison + ' ' + format(g.target, 'g'):>10s} {chance:>8s}  "
                     f"{'yes' if g.passed else 'NO ':3s} {g.detail}")
    return "\n".join(lines)
