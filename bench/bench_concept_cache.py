"""Serving many concepts in a row: host memory stays bounded by the concept cache (issue 23).

Usage::

    python bench/bench_concept_cache.py                  # 200 concepts, cache of 20 concepts' bytes
    python bench/bench_concept_cache.py --concepts 60 --cache-concepts 10

One ICO concept is trained briefly on the synthetic world's t2i (CPU) and saved as ``--concepts`` distinct artifacts
(each a copy with its V rows and layers perturbed, so no two are alike). Then, in this process, each artifact is
loaded through :func:`pipeline.concepts.load_concept` (the serving path: the cache bounded by ``cache_bytes``) and
one image is sampled with it, in a row. Printed every 20 concepts: the process's RSS, the cache's entries and bytes.
The claim measured: after the cache has filled, RSS stays flat (within 10 % of its value after the first 20
concepts), where an unbounded cache would grow by one concept per request. Device memory is the host here (CPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, header, machine_lines, quiet_libraries  # noqa: E402


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", type=int, default=200)
    ap.add_argument("--cache-concepts", type=int, default=20, help="cache budget, in concepts' bytes")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    quiet_libraries()
    import numpy as np
    import torch
    from PIL import Image

    from pipeline import concepts as C
    from pipeline.store import Storage
    from training.methods import ico
    from training.models.kit import load_role

    torch.set_num_threads(2)
    header("Serving concepts in a row: host memory with a bounded concept cache")
    print("\n".join(machine_lines()))
    t2i = load_role("t2i", str(REPO / "models/world/t2i"), dtype="float32", device="cpu").components
    subject = sorted((REPO / "models/world/eval/subjects").iterdir())[0]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(subject.glob("*.png"))[:2]]
    noun = subject.name.split("-")[1]
    concept = ico.train_ico(t2i, images, noun, ico.IcoParams(steps=2, learning_rate=1e-3), seed=0)
    size = C.concept_bytes(concept)
    budget = args.cache_concepts * size
    prompt = f"a {ico.concept_phrase(concept)} on the left"
    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        for i in range(args.concepts):
            with torch.no_grad():
                concept.new_embeddings.add_(torch.randn(concept.new_embeddings.shape, generator=g) * 1e-3)
                for layer in concept.layers.values():
                    layer.to_k.weight.add_(torch.randn(layer.to_k.weight.shape, generator=g) * 1e-4)
            concept.save(Path(tmp) / f"c{i:04d}")
        store = Storage(tmp)
        C._CONCEPT_CACHE.clear()
        print(f"\none concept: {size / 2**20:.2f} MiB; cache budget {budget / 2**20:.1f} MiB "
              f"({args.cache_concepts} concepts); {args.concepts} concepts served in a row, {args.steps} steps each\n")
        print("| concepts served | RSS (MiB) | cache entries | cache MiB |")
        print("| --- | --- | --- | --- |")
        marks = {}
        for i in range(args.concepts):
            served = C.load_concept(store, "ico", f"c{i:04d}", cache_bytes=budget)
            ico.sample(t2i, served, [prompt], [i], steps=args.steps)
            if (i + 1) % 20 == 0 or i + 1 == args.concepts:
                marks[i + 1] = rss_mib()
                cached = sum(b for _, b in C._CONCEPT_CACHE.values())
                print(f"| {i + 1} | {marks[i + 1]:.1f} | {len(C._CONCEPT_CACHE)} | {cached / 2**20:.1f} |")
    first = marks[min(marks)]
    last = marks[max(marks)]
    growth = (last - first) / first
    print(f"\nRESULT  RSS after {max(marks)} concepts {last:.1f} MiB vs {first:.1f} MiB after {min(marks)}: "
          f"{growth:+.1%} (target within ±10 %); an unbounded cache would have added "
          f"{(max(marks) - min(marks)) * size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
