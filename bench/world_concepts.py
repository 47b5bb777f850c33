"""Per-concept methods on the synthetic world, judged by its oracle and encoders (issue 10's quality study).

Usage::

    .venv/bin/python bench/world_concepts.py --quick     # ~2-3 min on 2 cores: 2 subjects, 1 seed, few samples
    .venv/bin/python bench/world_concepts.py             # the recorded run (~13 min): writes
                                                         # bench/results/world_concepts.json

Concepts are world instances (``models/world/eval/subjects/<id>/{0..3}.png``: one instance, four reference images
in four training-split contexts); the prompts are the world's eval prompts ``"a {} {phrase}"`` (11 context phrases
per subject, ``models/world/eval/prompts.jsonl``). Six subjects, one per class, chosen by hand before any run for
distinct colours (:data:`SUBJECTS`); every (subject, training seed) is one *unit*, and every figure is a mean over
units ± its standard error over units (the spread of the study: training seed and subject together).

Methods (all trained on the same four images, no prior preservation — as ``configs/concepts/tiny.yaml``):

* ``ico``: :func:`training.methods.ico.train_ico` with ``prompt="ico"`` (per-image contexts, P = S = 1);
* ``manual``: the same trainer and steps with ``prompt="manual"``: the fixed template ``ico.MANUAL_PROMPT``
  ``"a photo of {phrase}"`` → ``"a photo of <new1> <new2> <new3> {noun}"`` (the "plain fine-tune" of the issue);
* ``infusion``: :func:`training.methods.infusion.train_infusion` (its default template ``"a photo of a {}"``);
* ``dci λ``: :func:`training.methods.dci.sample_dci` of the ``ico`` model, aux nouns = the world's classes;
* references: ``base`` (the world t2i on ``"a {class} {phrase}"``) and ``base+text`` (the world t2i told the
  instance in words, ``"a cyan circle with a white dot {phrase}"``: the world's instances are nameable, so this is
  what a customization method has to beat to be useful *here*).

Every sampler is the same: DDIM 20 steps (trailing), CFG 6.0, η 1.0 (ICO/DCI's defaults except the step count;
Infusion's own default CFG 8 / η 0 is not used so that methods differ only in the model). ICO/manual/DCI are
prompted ``"a <new1> <new2> <new3> {noun} {phrase}"``, Infusion and base ``"a {noun} {phrase}"``; CLIP-T always
scores ``"a {noun} {phrase}"`` (identifier removed).

Measures per image: **identity** = the oracle reads the subject's class, colour and mark (as
:mod:`training.world.assistant_eval`); **DINO** = mean cosine of ``dino_filter`` CLS embeddings to the four
references (:func:`training.metrics.dino_score`); **context** = the oracle reads the attribute value the phrase asks
for; **CLIP-T** (``clip_filter``, :func:`training.metrics.clip_t`). Splits: ``all`` prompts; ``novel`` = the asked
value appears in none of the four references (as the oracle reads them); ``held_out`` = the world's flag (the
(instance, target context) pair was never in any world model's training; few rows).

Divergence (SPEC §3 / D5): LFD = ½·mean over latent elements of ‖ε_base − ε_model‖², v-predictions converted to ε
by :func:`training.metrics.latent_fisher_divergence`; data latents = VAE posterior means of the world's source
images × the VAE's ``scaling_factor`` (0.932), t uniform over 1000, on (a) prompts of the *other* five classes × 11
phrases with sources of those classes, (b) the concept's own class prompts with sources of that class. W2 =
:func:`training.metrics.gaussian_w2` on re-encoded (posterior mean × scaling factor) latents of samples for
``"a {noun} {phrase}"`` (4×8×8 = 256 dims, no pooling needed) against base samples of the same seeds: Infusion's
customized samples of that prompt (its concept is the class word), ICO/manual's concept prompt ``"a V {noun} …"``
(the paper's "customized distribution") and, as a drift measure, the class prompt through their tuned layers; the
base-vs-base figure of other seeds is the noise floor of an unpaired comparison.

Composition: two Infusion concepts of one training seed in ``"a {A} on the left and a {B} on the right"``. The
world t2i never saw a two-object caption (its pool renders single-object scenes), so the oracle (one object per
image) cannot judge it; what is measured is whether each concept's colour is present (≥ ``COLOUR_MIN_PIXELS``
pixels within ``COLOUR_RADIUS`` of its RGB), against the foundational stream of the same seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, fmt_s, header, quiet_libraries, table  # noqa: E402

import torch  # noqa: E402

WORLD = REPO / "models" / "world"
#: one subject per class, distinct colours, marks none/white/black — fixed before any run
SUBJECTS = ("cyan-circle-whitedot", "blue-star-none", "yellow-triangle-none", "red-heart-blackdot",
            "purple-square-whitedot", "green-cross-none")
PAIRS = ((0, 1), (2, 3), (4, 5))  # indices into the subjects: Infusion compositions
SAMPLER = {"steps": 20, "guidance": 6.0, "eta": 1.0}
ICO = {"steps": 150, "learning_rate": 1e-3, "batch_size": 2}  # configs/concepts/tiny.yaml
INFUSION = {"steps": 60, "batch_size": 4, "grad_accum": 1}  # configs/concepts/tiny.yaml (lr: method default 0.01)
LAMBDAS = (float("-inf"), -2.0, -1.0, 0.0, 1.0, 2.0)
COLOUR_RADIUS = 60.0
COLOUR_MIN_PIXELS = 4
METRICS = ("identity", "dino", "context", "clip_t", "both", "class", "colour", "mark", "colour_mark")
W2_KEYS = ("base_vs_base_other_seeds", "infusion", "manual", "ico", "manual_class_prompt", "ico_class_prompt",
           "infusion_foundational_vs_base")


# ------------------------------------------------------------------------------------------------ helpers


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def pil(images):
    from PIL import Image

    return [Image.fromarray(np.asarray(a)) for a in images]


def mean_se(values) -> dict:
    """Mean ± standard error over units (NaN-free values)."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if v.size == 0:
        return {"mean": None, "se": None, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(f"{v.mean():.5g}"), "se": None if se is None else float(f"{se:.3g}"), "n": int(v.size)}


def pm(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + ("" if s["se"] is None else f" ± {s['se']:.{digits}f}")


def colour_present(image: np.ndarray, colour: str) -> bool:
    """At least ``COLOUR_MIN_PIXELS`` pixels within ``COLOUR_RADIUS`` (RGB distance) of the world colour."""
    from training.world import domain as D

    rgb = np.asarray(D.COLOURS[colour], np.float32)
    dist = np.linalg.norm(image.astype(np.float32) - rgb, axis=-1)
    return int((dist < COLOUR_RADIUS).sum()) >= COLOUR_MIN_PIXELS


class Judge:
    """Oracle + CLIP + DINO scoring of generated images, one record per image."""

    def __init__(self):
        from training.embedders import ClipEmbedder, DinoEmbedder
        from training.world.oracle import load_oracle

        self.oracle = load_oracle(WORLD / "oracle")
        self.clip = ClipEmbedder(str(WORLD / "clip_filter"))
        self.dino = DinoEmbedder(str(WORLD / "dino_filter"))
        self.checks: list[float] = []  # |per-image mean − training.metrics| on whole sets (cross-check)

    def score(self, images, inst, rows, refs, texts) -> list[dict]:
        """``rows[i]``: the eval row image i answers; ``texts[i]``: its CLIP-T text (identifier removed)."""
        from training import metrics

        read = self.oracle.predict_names(np.stack(images))
        g = self.dino.embed_images(pil(images)).double()  # (N, D)
        r = self.dino.embed_images(pil(refs)).double()  # (M, D)
        dino = (g @ r.mean(0)).tolist()  # mean pairwise cosine per image (rows are unit)
        ci = self.clip.embed_images(pil(images)).double()
        ct = self.clip.embed_texts(list(texts)).double()
        clip_t = (ci * ct).sum(-1).tolist()
        # the set-level figures must be the means of the per-image ones (same embedders, training.metrics)
        self.checks.append(abs(float(np.mean(dino)) - metrics.dino_score(self.dino, pil(images), pil(refs))))
        self.checks.append(abs(float(np.mean(clip_t)) - metrics.clip_t(self.clip, pil(images), list(texts))))
        out = []
        for i, row in enumerate(rows):
            ident = {a: read[a][i] == v for a, v in (("class", inst.cls), ("colour", inst.colour), ("mark", inst.mark))}
            identity = all(ident.values())
            context = read[row["attribute"]][i] == row["value"]
            out.append({"identity": float(identity), "dino": dino[i], "context": float(context),
                        "clip_t": clip_t[i], "both": float(identity and context),
                        "colour_mark": float(ident["colour"] and ident["mark"]),
                        **{k: float(v) for k, v in ident.items()},
                        "novel": row["novel"], "held_out": row["held_out"], "j": row["j"]})
        return out


def unit_means(records: list[dict], split: str) -> dict | None:
    keep = [r for r in records if split == "all" or r[split]]
    if not keep:
        return None
    return {m: float(np.mean([r[m] for r in keep])) for m in METRICS} | {"n": len(keep)}


def aggregate(units: dict, method: str, split: str) -> dict:
    """Mean ± s.e. over units of the per-unit means of every metric."""
    per = [u["methods"][method][split] for u in units.values() if u["methods"].get(method, {}).get(split)]
    return {m: mean_se([p[m] for p in per]) for m in METRICS} | {"images": int(sum(p["n"] for p in per))}


def paired(units: dict, a: str, b: str, split: str = "all") -> dict:
    """Mean ± s.e. over units of (a − b) per unit."""
    out = {}
    for m in METRICS:
        d = [u["methods"][a][split][m] - u["methods"][b][split][m] for u in units.values()
             if u["methods"].get(a, {}).get(split) and u["methods"].get(b, {}).get(split)]
        out[m] = mean_se(d)
    return out


# ------------------------------------------------------------------------------------------ the study


class Study:
    def __init__(self, args):
        from training.models.kit import load_role

        self.args = args
        self.t2i = load_role("t2i", WORLD / "t2i", dtype="float32", device="cpu").components
        self.judge = Judge()
        self.rows = [json.loads(line) for line in (WORLD / "eval" / "prompts.jsonl").read_text().splitlines()]
        self.timing: dict[str, float] = {}
        self.notes: dict[str, object] = {}
        self._sources = None
        self.infusion_params = {**INFUSION, "steps": args.infusion_steps}

    def tick(self, name: str, t0: float) -> None:
        self.timing[name] = round(self.timing.get(name, 0.0) + time.time() - t0, 1)

    # -------------------------------------------------------------------------------------- data

    def subject(self, sid: str):
        from training.world import domain as D

        inst = D.instance_from_id(sid)
        refs = [load_png(WORLD / "eval" / "subjects" / sid / f"{k}.png") for k in range(4)]
        read = self.judge.oracle.predict_names(np.stack(refs))
        rows = [dict(r) for r in self.rows if r["subject"] == sid]
        if self.args.prompts:
            rows = rows[: self.args.prompts]
        for j, r in enumerate(rows):
            r["j"] = j
            r["novel"] = r["value"] not in read[r["attribute"]]
        ref_ok = all(read[a][k] == v for k in range(4) for a, v in inst.labels().items())
        return inst, refs, rows, {"reference_contexts": [{a: read[a][k] for a in read} for k in range(4)],
                                  "oracle_reads_references_identity": ref_ok}

    def sources(self):
        """(class, scaled latent (4, 8, 8)) of every world source image (VAE posterior mean × scaling factor)."""
        if self._sources is None:
            from training.methods.ico import _latent_means, preprocess_images, vae_scaling

            files = sorted((WORLD / "sources").glob("*/*.png"))
            pix = preprocess_images([load_png(f) for f in files], 32)
            lat = _latent_means(self.t2i.vae, pix, "cpu", chunk=64) * vae_scaling(self.t2i.vae)
            self._sources = ([f.parent.name for f in files], lat)
        return self._sources

    @staticmethod
    def seed_of(unit_seed: int, s_idx: int, j: int, k: int) -> int:
        return 1_000_003 * unit_seed + 10_007 * s_idx + 101 * j + k

    # -------------------------------------------------------------------------------------- one unit

    def run_unit(self, s_idx: int, sid: str, seed: int) -> tuple[dict, dict]:
        from training.methods import dci, ico, infusion

        a, t2i = self.args, self.t2i
        inst, refs, rows, subj_meta = self.subject(sid)
        noun = inst.cls
        k_n = a.samples
        grid = [(r, k) for r in rows for k in range(k_n)]
        seeds = [self.seed_of(seed, s_idx, r["j"], k) for r, k in grid]
        texts = [r["prompt"].format(noun) for r, _ in grid]
        unit = {"subject": sid, "seed": seed, **subj_meta, "methods": {}, "train_s": {}, "final_loss": {}}
        records: dict[str, list[dict]] = {}

        def score(method, images, grid_rows=None):
            g = grid if grid_rows is None else grid_rows
            recs = self.judge.score(images, inst, [r for r, _ in g], refs, [r["prompt"].format(noun) for r, _ in g])
            records[method] = recs

        # train
        concepts = {}
        for name, prompt in (("ico", "ico"), ("manual", "manual")):
            t0 = time.time()
            concepts[name] = ico.train_ico(t2i, refs, noun, ico.IcoParams(**ICO, prompt=prompt), seed=seed)
            unit["train_s"][name] = round(time.time() - t0, 1)
            unit["final_loss"][name] = round(float(np.mean(concepts[name].losses[-20:])), 4)
            self.tick("train", t0)
        t0 = time.time()
        concepts["infusion"] = infusion.train_infusion(t2i, refs, noun, infusion.InfusionParams(**self.infusion_params),
                                                       seed=seed)
        unit["train_s"]["infusion"] = round(time.time() - t0, 1)
        unit["final_loss"]["infusion"] = round(float(np.mean(concepts["infusion"].losses[-10:])), 4)
        self.tick("train", t0)

        # sample + score: ICO, manual, Infusion, base, base+text
        t0 = time.time()
        images = {}
        for name in ("ico", "manual"):
            phrase = ico.concept_phrase(concepts[name])
            images[name] = self._chunks(lambda p, s, c=concepts[name]: ico.sample(t2i, c, p, s, **SAMPLER),
                                        [r["prompt"].format(phrase) for r, _ in grid], seeds)
        images["infusion"], images["infusion_foundational"] = [], []
        cu, fo = infusion.sample(t2i, [concepts["infusion"]], texts, seeds, **SAMPLER)
        images["infusion"], images["infusion_foundational"] = cu, fo
        images["base"] = self._chunks(lambda p, s: ico.sample(t2i, None, p, s, **SAMPLER), texts, seeds)
        images["base+text"] = self._chunks(lambda p, s: ico.sample(t2i, None, p, s, **SAMPLER),
                                           [r["prompt"].format(inst.phrase()) for r, _ in grid], seeds)
        self.tick("sample", t0)
        t0 = time.time()
        for name in ("ico", "manual", "infusion", "base", "base+text"):
            score(name, images[name])
        # Infusion's F stream is the base model with Infusion's own noise draws: same seeds as `base`
        # the colour detector of the composition study, on generated single-object images: does it fire for the
        # colour the oracle reads (hit) and stay silent for the other five (false alarm)?
        hit, fa = [], []
        for name in ("base+text", "ico"):
            read = self.judge.oracle.predict_names(np.stack(images[name]))["colour"]
            for im, c in zip(images[name], read):
                hit.append(colour_present(im, c))
                fa += [colour_present(im, o) for o in _colours() if o != c]
        unit["colour_detector_generated"] = {"hit_rate": float(np.mean(hit)), "false_alarm_rate": float(np.mean(fa))}
        unit["infusion_foundational_equals_base"] = float(np.mean(
            [np.array_equal(x, y) for x, y in zip(images["infusion_foundational"], images["base"])]))
        self.tick("score", t0)

        # DCI curve on the ico model: one sample (k = 0..dci_samples-1) per prompt per λ; plain = ico.sample rows
        t0 = time.time()
        dgrid = [(r, k) for r in rows for k in range(a.dci_samples)]
        dseeds = [self.seed_of(seed, s_idx, r["j"], k) for r, k in dgrid]
        phrase = ico.concept_phrase(concepts["ico"])
        plain_idx = [grid.index((r, k)) for r, k in dgrid]
        records["plain"] = [records["ico"][i] for i in plain_idx]
        lambdas = LAMBDAS if a.dci_inf_all or (s_idx == 0 and seed == a.seeds[0]) else LAMBDAS[1:]
        if a.skip_dci:
            lambdas = ()
        for lam in lambdas:
            params = dci.DciParams(lam=lam, steps=SAMPLER["steps"], guidance=SAMPLER["guidance"],
                                   eta=SAMPLER["eta"], aux_nouns=tuple(c for c in _classes()))
            ims = [dci.sample_dci(t2i, concepts["ico"], r["prompt"].format(phrase), s, params)
                   for (r, _), s in zip(dgrid, dseeds)]
            name = f"dci {lam:g}"
            score(name, ims, dgrid)
            if lam == float("-inf"):  # DCI at λ = −∞ against batched plain ICO sampling of the same seeds
                plain = [images["ico"][i] for i in plain_idx]
                unit["dci_-inf_vs_plain"] = {
                    "bit_identical": float(np.mean([np.array_equal(x, y) for x, y in zip(ims, plain)])),
                    "max_abs_pixel_diff": int(max(np.abs(x.astype(int) - y.astype(int)).max()
                                                  for x, y in zip(ims, plain)))}
        self.tick("dci", t0)

        # divergences
        t0 = time.time()
        unit["lfd"] = self.lfd(concepts, noun, seed, s_idx)
        self.tick("lfd", t0)
        t0 = time.time()
        unit["w2"] = self.w2(concepts, noun, seed, s_idx, rows)
        self.tick("w2", t0)

        for name, recs in records.items():
            unit["methods"][name] = {split: unit_means(recs, split) for split in ("all", "novel", "held_out")}
        return unit, concepts

    @staticmethod
    def _chunks(fn, prompts, seeds, size: int = 64):
        out = []
        for i in range(0, len(prompts), size):
            out += fn(prompts[i: i + size], seeds[i: i + size])
        return out

    # -------------------------------------------------------------------------------------- LFD

    def lfd(self, concepts, noun: str, seed: int, s_idx: int) -> dict:
        from training.attention.ico import installed_processors
        from training.methods import infusion
        from training.methods.ico import encode_prompts, make_scheduler
        from training.metrics import latent_fisher_divergence
        from training.world import domain as D

        t2i, unet = self.t2i, self.t2i.unet
        classes, lat = self.sources()
        phrases = list(D.PHRASES)

        def ico_fn(concept):
            @torch.no_grad()
            def fn(z, t, prompts):
                cond = encode_prompts(t2i, concept, list(prompts), "cpu")
                if concept is None:
                    return unet(z, t, encoder_hidden_states=cond).sample
                with installed_processors(unet, concept.processors_for(unet, "cpu")):
                    return unet(z, t, encoder_hidden_states=cond).sample
            return fn

        base = ico_fn(None)
        inf_base = infusion.foundational_eps(t2i, output="raw")
        inf_custom = infusion.customized_eps(t2i, [concepts["infusion"]], output="raw")
        out = {}
        for split, keep_cls, conds in (
                ("other_classes", lambda c: c != noun,
                 [f"a {c} {p}" for c in _classes() if c != noun for p in phrases]),
                ("own_class", lambda c: c == noun, [f"a {noun} {p}" for p in phrases])):
            z = lat[[i for i, c in enumerate(classes) if keep_cls(c)]]
            res = {}
            for name, fa, fb in (("manual", base, ico_fn(concepts["manual"])), ("ico", base, ico_fn(concepts["ico"])),
                                 ("infusion", inf_base, inf_custom)):
                gen = torch.Generator().manual_seed(7_000_000 + 1000 * seed + s_idx)  # same draws for every model
                r = latent_fisher_divergence(fa, fb, z, conds, make_scheduler(t2i), self.args.lfd_samples, gen)
                res[name] = r
            out[split] = res
        # the two base callables (ICO's prompt encoding vs Infusion's tokenizer padding) must agree
        gen = torch.Generator().manual_seed(1)
        z = torch.randn((4, 4, 8, 8), generator=gen)
        t = torch.tensor([10, 300, 600, 990])
        p = [f"a {noun} on the left"] * 4
        out["base_callables_max_abs_diff"] = float((base(z, t, p) - inf_base(z, t, p)).abs().max())
        return out

    # -------------------------------------------------------------------------------------- W2

    def _latents(self, images) -> torch.Tensor:
        from training.methods.ico import _latent_means, preprocess_images, vae_scaling

        return _latent_means(self.t2i.vae, preprocess_images(images, 32), "cpu", chunk=64) * vae_scaling(self.t2i.vae)

    def w2(self, concepts, noun: str, seed: int, s_idx: int, rows) -> dict:
        from training.methods import ico, infusion
        from training.metrics import gaussian_w2

        t2i, n = self.t2i, self.args.w2_samples
        prompts = [rows[i % len(rows)]["prompt"].format(noun) for i in range(n)]
        seeds_a = [8_000_000 + 1000 * s_idx + i for i in range(n)]  # same for every seed of a subject
        seeds_b = [9_000_000 + 1000 * s_idx + i for i in range(n)]
        key = (noun, n)
        if key not in getattr(self, "_w2_base", {}):
            self._w2_base = getattr(self, "_w2_base", {})
            base_a = ico.sample(t2i, None, prompts, seeds_a, **SAMPLER)
            base_b = ico.sample(t2i, None, prompts, seeds_b, **SAMPLER)
            self._w2_base[key] = (self._latents(base_a), self._latents(base_b))
        la, lb = self._w2_base[key]
        cu, fo = infusion.sample(t2i, [concepts["infusion"]], prompts, seeds_a, **SAMPLER)
        out = {"samples": n, "prompts": "a {noun} {phrase}, 11 phrases cycled",
               "base_vs_base_other_seeds": round(gaussian_w2(la, lb), 4),
               # Infusion's concept *is* the class word: its customized samples of the super-class prompts
               "infusion": round(gaussian_w2(self._latents(fo), self._latents(cu)), 4),
               "infusion_foundational_vs_base": round(gaussian_w2(la, self._latents(fo)), 4)}
        for name in ("manual", "ico"):
            c = concepts[name]
            # the concept ("a V noun {phrase}": the paper's customized distribution) and the class prompt itself
            # through the fine-tuned layers (language drift of "a noun {phrase}")
            concept_prompts = [p.replace(f"a {noun} ", f"a {ico.concept_phrase(c)} ", 1) for p in prompts]
            out[name] = round(gaussian_w2(la, self._latents(ico.sample(t2i, c, concept_prompts, seeds_a, **SAMPLER))),
                              4)
            out[f"{name}_class_prompt"] = round(gaussian_w2(la, self._latents(ico.sample(t2i, c, prompts, seeds_a,
                                                                                        **SAMPLER))), 4)
        return out

    # -------------------------------------------------------------------------------------- composition

    def compose(self, inf_concepts: dict, seed: int) -> list[dict]:
        from training.methods import infusion
        from training.world import domain as D

        out = []
        n = self.args.compose_samples
        for ia, ib in PAIRS:
            if ia >= len(self.subjects) or ib >= len(self.subjects):
                continue
            A, B = (D.instance_from_id(self.subjects[i]) for i in (ia, ib))
            ca, cb = inf_concepts[self.subjects[ia]], inf_concepts[self.subjects[ib]]
            prompt = f"a {A.cls} on the left and a {B.cls} on the right"
            seeds = [6_000_000 + 1000 * seed + 100 * ia + i for i in range(n)]
            both_c, both_f = infusion.sample(self.t2i, [ca, cb], [prompt] * n, seeds, **SAMPLER)
            only_a, _ = infusion.sample(self.t2i, [ca], [prompt] * n, seeds, **SAMPLER)
            only_b, _ = infusion.sample(self.t2i, [cb], [prompt] * n, seeds, **SAMPLER)
            rec = {"pair": [self.subjects[ia], self.subjects[ib]], "seed": seed, "prompt": prompt, "n": n}
            for name, ims in (("composed", both_c), ("foundational", both_f), ("only_A", only_a), ("only_B", only_b)):
                a_ok = np.array([colour_present(x, A.colour) for x in ims])
                b_ok = np.array([colour_present(x, B.colour) for x in ims])
                read = self.judge.oracle.predict_names(np.stack(ims))
                rec[name] = {"colour_A": float(a_ok.mean()), "colour_B": float(b_ok.mean()),
                             "both_colours": float((a_ok & b_ok).mean()),
                             "oracle_class_A": float(np.mean([c == A.cls for c in read["class"]])),
                             "oracle_class_B": float(np.mean([c == B.cls for c in read["class"]]))}
            out.append(rec)
        return out

    def colour_calibration(self) -> dict:
        """The colour detector on the references of every eval subject: hit rate on the image's own colour,
        false-alarm rate on each other world colour."""
        from training.world import domain as D

        hits, alarms = [], []
        for d in sorted((WORLD / "eval" / "subjects").iterdir()):
            inst = D.instance_from_id(d.name)
            for f in sorted(d.glob("*.png")):
                im = load_png(f)
                for c in D.COLOURS:
                    (hits if c == inst.colour else alarms).append(colour_present(im, c))
        return {"hit_rate": float(np.mean(hits)), "false_alarm_rate": float(np.mean(alarms)),
                "n_images": len(hits), "radius": COLOUR_RADIUS, "min_pixels": COLOUR_MIN_PIXELS,
                "generated": {k: mean_se([u["colour_detector_generated"][k] for u in self.units.values()])
                              for k in ("hit_rate", "false_alarm_rate")}}

    # -------------------------------------------------------------------------------------- driver

    def run(self) -> dict:
        a = self.args
        self.subjects = SUBJECTS[: a.subjects]
        units, inf_by_seed = {}, {}
        self.units = units
        t_all = time.time()
        for seed in a.seeds:
            inf_by_seed[seed] = {}
            for s_idx, sid in enumerate(self.subjects):
                t0 = time.time()
                unit, concepts = self.run_unit(s_idx, sid, seed)
                units[f"{sid}/seed{seed}"] = unit
                inf_by_seed[seed][sid] = concepts["infusion"]
                print(f"  unit {sid} seed {seed}: {time.time() - t0:.0f} s "
                      f"(train {unit['train_s']}, total so far {time.time() - t_all:.0f} s)", flush=True)
        t0 = time.time()
        composition = [r for seed in a.seeds for r in self.compose(inf_by_seed[seed], seed)]
        self.tick("compose", t0)
        methods = ["ico", "manual", "infusion", "base", "base+text", "plain"] + [f"dci {lam:g}" for lam in LAMBDAS]
        summary = {m: {split: aggregate(units, m, split) for split in ("all", "novel", "held_out")} for m in methods}
        summary = {m: v for m, v in summary.items() if v["all"]["images"]}
        comp_summary = {}
        for name in ("composed", "foundational", "only_A", "only_B"):
            comp_summary[name] = {k: mean_se([r[name][k] for r in composition])
                                  for k in ("colour_A", "colour_B", "both_colours", "oracle_class_A", "oracle_class_B")}
        comp_summary["composed_minus_foundational"] = {
            k: mean_se([r["composed"][k] - r["foundational"][k] for r in composition])
            for k in ("colour_A", "colour_B", "both_colours")}
        divergence = {}
        for split in ("other_classes", "own_class"):
            for m in ("manual", "ico", "infusion"):
                divergence[f"lfd {split} {m}"] = mean_se([u["lfd"][split][m]["lfd"] for u in units.values()])
        for m in W2_KEYS:
            divergence[f"w2 {m}"] = mean_se([u["w2"][m] for u in units.values()])
        return {
            "config": {"subjects": list(self.subjects), "seeds": list(a.seeds), "samples_per_prompt": a.samples,
                       "dci_samples_per_prompt": 0 if a.skip_dci else a.dci_samples,
                       "prompts_per_subject": len(self.subject(self.subjects[0])[2]),
                       "sampler": SAMPLER, "ico": ICO, "infusion": self.infusion_params,
                       "lambdas": [str(x) for x in LAMBDAS],
                       "dci_aux_nouns": list(_classes()), "lfd_samples": a.lfd_samples, "w2_samples": a.w2_samples,
                       "compose_samples": a.compose_samples, "manual_template": _manual_template(),
                       "vae_scaling_factor": float(self.t2i.vae.config.scaling_factor), "quick": a.quick},
            "summary": summary,
            "paired": {"ico_minus_manual": {s: paired(units, "ico", "manual", s) for s in ("all", "novel")},
                       "infusion_minus_manual": {s: paired(units, "infusion", "manual", s) for s in ("all", "novel")},
                       **{f"dci {lam:g}_minus_plain": paired(units, f"dci {lam:g}", "plain")
                          for lam in LAMBDAS[1:]}},
            "divergence": divergence,
            "composition": {"per_pair": composition, "summary": comp_summary,
                            "colour_detector": self.colour_calibration()},
            "checks": {"per_image_vs_training_metrics_max_abs": float(max(self.judge.checks)),
                       "dci_-inf_vs_plain": [u.get("dci_-inf_vs_plain") for u in units.values()
                                             if "dci_-inf_vs_plain" in u],
                       "lfd_base_callables_max_abs_diff": max(u["lfd"]["base_callables_max_abs_diff"]
                                                              for u in units.values()),
                       "infusion_foundational_equals_base": mean_se([u["infusion_foundational_equals_base"]
                                                                     for u in units.values()])},
            "units": units,
            "timing_s": {**self.timing, "total": round(time.time() - t_all, 1)},
        }


def _classes():
    from training.world import domain as D

    return D.CLASSES


def _colours():
    from training.world import domain as D

    return tuple(D.COLOURS)


def _manual_template() -> str:
    from training.methods.ico import MANUAL_PROMPT

    return MANUAL_PROMPT.format(phrase="<new1> <new2> <new3> {noun}")


# ------------------------------------------------------------------------------------------------ report


def report(res: dict) -> str:
    s, lines = res["summary"], []
    cfg = res["config"]
    lines.append(f"{len(cfg['subjects'])} subjects × seeds {cfg['seeds']} = {len(res['units'])} units; "
                 f"{cfg['prompts_per_subject']} prompts × {cfg['samples_per_prompt']} samples per unit and method; "
                 f"sampler DDIM {cfg['sampler']['steps']} steps, CFG {cfg['sampler']['guidance']}, "
                 f"η {cfg['sampler']['eta']}. Mean ± s.e. over units.\n")
    for split in ("all", "novel", "held_out"):
        rows = []
        for m in ("ico", "manual", "infusion", "base", "base+text"):
            if m in s:
                r = s[m][split]
                rows.append([m, pm(r["identity"]), pm(r["dino"]), pm(r["context"]), pm(r["clip_t"]), pm(r["both"]),
                             f"{fmt_s(r['class']['mean'])}/{fmt_s(r['colour']['mean'])}/{fmt_s(r['mark']['mean'])}",
                             pm(r["colour_mark"]), r["images"]])
        lines.append(f"Identity and editability — prompts: {split}")
        lines.append(table(["method", "identity (oracle)", "DINO", "context (oracle)", "CLIP-T", "both",
                            "class/colour/mark", "colour+mark", "images"], rows))
        lines.append("")
    rows = []
    for split in ("all", "novel"):
        d = res["paired"]["ico_minus_manual"][split]
        rows.append([f"ico − manual ({split})", pm(d["identity"]), pm(d["colour_mark"]), pm(d["dino"]),
                     pm(d["context"]), pm(d["clip_t"]), pm(d["both"])])
        d = res["paired"]["infusion_minus_manual"][split]
        rows.append([f"infusion − manual ({split})", pm(d["identity"]), pm(d["colour_mark"]), pm(d["dino"]),
                     pm(d["context"]), pm(d["clip_t"]), pm(d["both"])])
    lines.append("Paired differences per unit")
    lines.append(table(["difference", "identity", "colour+mark", "DINO", "context", "CLIP-T", "both"], rows))
    lines.append("")
    rows = []
    for m in ["plain"] + [f"dci {lam:g}" for lam in LAMBDAS]:
        if m in s:
            r = s[m]["all"]
            d = res["paired"].get(f"{m}_minus_plain")
            rows.append([m, pm(r["identity"]), pm(r["colour_mark"]), pm(r["dino"]), pm(r["context"]),
                         pm(r["clip_t"]), pm(r["both"]), "" if d is None else pm(d["identity"]),
                         "" if d is None else pm(d["context"]), r["images"]])
    lines.append("DCI over λ (ICO model; plain = ico.sample, same seeds and sampler)")
    lines.append(table(["sampling", "identity", "colour+mark", "DINO", "context", "CLIP-T", "both",
                        "Δidentity vs plain",
                        "Δcontext vs plain", "images"], rows))
    lines.append("")
    dv = res["divergence"]
    def sci(x):
        return "n/a" if x["mean"] is None else f"{x['mean']:.2e}" + ("" if x["se"] is None else f" ± {x['se']:.1e}")

    rows = [[m, sci(dv[f"lfd other_classes {m}"]), sci(dv[f"lfd own_class {m}"])]
            for m in ("manual", "ico", "infusion")]
    lines.append(f"Latent Fisher divergence to the base ({cfg['lfd_samples']} samples per unit; mean over latent "
                 "elements)")
    lines.append(table(["model", "other classes' prompts", "own class's prompts"], rows))
    lines.append("")
    rows = [[m, pm(dv[f"w2 {m}"])] for m in W2_KEYS]
    lines.append(f"W2 to base samples of 'a {{noun}} {{phrase}}' ({cfg['w2_samples']} samples per set, same seeds; "
                 "manual/ico: their concept prompt 'a V noun …', *_class_prompt: 'a noun …' through the tuned "
                 "layers; base_vs_base: other seeds, the sampling-noise floor)")
    lines.append(table(["model", "W2"], rows))
    lines.append("")
    cs = res["composition"]["summary"]
    rows = [[k, pm(v["colour_A"]), pm(v["colour_B"]), pm(v["both_colours"]), pm(v["oracle_class_A"]),
             pm(v["oracle_class_B"])] for k, v in cs.items() if k != "composed_minus_foundational"]
    d = cs["composed_minus_foundational"]
    rows.append(["composed − foundational", pm(d["colour_A"]), pm(d["colour_B"]), pm(d["both_colours"]), "", ""])
    cal = res["composition"]["colour_detector"]
    lines.append(f"Two Infusion concepts in 'a {{A}} on the left and a {{B}} on the right' "
                 f"({len(res['composition']['per_pair'])} pair×seed, {cfg['compose_samples']} samples each; "
                 f"colour detector on references: hit "
                 f"{cal['hit_rate']:.3f}, false alarm {cal['false_alarm_rate']:.3f}; on generated single objects "
                 f"vs the oracle's colour: hit {pm(cal['generated']['hit_rate'])}, false alarm "
                 f"{pm(cal['generated']['false_alarm_rate'])})")
    lines.append(table(["images", "colour A present", "colour B present", "both colours", "oracle class = A",
                        "oracle class = B"], rows))
    lines.append("")
    lines.append(f"checks: {json.dumps(res['checks'])}")
    lines.append(f"timing (s): {json.dumps(res['timing_s'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 subjects, 1 seed, 5 prompts, 1 sample: a smoke run")
    ap.add_argument("--subjects", type=int, default=None, help=f"how many of {SUBJECTS} (default 6)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1)")
    ap.add_argument("--samples", type=int, default=None, help="samples per prompt per method (default 2)")
    ap.add_argument("--dci-samples", type=int, default=1, help="samples per prompt per λ")
    ap.add_argument("--dci-inf-all", action="store_true", help="run λ = −∞ on every unit (default: the first)")
    ap.add_argument("--prompts", type=int, default=None, help="first N prompts per subject (default all 11)")
    ap.add_argument("--lfd-samples", type=int, default=None)
    ap.add_argument("--w2-samples", type=int, default=None)
    ap.add_argument("--compose-samples", type=int, default=None)
    ap.add_argument("--infusion-steps", type=int, default=INFUSION["steps"],
                    help="Infusion optimizer steps (diagnostic; the recorded run uses configs/concepts/tiny.yaml's 60)")
    ap.add_argument("--skip-dci", action="store_true", help="no DCI curve (diagnostic runs)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    quick = {"subjects": 2, "seeds": [0], "samples": 1, "prompts": 5, "lfd_samples": 32, "w2_samples": 16,
             "compose_samples": 4}
    full = {"subjects": 6, "seeds": [0, 1], "samples": 2, "prompts": None, "lfd_samples": 128, "w2_samples": 32,
            "compose_samples": 12}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if not 1 <= a.subjects <= len(SUBJECTS):
        raise ValueError(f"--subjects: {a.subjects}; allowed: 1..{len(SUBJECTS)}")
    out = Path(a.out) if a.out else REPO / ("bench/out/world_concepts_quick.json" if a.quick
                                           else "bench/results/world_concepts.json")
    torch.set_num_threads(2)
    quiet_libraries()
    header("World concepts: ICO vs manual prompt, DCI over λ, Infusion (LFD, W2, composition) — issue 10")
    res = Study(a).run()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    print(report(res))
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
