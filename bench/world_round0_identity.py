"""Why round 0 loses identity on the synthetic world: ProFusion per-image fine-tuning, context padded or not.

    python bench/world_round0_identity.py [--sources 12] [--steps 100] [--contexts none max_length]

For N world source images (training identities, one per instance, fixed order), ProFusion fine-tunes PromptNet
and the UNet's attention projections on the source (``build.profusion.finetune``), then samples
"a holder {phrase}" for 4 phrases. The oracle reads each target: identity kept (class, colour, mark all the
source's), instruction followed. Two settings are compared on the same sources, seeds and phrases:

* ``none``: the fine-tuning context is BOS + "a photo of holder" + EOS (the authors' code);
* ``max_length``: the same prompt padded to the tokenizer's length, i.e. the context the world t2i was trained with
  and the one sampling uses.

Prints one line per setting and writes ``bench/results/world_round0_identity.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHRASES = ["on the left", "in large size", "on a striped background", "in outline style"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=12)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-5, help="build.profusion.finetune_lr (the authors': 2e-5)")
    ap.add_argument("--s1", type=float, default=2.0)
    ap.add_argument("--s2", type=float, default=2.0)
    ap.add_argument("--contexts", nargs="+", default=["none", "max_length"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_round0_identity.json"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from pipeline.config import load_config
    from training.data.ids import stable_int
    from training.methods.profusion import ProFusionGenerator
    from training.models.kit import load_from_config
    from training.world import domain as D
    from training.world.oracle import load_oracle

    torch.set_num_threads(2)
    base = ["build.profusion.finetune=true", f"build.profusion.finetune_steps={args.steps}",
            f"build.profusion.finetune_lr={args.lr}",
            f"build.profusion.s1={args.s1}", f"build.profusion.s2={args.s2}", "build.profusion.refine_step=0"]
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), base)
    files = training_sources(args.sources)
    oracle = load_oracle(ROOT / "models/world/oracle")
    instances = {i.id: i for i in D.all_instances()}
    results = {}
    for context in args.contexts:
        cfg = load_config(str(ROOT / "configs/tiny.yaml"), base + [f"build.profusion.context_padding={context}"])
        t2i = load_from_config(cfg.models, "t2i")
        pn = load_from_config(cfg.models, "promptnet")
        gen = ProFusionGenerator(t2i.components, pn.components, cfg.build.profusion)
        t0 = time.perf_counter()
        ident, instr, losses = [], [], []
        for k, f in enumerate(files):
            src = np.asarray(Image.open(f).convert("RGB"))
            inst = instances[f.name.split("__")[0]]
            with gen.finetuned(src, seed=stable_int("finetune", 0, f.name)):
                imgs = gen.sample([src] * len(PHRASES), [f"a holder {p}" for p in PHRASES],
                                  [f"a {inst.cls} {p}" for p in PHRASES], [1000 * k + j for j in range(len(PHRASES))])
            read = oracle.predict_names(np.stack(imgs))
            want = inst.labels()
            for j, p in enumerate(PHRASES):
                ident.append(all(read[a][j] == want[a] for a in D.IDENTITY_ATTRIBUTES))
                attr, value = D.parse_phrase(p) if hasattr(D, "parse_phrase") else _phrase_attr(p)
                instr.append(read[attr][j] == value)
        n = len(ident)
        rate = lambda x: (float(np.mean(x)), float(math.sqrt(np.mean(x) * (1 - np.mean(x)) / n)))  # noqa: E731
        results[context] = {"identity": rate(ident), "instruction": rate(instr), "n": n,
                            "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{context:9s} identity {results[context]['identity'][0]:.3f} ± {results[context]['identity'][1]:.3f}  "
              f"instruction {results[context]['instruction'][0]:.3f}  (n {n}, {results[context]['seconds']} s)",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def training_sources(n: int) -> list[Path]:
    """n world source images of training identities (the eval set's are left out), spread over the sorted list."""
    files = sorted((ROOT / "models/world/sources").rglob("*.png"))
    eval_subjects = {p.name for p in (ROOT / "models/world/eval/subjects").iterdir()}
    files = [f for f in files if f.name.split("__")[0] not in eval_subjects]
    return files[:: max(1, len(files) // n)][:n]


def _phrase_attr(phrase: str) -> tuple[str, str]:
    table = {"on the left": ("position", "left"), "in large size": ("size", "large"),
             "on a striped background": ("background", "striped"), "in outline style": ("style", "outline")}
    return table[phrase]


if __name__ == "__main__":
    main()
