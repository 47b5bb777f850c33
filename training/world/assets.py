"""What later work consumes from the world: a source folder for ``cafe build``, a DreamBench-style evaluation
set, multi-object scenes with exact masks, and a sample grid.

Layout (under the world directory)::

    sources/<class>/<instance_id>__<context_id>.png     every instance in a training context (solid, large)
    eval/subjects/<instance_id>/<k>.png                 a few reference images per subject, distinct contexts
    eval/prompts.jsonl                                  subject × instruction phrase, with the target attribute
    scenes/<k>.png, scenes/<k>_mask<j>.png              2–3 objects; masks are 0/255 PNGs
    scenes/scenes.jsonl                                 caption, objects (instance, position, size, style, mask file)
    samples.png                                         8×8 renders

A source's class is its folder (``class_from: folder``); its instance and context are in its file name, and the
oracle reads both back from the pixels, which is how the build report judges identity and instructions.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from training.world import domain as D


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def write_assets(world: Path, cfg) -> dict:
    rng = random.Random(D._u64("assets", cfg.seed))
    tmp = world / f".assets.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "sources").mkdir(parents=True)
    insts, ctxs = D.all_instances(), D.all_contexts()
    clear = [c for c in ctxs if c.style == "solid" and c.size == "large"]

    n_sources = 0
    for k, inst in enumerate(insts):
        options = [c for c in clear if not D.is_held_out(inst, c, cfg.seed)]
        for j, ctx in enumerate(rng.sample(options, cfg.num_sources_per_instance)):
            d = tmp / "sources" / inst.cls
            d.mkdir(exist_ok=True)
            image, _ = D.render(D.Scene.single(inst, ctx), D._u64("source", cfg.seed, inst.id, j) % 2**63)
            _png(d / f"{inst.id}__{ctx.id}.png", image)
            n_sources += 1

    subjects = []
    for cls in D.CLASSES:
        subjects += rng.sample([i for i in insts if i.cls == cls], cfg.eval_subjects_per_class)
    prompts = []
    for inst in subjects:
        d = tmp / "eval" / "subjects" / inst.id
        d.mkdir(parents=True)
        refs = rng.sample([c for c in ctxs if not D.is_held_out(inst, c, cfg.seed)], cfg.eval_refs)
        for k, ctx in enumerate(refs):
            image, _ = D.render(D.Scene.single(inst, ctx), D._u64("ref", cfg.seed, inst.id, k) % 2**63)
            _png(d / f"{k}.png", image)
        for phrase, (attr, value) in D.PHRASES.items():
            target = D.Context(**{**refs[0].labels(), attr: value})
            prompts.append({"subject": inst.id, "class": inst.cls, "prompt": "a {} " + phrase, "phrase": phrase,
                            "attribute": attr, "value": value, "target_context": target.id,
                            "held_out": D.is_held_out(inst, target, cfg.seed)})
    with open(tmp / "eval" / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")

    (tmp / "scenes").mkdir()
    with open(tmp / "scenes" / "scenes.jsonl", "w") as f:
        for k in range(cfg.num_scenes):
            scene = D.random_multi_scene(D._u64("scene-asset", cfg.seed, k) % 2**63)
            image, masks = D.render(scene, D._u64("scene-render", cfg.seed, k) % 2**63)
            _png(tmp / "scenes" / f"{k:03d}.png", image)
            objs = []
            for j, (obj, mask) in enumerate(zip(scene.objects, masks)):
                name = f"{k:03d}_mask{j}.png"
                _png(tmp / "scenes" / name, mask.astype(np.uint8) * 255)
                objs.append({"instance": obj.instance.id, "position": obj.position, "size": obj.size,
                             "style": obj.style, "mask": name, "pixels": int(mask.sum())})
            f.write(json.dumps({"image": f"{k:03d}.png", "caption": D.scene_caption(scene),
                                "background": scene.background, "objects": objs}) + "\n")

    pairs = D.sample_pairs(64, cfg.seed + 1, "all")
    images, _ = D.render_pairs(pairs, cfg.seed + 1)
    _png(tmp / "samples.png", images.reshape(8, 8, D.IMAGE_SIZE, D.IMAGE_SIZE, 3).transpose(0, 2, 1, 3, 4)
         .reshape(8 * D.IMAGE_SIZE, 8 * D.IMAGE_SIZE, 3))

    for name in ("sources", "eval", "scenes", "samples.png"):
        final = world / name
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp / name, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"sources": n_sources, "subjects": len(subjects), "prompts": len(prompts), "scenes": cfg.num_scenes}
