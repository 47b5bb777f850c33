"""``cafe eval``: a trained assistant on the DreamBench protocol (SPEC §2, §3), beside its trivial baselines.

Usage::

    report = evaluate_checkpoint(cfg, mllm_dir, diffusion_dir, out=Storage("outputs/eval/r0"))
    print(format_table(report))

For every (subject, prompt) of ``pipeline.eval.subjects`` and every seed, four methods make one image
(:data:`training.world.assistant_eval.METHODS`): the **assistant** (MLLM → predicted CLIP embedding → diffusion),
its **direct** mode (CLIP of the base model's image of the prompt), the **input** returned unchanged, and the base
**t2i** model from the text. Metrics per method:

* DreamBench: **DINO** and **CLIP-I** — mean pairwise cosine between a subject's generated images and its
  reference images, averaged over subjects (± s.e. over subjects); **CLIP-T** — mean cosine of each image with
  its prompt, the identifier removed (the prompts here name the class, so nothing is removed).
* With ``pipeline.eval.oracle`` (the synthetic world): the oracle's **identity kept**, **instruction followed** and
  **both** rates (± binomial s.e.), over all rows and over held-out rows.

Outputs: ``metrics.json``, ``table.md`` and ``samples.png`` (first rows, one column per method).
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np

from pipeline.store import Storage

METRICS = ("dino", "clip_i", "clip_t")


def subject_mean(values: np.ndarray, subjects: list[str]) -> dict:
    """Mean over subjects of each subject's mean, with the standard error over subjects."""
    by: dict[str, list[float]] = {}
    for v, s in zip(values, subjects):
        by.setdefault(s, []).append(float(v))
    means = np.array([np.mean(v) for v in by.values()])
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else None
    return {"mean": round(float(means.mean()), 4), "se": None if se is None else round(se, 4), "subjects": len(means)}


def dreambench(clip, dino, images: list[np.ndarray], meta: list[dict], references: dict[str, list[np.ndarray]]) -> dict:
    """DINO, CLIP-I and CLIP-T of one method's images (``meta[i]`` describes ``images[i]``).

    Per image, DINO and CLIP-I are its mean cosine with the subject's references; the mean over a subject's images
    of that is the subject's mean pairwise cosine (DreamBench), then averaged over subjects.
    """
    from PIL import Image

    pil = lambda a: Image.fromarray(np.asarray(a, np.uint8))  # noqa: E731
    subjects = [m["subject"] for m in meta]
    names = sorted(references)
    ref_clip = {s: clip.embed_images([pil(x) for x in references[s]]).double().mean(0) for s in names}
    ref_dino = {s: dino.embed_images([pil(x) for x in references[s]]).double().mean(0) for s in names}
    gen = [pil(x) for x in images]
    g_clip = clip.embed_images(gen).double()
    g_dino = dino.embed_images(gen).double()
    t_clip = clip.embed_texts([f"a {m['class']} {m['phrase']}" for m in meta]).double()
    clip_i = np.array([float(g_clip[i] @ ref_clip[s]) for i, s in enumerate(subjects)])
    dino_s = np.array([float(g_dino[i] @ ref_dino[s]) for i, s in enumerate(subjects)])
    clip_t = (g_clip * t_clip).sum(-1).numpy()
    return {"dino": subject_mean(dino_s, subjects), "clip_i": subject_mean(clip_i, subjects),
            "clip_t": subject_mean(clip_t, subjects)}


def _references(subjects_dir: Path, names: set[str]) -> dict[str, list[np.ndarray]]:
    from PIL import Image

    refs = {}
    for s in sorted(names):
        files = sorted((subjects_dir / "subjects" / s).glob("*.png"))
        if not files:
            raise FileNotFoundError(f"{subjects_dir}/subjects/{s}: no reference image")
        refs[s] = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return refs


def evaluate_checkpoint(cfg, mllm_dir: str | None, diffusion_dir: str, out: Storage | None = None,
                        progress=None) -> dict:
    """Evaluate the assistant made of ``mllm_dir`` + ``diffusion_dir``; write the report to ``out`` if given."""
    import torch

    from pipeline.train import role_refs
    from training.assistant import Assistant
    from training.embedders import ClipEmbedder, DinoEmbedder
    from training.models.fingerprint import fingerprint
    from training.models.kit import load_from_config, resolve_device
    from training.world.assistant_eval import eval_rows, generate_eval_images, oracle_rates

    e = cfg.pipeline.eval
    subjects_dir = Path(e.subjects)
    if not (subjects_dir / "prompts.jsonl").is_file():
        raise FileNotFoundError(f"pipeline.eval.subjects = {e.subjects}: no prompts.jsonl")
    if mllm_dir is None:
        raise FileNotFoundError("no trained MLLM: the assistant's evaluation needs train-mllm's output")
    t0 = time.perf_counter()
    device = str(resolve_device(e.device))
    torch.manual_seed(0)
    rows = eval_rows(subjects_dir, e.refs)
    if e.max_prompts is not None:
        rows = rows[: e.max_prompts * e.refs]
    from pipeline.store import local_copy

    assistant = Assistant.load(role_refs(cfg), local_copy(mllm_dir), local_copy(diffusion_dir), device=device)
    t2i = load_from_config(cfg.models, "t2i")
    images, meta = generate_eval_images(assistant, t2i.components, rows, e.seeds, e.num_inference_steps,
                                        e.guidance_scale, e.t2i_guidance_scale, e.scale_dino, progress)
    clip = ClipEmbedder(str(cfg.models.role_dir("clip_filter")), device=device)
    dino = DinoEmbedder(str(cfg.models.role_dir("dino_filter")), device=device)
    refs = _references(subjects_dir, {m["subject"] for m in meta})
    report = {"checkpoint": {"mllm": mllm_dir, "diffusion": diffusion_dir,
                             "mllm_fingerprint": fingerprint(mllm_dir), "diffusion_fingerprint": fingerprint(diffusion_dir)},
              "subjects": str(subjects_dir), "n": len(meta), "n_held_out": sum(m["held_out"] for m in meta),
              "seeds": list(e.seeds), "steps": e.num_inference_steps, "guidance": e.guidance_scale,
              "scale_dino": e.scale_dino, "methods": {}}
    oracle = None
    if e.oracle:
        from training.world.oracle import load_oracle

        oracle = load_oracle(e.oracle, device=device)
    changing = None
    if oracle is not None:
        # an instruction "changes something" when the oracle does not already read the asked value on the input:
        # CAFE's setting (returning the input unchanged follows the others for free)
        from training.world.assistant_eval import oracle_verdicts

        changing = ~oracle_verdicts(oracle.predict_names(np.stack(images["input"])), meta)["instruction"]
        report["n_changing"] = int(changing.sum())
    pairs = None
    if oracle is not None:
        from training.world.assistant_eval import oracle_verdicts

        pairs = {"subject": [m["subject"] for m in meta], "phrase": [m.get("phrase") for m in meta],
                 "seed": [int(m.get("seed", 0)) for m in meta], "held_out": [bool(m["held_out"]) for m in meta],
                 "changing": [bool(c) for c in changing]}
    for method, ims in images.items():
        report["methods"][method] = dreambench(clip, dino, ims, meta, refs)
        if oracle is not None:
            read = oracle.predict_names(np.stack(ims))
            report["methods"][method]["oracle"] = oracle_rates(read, meta, changing)
            for verdict, values in oracle_verdicts(read, meta).items():
                pairs[f"{method}.{verdict}"] = [bool(v) for v in values]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        if pairs is not None:  # per pair, so rounds and methods compare paired (same pairs, same seeds)
            import pyarrow as pa

            out.write_parquet("pairs.parquet", pa.table(pairs))
        out.write_json("metrics.json", report)
        out.write_bytes("table.md", (format_table(report) + "\n").encode())
        out.write_bytes("samples.png", _samples_png(images, 8))
    return report


def paired_difference(a, b) -> tuple[float, float, int]:
    """Mean of ``a − b`` over pairs (0/1 verdicts or scores of the same pairs) and its standard error
    ``std(a − b, ddof=1) / √n``: the paired comparison of two rounds or two methods on one evaluation set."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = int(d.size)
    if n < 2:
        return float(d.mean()) if n else float("nan"), float("nan"), n
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(n)), n


def read_pairs(location: str):
    """An evaluation's per-pair verdicts (``pairs.parquet``) as a dict of lists, or None (no oracle, or older)."""
    store = Storage(location)
    return store.read_parquet("pairs.parquet").to_pydict() if store.is_file("pairs.parquet") else None


def headline(metrics_by_split: dict) -> tuple[str, dict[str, float]]:
    """The split a report leads with: ``changing`` when the oracle measured it, else ``all``."""
    split = "changing" if "changing" in metrics_by_split else "all"
    return split, metrics_by_split[split]


def flat_metrics(report: dict, split: str = "all") -> dict[str, float]:
    """``{"assistant.both": 0.31, "assistant.dino": 0.72, ...}``: what the promotion gate and the curves read."""
    flat = {}
    for method, r in report["methods"].items():
        for m in METRICS:
            flat[f"{method}.{m}"] = r[m]["mean"]
        for k, v in r.get("oracle", {}).get(split, {}).items():
            flat[f"{method}.{k}"] = v["rate"]
    return flat


def format_table(report: dict) -> str:
    has_oracle = any("oracle" in r for r in report["methods"].values())
    head = ["method", "DINO", "CLIP-I", "CLIP-T"]
    if has_oracle:
        head += ["identity kept", "instruction followed", "both", "changing: identity", "changing: instruction",
                 "changing: both", "held-out: both"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    fmt = lambda v: f"{v['mean']:.3f}" + (f" ± {v['se']:.3f}" if v.get("se") is not None else "")  # noqa: E731
    rate = lambda v: f"{v['rate']:.3f} ± {v['se']:.3f}" if v["n"] else "–"  # noqa: E731
    for method, r in report["methods"].items():
        cells = [method] + [fmt(r[m]) for m in METRICS]
        if has_oracle:
            o = r["oracle"]
            ch = o.get("changing", {})
            cells += [rate(o["all"]["identity"]), rate(o["all"]["instruction"]), rate(o["all"]["both"])]
            cells += [rate(ch[k]) if k in ch else "–" for k in ("identity", "instruction", "both")]
            cells += [rate(o["held_out"]["both"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{report['n']} generations per method ({report['n_held_out']} held-out pairs, "
                 f"{report.get('n_changing', '–')} whose instruction changes the input), seeds "
                 f"{report['seeds']}, {report['steps']} steps, guidance {report['guidance']}, scale_dino "
                 f"{report['scale_dino']}. DINO/CLIP-I/CLIP-T: mean ± s.e. over subjects; oracle rates ± binomial s.e.")
    return "\n".join(lines)


def _samples_png(images: dict[str, list[np.ndarray]], n: int) -> bytes:
    from PIL import Image

    methods = list(images)
    rows = min(n, len(images[methods[0]]))
    h, w = images[methods[0]][0].shape[:2]
    grid = Image.new("RGB", (w * len(methods), h * rows), "white")
    for j, m in enumerate(methods):
        for i in range(rows):
            grid.paste(Image.fromarray(np.asarray(images[m][i], np.uint8)).resize((w, h)), (j * w, i * h))
    buf = io.BytesIO()
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def read_report(location: str) -> dict:
    return json.loads(Storage(location).read_bytes("metrics.json"))
