"""Bytes a build leaves under OUT (the report excluded) per byte of the published dataset (target <= 2.2).

Usage::

    python bench/bench_storage.py            # the tiny build (3 sources, 6 rows) and a 24-source build (48 rows)
    python bench/bench_storage.py --n 96     # the tiny build and a 96-source build
    python bench/bench_storage.py --quick    # the tiny build only

Builds: ``pipeline.build.run_build`` in this process on ``tests.buildutil.tiny_build_config`` (3 classes x
``num_per_class`` generated sources, 2 instructions per source, 2 rows per chunk, 64 px, template dialogue; all
rows kept) on the tiny model set written by ``training.models.tiny.make_tiny``. "The tiny build" is that config
unchanged (``num_per_class`` 1: 3 sources, 6 rows, 3 chunks).

Measured: every file under OUT after the build, grouped by where it lives (``dataset/data``, the dataset card,
``candidates``, ``quarantine``, ``manifest.json``, ``_work/plan``, ``_work/generate``, ``_work/score``,
``_work/sink``, other ``_work`` files, ``report``). Bytes are file sizes (``st_size``); the space the files
occupy on disk (``st_blocks``, at least one 4 KiB block per file) is printed as a second figure.
Headline: ``bytes(OUT) - bytes(OUT/report)`` over ``bytes(OUT/dataset)`` (the card included). Nothing is timed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as U  # noqa: E402  (repo on sys.path, loopback Ray env)

CLASSES = 3  # tiny_build_config: person, cat, dog
TARGET = 2.2
GROUPS = ("dataset/data", "dataset/README.md", "candidates", "quarantine", "manifest.json", "_SUCCESS",
          "_work/plan", "_work/generate", "_work/score", "_work/sink", "_work (other)", "other", "report")


def group_of(rel: str) -> str:
    parts = rel.split("/")
    if parts[0] == "dataset":
        return "dataset/data" if len(parts) > 1 and parts[1] == "data" else "dataset/README.md"
    if parts[0] in ("candidates", "quarantine", "report"):
        return parts[0]
    if parts[0] in ("manifest.json", "_SUCCESS"):
        return parts[0]
    if parts[0] == "_work":
        sub = f"_work/{parts[1]}" if len(parts) > 2 else ""
        return sub if sub in GROUPS else "_work (other)"
    return "other"


def breakdown(out: Path) -> dict[str, dict[str, int]]:
    """{group: {files, bytes, disk}} over every file below ``out`` (``disk`` = allocated blocks x 512)."""
    groups = {g: {"files": 0, "bytes": 0, "disk": 0} for g in GROUPS}
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            g = groups[group_of(p.relative_to(out).as_posix())]
            g["files"] += 1
            g["bytes"] += st.st_size
            g["disk"] += st.st_blocks * 512
    return groups


def totals(groups: dict[str, dict[str, int]]) -> dict[str, int]:
    """Sums: everything but the report (``out``), the dataset directory (``dataset``), for bytes and disk."""
    out = {}
    for kind in ("bytes", "disk", "files"):
        out[f"out_{kind}"] = sum(v[kind] for g, v in groups.items() if g != "report")
        out[f"dataset_{kind}"] = groups["dataset/data"][kind] + groups["dataset/README.md"][kind]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny build only")
    ap.add_argument("--n", type=int, default=24, help="sources of the second build (default 24 = 48 rows; 0: none)")
    args = ap.parse_args(argv)

    U.header("bench_storage: bytes under OUT (report excluded) / bytes of OUT/dataset, tiny config")
    from pipeline.build import run_build
    from tests.buildutil import as_config, tiny_build_config

    tmp = tempfile.TemporaryDirectory(prefix="bench_storage_")
    root = Path(tmp.name)
    t0 = time.perf_counter()
    models = U.make_tiny_models(root / "models")
    print(f"tiny models written in {time.perf_counter() - t0:.1f} s")
    U.quiet_ray_data()
    U.quiet_libraries()

    sizes = [("tiny", 1)]
    if not args.quick and args.n > CLASSES:
        sizes.append((f"{CLASSES * math.ceil(args.n / CLASSES)} sources", math.ceil(args.n / CLASSES)))
    results = {}
    for label, npc in sizes:
        cfg = as_config(tiny_build_config(models, sources={"num_per_class": npc}))
        out = root / f"out-{npc}"
        t0 = time.perf_counter()
        m = run_build(cfg, out_dir=out).manifest
        groups = breakdown(out)
        results[label] = {"manifest": m, "groups": groups, "tot": totals(groups)}
        print(f"build {label}: {CLASSES * npc} sources, {m['counts']['candidates']} rows "
              f"({m['counts']['kept']} kept), {m['num_chunks']} chunks, {time.perf_counter() - t0:.1f} s")
    b = as_config(tiny_build_config(models)).build
    print(f"config:       tiny_build_config: {b.instructions.per_source} rows/source, {b.rows_per_chunk} rows/chunk, "
          f"sources {b.sources.image_size} px; rules keep every row")
    print()

    rows = []
    for g in GROUPS:
        row = [g]
        for label in results:
            v, d = results[label]["groups"][g], results[label]["tot"]["dataset_bytes"]
            row += [v["files"], v["bytes"], U.fmt_s(v["bytes"] / d, 3) if g != "report" else "(excluded)"]
        rows.append(row)
    for name, kind in (("TOTAL (report excluded)", "out"), ("OUT/dataset", "dataset")):
        row = [name]
        for label in results:
            t = results[label]["tot"]
            row += [t[f"{kind}_files"], t[f"{kind}_bytes"], U.fmt_s(t[f"{kind}_bytes"] / t["dataset_bytes"], 3)]
        rows.append(row)
    heads = ["group"]
    for label in results:
        heads += [f"{label}: files", f"{label}: bytes", f"{label}: x dataset"]
    print(U.table(heads, rows))
    print()
    for label, r in results.items():
        t, c = r["tot"], r["manifest"]["counts"]
        ratio = t["out_bytes"] / t["dataset_bytes"]
        print(f"RESULT  {label} build ({c['candidates']} rows, {c['kept']} kept): bytes(OUT) - bytes(report) = "
              f"{t['out_bytes']} / bytes(OUT/dataset) = {t['dataset_bytes']} -> ratio = {ratio:.2f} "
              f"(target <= {TARGET}; previous design 7.9)")
        print(f"RESULT  {label} build, space on disk (st_blocks): {t['out_disk']} / {t['dataset_disk']} = "
              f"{t['out_disk'] / t['dataset_disk']:.2f} (secondary: small files take a whole block)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
