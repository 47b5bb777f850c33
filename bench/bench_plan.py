"""Planning 1,000,000 sources: the driver's memory and time, the plan's bytes, and one chunk reader's memory.

Usage::

    python bench/bench_plan.py                    # 10,000 and 1,000,000 generated sources, paper chunking
    python bench/bench_plan.py --sources 200000   # a smaller large size
    python bench/bench_plan.py --quick            # 1,000 and 20,000 sources

Config: ``tests.buildutil.tiny_build_config`` with ``sources: {kind: generate, classes: [10 classes],
num_per_class: S / 10}`` and the chunking of ``configs/paper.yaml`` (``rows_per_chunk`` 64, ``instructions.per_source``
4: 16 sources per chunk, so 1,000,000 sources make 62,500 chunks). Nothing is generated: only the plan is made.

Measured, each in a fresh subprocess (so that one process's RSS is one role's memory):

* the driver: ``pipeline.build.write_plan(cfg, Storage(OUT), key, [])`` -- it streams
  ``pipeline.sources.iter_sources`` into one Parquet object with one row group per chunk and writes the
  ``_PLAN.json`` marker last. A thread samples the process's RSS every 10 ms; printed: RSS before planning (imports done), the peak
  while planning, the growth, the kernel's high-water mark (``VmHWM``) and the planning time. Run at a small
  and a large size, so that what grows with the number of sources shows as bytes per source;
* the plan on disk: files and bytes under ``_work/plan/<key>/`` (the plan object and the marker);
* one chunk's reader, as every stage actor and sink task does it: ``pipeline.stages.plan_sources(Storage(OUT),
  key, chunk)``, in a fresh process per plan size: RSS after the imports, after a first read of chunk 000000
  (lazy imports, Arrow's memory pool and threads: paid once per process whatever the plan), then the peak while
  reading the middle chunk, and the process's high-water mark. The same at both plan sizes means the reader
  does not depend on the plan's size. Also the same read repeated 200 times (time per read).

No figure is asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as U  # noqa: E402  (repo on sys.path, loopback Ray env)

KEY = "benchplan"
CLASSES = [f"class{i:02d}" for i in range(10)]
PHRASES = ["in comic book style", "on the beach", "wearing a red hat", "as a watercolor painting"]


def plan_config(sources: int, rows_per_chunk: int, per_source: int) -> dict:
    from tests.buildutil import tiny_build_config

    per_class = -(-sources // len(CLASSES))
    return tiny_build_config(
        Path("/nonexistent-models"),  # planning generated sources loads no model
        sources={"classes": CLASSES, "num_per_class": per_class},
        instructions={"phrases": PHRASES, "per_source": per_source},
        rows_per_chunk=rows_per_chunk,
    )


def plan_child(config_json: str, out: str, result_path: str) -> int:
    from pipeline.build import write_plan
    from pipeline.store import Storage
    from tests.buildutil import as_config

    cfg = as_config(json.loads(Path(config_json).read_text()))
    with U.RssSampler(0.01) as rss:
        rss.phase("plan")
        t0 = time.perf_counter()
        chunks = write_plan(cfg, Storage(out), KEY, [])
        seconds = time.perf_counter() - t0
        rss.phase("after")
    Path(result_path).write_text(json.dumps({
        "baseline": rss.baseline, "peak_plan": rss.peaks["plan"], "hwm": rss.hwm, "seconds": seconds,
        "chunks": len(chunks), "middle": chunks[len(chunks) // 2]}))
    return 0


def read_child(out: str, chunk: str, result_path: str) -> int:
    import psutil

    from pipeline.stages import plan_sources
    from pipeline.store import Storage

    proc = psutil.Process()
    with U.RssSampler(0.005) as rss:
        before = proc.memory_info().rss
        rss.phase("first")
        plan_sources(Storage(out), KEY, "000000")  # first use: lazy imports, Arrow's pools and thread stacks
        after_first = proc.memory_info().rss
        rss.phase("read")
        sources = plan_sources(Storage(out), KEY, chunk)
        after = proc.memory_info().rss
        rss.phase("repeat")
        t0 = time.perf_counter()
        for _ in range(200):
            plan_sources(Storage(out), KEY, chunk)
        per_read = (time.perf_counter() - t0) / 200
    Path(result_path).write_text(json.dumps({
        "before": before, "after_first": after_first, "after": after, "peak_read": rss.peaks["read"],
        "peak": rss.peak, "hwm": rss.hwm, "sources": len(sources), "per_read_s": per_read,
        "json_bytes": sum(len(json.dumps(s)) for s in sources)}))
    return 0


def _child(args: list[str], result: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args, str(result)], cwd=U.REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"child {args[0]} failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(result.read_text())


def plan_stats(out: Path) -> dict:
    d = out / "_work" / "plan" / KEY
    files = [p for p in d.iterdir() if p.is_file()]
    marker = d / "_PLAN.json"
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "disk": sum(p.stat().st_blocks * 512 for p in files), "marker": marker.stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 and 20,000 sources: checks the script")
    ap.add_argument("--sources", type=int, default=1_000_000, help="the large size (default 1,000,000)")
    ap.add_argument("--small", type=int, default=10_000, help="the small size (default 10,000)")
    ap.add_argument("--rows-per-chunk", type=int, default=64, help="default 64 (configs/paper.yaml)")
    ap.add_argument("--per-source", type=int, default=4, help="default 4 (configs/paper.yaml)")
    ap.add_argument("--plan-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--read-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plan_child:
        return plan_child(*args.plan_child)
    if args.read_child:
        return read_child(*args.read_child)
    if args.quick:
        args.small, args.sources = 1_000, 20_000

    U.header("bench_plan: write_plan on 1M generated sources -- driver RSS, plan time and bytes, one reader's RSS")
    tmp = tempfile.TemporaryDirectory(prefix="bench_plan_")
    root = Path(tmp.name)
    spc = max(1, args.rows_per_chunk // args.per_source)
    print(f"config:       generate, {len(CLASSES)} classes; rows_per_chunk {args.rows_per_chunk}, "
          f"per_source {args.per_source} -> {spc} sources per chunk")
    plans = {}
    for n in (args.small, args.sources):
        cfg_path = root / f"plan-{n}.json"
        cfg_path.write_text(json.dumps(plan_config(n, args.rows_per_chunk, args.per_source)))
        out = root / f"out-{n}"
        t0 = time.perf_counter()
        r = _child(["--plan-child", str(cfg_path), str(out)], root / f"plan-{n}.result.json")
        r.update(plan_stats(out))
        r["sources"] = len(CLASSES) * (-(-n // len(CLASSES)))
        plans[n] = r
        print(f"plan {r['sources']:>9,} sources: {r['chunks']:,} chunks in {r['seconds']:.1f} s "
              f"(subprocess {time.perf_counter() - t0:.1f} s)")
    reads = {n: _child(["--read-child", str(root / f"out-{n}"), plans[n]["middle"]], root / f"read-{n}.result.json")
             for n in plans}
    print()

    rows = []
    for n, r in plans.items():
        rows.append([f"{r['sources']:,}", f"{r['chunks']:,}", U.fmt_s(r["seconds"]),
                     f"{r['sources'] / r['seconds']:,.0f}", U.mib(r["baseline"]), U.mib(r["peak_plan"]),
                     U.mib(r["peak_plan"] - r["baseline"]), U.mib(r["hwm"]), f"{r['files']:,}",
                     U.mib(r["bytes"]), U.mib(r["disk"]), f"{r['marker'] / 1024:.0f}"])
    print(U.table(["sources", "chunks", "plan (s)", "sources/s", "driver RSS before (MiB)",
                   "driver peak planning (MiB)", "growth (MiB)", "driver VmHWM (MiB)", "plan files",
                   "plan bytes (MiB)", "plan on disk (MiB)", "_PLAN.json (KiB)"], rows))
    print()
    heads = ["reader of one chunk (fresh process)"] + [f"plan of {plans[n]['sources']:,}" for n in plans]
    print(U.table(heads, [
        ["chunk read (after a first read of chunk 000000)"] + [f"{plans[n]['middle']} of {plans[n]['chunks']:,}"
                                                              for n in plans],
        ["sources in it"] + [reads[n]["sources"] for n in plans],
        ["RSS after imports (MiB)"] + [U.mib(reads[n]["before"]) for n in plans],
        ["RSS after the first read (MiB)"] + [U.mib(reads[n]["after_first"]) for n in plans],
        ["peak RSS during the chunk's read (MiB)"] + [U.mib(reads[n]["peak_read"]) for n in plans],
        ["growth for the chunk's read (KiB)"] + [f"{(reads[n]['peak_read'] - reads[n]['after_first']) / 1024:.0f}"
                                                 for n in plans],
        ["VmHWM of the process (MiB)"] + [U.mib(reads[n]["hwm"]) for n in plans],
        ["the chunk's sources as JSON (KiB)"] + [f"{reads[n]['json_bytes'] / 1024:.1f}" for n in plans],
        ["time per read (ms, 200 reads)"] + [f"{reads[n]['per_read_s'] * 1e3:.2f}" for n in plans],
    ]))
    print()
    large, rd = plans[args.sources], reads[args.sources]
    small = plans[args.small]
    per_source = (large["peak_plan"] - small["peak_plan"]) / (large["sources"] - small["sources"])
    print(f"RESULT  plan of {large['sources']:,} sources: {large['chunks']:,} chunks in {large['files'] - 1:,} object(s), {U.mib(large['bytes'])} MiB "
          f"({large['bytes'] / large['sources']:.0f} bytes per source; {U.mib(large['disk'])} MiB on disk), "
          f"written in {large['seconds']:.1f} s")
    print(f"RESULT  driver peak RSS while planning: {U.mib(small['peak_plan'])} MiB at {small['sources']:,} sources · "
          f"{U.mib(large['peak_plan'])} MiB at {large['sources']:,} · {per_source:.0f} bytes per extra source")
    rs = reads[args.small]
    print(f"RESULT  one chunk's reader: VmHWM {U.mib(rd['hwm'])} MiB with the {large['sources']:,}-source plan vs "
          f"{U.mib(rs['hwm'])} MiB with the {small['sources']:,}-source plan; the chunk's read adds "
          f"{(rd['peak_read'] - rd['after_first']) / 1024:.0f} KiB for {rd['sources']} sources (the whole plan: "
          f"{U.mib(large['bytes'])} MiB on disk); {rd['per_read_s'] * 1e3:.2f} ms per read")
    if args.quick:
        print("NOTE    --quick: small sizes; the figures are noise.")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
