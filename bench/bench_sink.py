"""Publishing (the sink) with 1 vs 2 workers, and the driver's memory at N vs 100·N chunks.

Usage::

    python bench/bench_sink.py            # sink: 24 chunks x 64 rows at 512 px; driver: 10 vs 1000 chunks
    python bench/bench_sink.py --chunks 48 --image-size 256 --rows-per-chunk 32
    python bench/bench_sink.py --quick    # sink: 4 chunks x 8 rows at 64 px; driver: 4 vs 40 chunks

Part 1 -- sink throughput. ``pipeline.stages.sink_batch`` (the build's last operator: dataset, candidates and
quarantine shards, then the chunk's marker, through ``pipeline.store.Storage``) on the same prepared in-memory
blocks, one block per chunk, each holding the chunk's final records (the ``flight`` schema as they leave the
dialogue stage: every row kept, scores, template-like dialogue text, a source PNG shared by the source's rows
and a distinct target PNG per row; PNGs are smooth random images of ``--image-size`` px, about what a generated
image weighs, made distinct by a few random trailing bytes so Parquet's dictionary encoding cannot fold them).
The plan shards the sink reads are written first with ``pipeline.build.write_plan``. Five ways, each into its
own output directory, each after an untimed warm-up on 8 other chunks (and, for the Ray tasks, two worker
processes started and their imports done):

* in this process, one call after another (1 worker, no Ray);
* as Ray tasks, ``num_cpus=2`` each on a 2-CPU local cluster (1 task at a time: Ray's own cost);
* as Ray tasks, ``num_cpus=1`` each (2 at a time: 2 workers);
* as the build runs it: ``ray.data.from_arrow_refs(blocks).map_batches(sink_batch, batch_size=None,
  num_cpus=build.sink_num_cpus)`` with the summaries iterated on the driver;
* the same with ``num_cpus=1`` (at most 2 sink tasks at once).

The blocks are put in Ray's object store once, before any Ray way is timed.

rows/s = rows sunk / seconds from the first submission to the last result. The per-chunk dataset hashes the
markers record must agree across the five ways (checked).

Part 2 -- driver memory at N and 100·N chunks. ``pipeline.build.run_build`` itself, in a fresh subprocess per
size, on ``tests.buildutil.tiny_build_config`` (one class, 2 rows per source, 2 rows per chunk: chunks =
sources) with the model stages replaced by cheap stand-ins in the same graph (``stage_graph`` unchanged): the
sources stage emits each chunk's final records as above (64 px PNGs) from the chunk's plan shard, and the
generate, score and dialogue actors pass blocks through; the sink is the real ``sink_batch``. So the driver does
all its real work -- lease, plan (``write_plan``), Ray start, building the Ray Data graph over one item per
chunk, iterating the per-chunk summaries, the stale-shard sweep, ``_aggregate`` over every marker, the manifest,
the dataset card and the report (``pipeline.report.write_report``) -- at 100 times the chunks. A thread in the
driver samples the driver process's own RSS every 10 ms, per phase; Ray's other processes are not counted. The
kernel's high-water mark (``VmHWM``) is printed too.

No timing or memory figure is asserted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as U  # noqa: E402  (repo on sys.path, loopback Ray env)

PHRASES = ["in comic book style", "on the beach", "wearing a red hat", "as a watercolor painting", "in the snow",
           "wearing sunglasses", "in cyberpunk style", "smiling"]
WARM = 8  # untimed warm-up chunks per way (Ray Data may run up to 1 / sink_num_cpus = 8 sink tasks at once)
KEYS = {"plan": "benchplan", "generate": "benchgen", "score": "benchscore", "rules": "benchrules",
        "dialogue": "benchsink"}
USER = "Could you show me this {cls} {phrase}? I would like to keep the face and the hair exactly as they are."
ASSISTANT = ("Here is the {cls} {phrase}. I kept the identity of the subject from your photo and changed only the "
             "scene and the style, as you asked.")


# ------------------------------------------------------------------------------------------- synthetic records
# (used in Ray workers of part 2 too: no reference to _benchutil or tests in these functions)


def png_pool(size: int, n: int, seed: int = 0) -> list[bytes]:
    """n smooth random RGB PNGs of size x size (random colours on a coarse grid, upsampled, mild noise)."""
    import numpy as np
    from PIL import Image

    from filtering.images import encode_png

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cells = max(2, size // 16)
        small = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        big = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.int16)
        big = np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)
        out.append(encode_png(Image.fromarray(big)))
    return out


def final_records(chunk: str, sources: list[dict], per_source: int, pool: list[bytes]) -> list[dict]:
    """The records of one chunk as the dialogue stage hands them to the sink (every row kept)."""
    import numpy as np

    from training.data import schema as S
    from training.data.ids import row_id, stable_int

    rng = np.random.default_rng(stable_int("bench_sink", chunk))  # same bytes for a chunk in every run
    recs = []
    for src in sources:
        cls = src["class_name"]
        src_png = pool[int(rng.integers(len(pool)))] + rng.bytes(16)
        for phrase in PHRASES[:per_source]:
            rid = row_id(0, src["source_id"], phrase)
            recs.append({
                S.CHUNK: chunk, S.STATUS: S.STATUS_ROW, S.ID: rid, S.ROUND: 0, S.SOURCE_ID: src["source_id"],
                S.SOURCE_URI: src["uri"], S.CLASS: cls, S.INSTRUCTION: phrase, S.FILLED_PROMPT: f"a {cls} {phrase}",
                S.SEED: stable_int("row", 0, rid), S.SOURCE_PNG: src_png,
                S.TARGET_PNG: pool[int(rng.integers(len(pool)))] + rng.bytes(16),
                S.GENERATOR: "profusion", S.GENERATOR_PARAMS: '{"num_inference_steps": 50, "s1": 7.0, "s2": 5.0}',
                S.CLIP_T: float(rng.uniform(0.3, 0.4)), S.DINO: float(rng.uniform(0.6, 0.9)),
                S.CLIP_I: float(rng.uniform(0.6, 0.9)), S.KEEP: True, S.FILTER_REASON: None,
                S.DIALOGUE_STYLE: "clear", S.USER_TEXT: USER.format(cls=cls, phrase=phrase),
                S.ASSISTANT_TEXT: ASSISTANT.format(cls=cls, phrase=phrase),
            })
    return recs


def synth_config(models_root: Path, n_chunks: int, rows_per_chunk: int, per_source: int, image_size: int) -> dict:
    from tests.buildutil import tiny_build_config

    spc = max(1, rows_per_chunk // per_source)
    return tiny_build_config(
        models_root,
        sources={"classes": ["person"], "num_per_class": n_chunks * spc, "image_size": image_size},
        instructions={"phrases": PHRASES, "per_source": per_source},
        rows_per_chunk=rows_per_chunk,
    )


# ------------------------------------------------------------------------------------------- part 1: the sink


def sink_dirs_check(outs: dict[str, Path], chunks: list[str]) -> tuple[bool, int]:
    """(every way committed every chunk with the same dataset hash, dataset bytes of one way)."""
    hashes, nbytes = {}, 0
    for label, out in outs.items():
        h = {}
        for c in chunks:
            p = out / "_work" / "sink" / KEYS["dialogue"] / f"{c}.json"
            h[c] = json.loads(p.read_text())["dataset_hash"] if p.is_file() else None
        hashes[label] = h
        nbytes = sum(f.stat().st_size for f in (out / "dataset" / "data").glob("*.parquet"))
    first = next(iter(hashes.values()))
    return all(v == first for v in hashes.values()) and None not in first.values(), nbytes


def part_sink(root: Path, args) -> dict:
    from pipeline.build import write_plan
    from pipeline.stages import flight_table, plan_sources, sink_batch
    from pipeline.store import Storage
    from tests.buildutil import as_config

    n_timed, warm = args.chunks, WARM
    cfg = as_config(synth_config(root / "no-models", n_timed + warm, args.rows_per_chunk, args.per_source,
                                 args.image_size))
    conf = cfg.model_dump(mode="json")
    t0 = time.perf_counter()
    pool = png_pool(args.image_size, 32)
    ways = ("in-process", "ray-1", "ray-2", "ray-data", "ray-data-1cpu")
    outs = {w: root / f"sink-{w}" for w in ways}
    chunks = None
    for out in outs.values():
        chunks = write_plan(cfg, Storage(out), KEYS["plan"], [])
    store = Storage(outs["in-process"])
    blocks = [flight_table(final_records(c, plan_sources(store, KEYS["plan"], c), args.per_source, pool))
              for c in chunks]
    rows = sum(b.num_rows for b in blocks[warm:])
    mb = sum(b.nbytes for b in blocks[warm:]) / 2**20
    png_kib = sum(len(p) for p in pool) / len(pool) / 1024
    print(f"sink inputs:  {len(chunks)} chunks ({warm} warm-up + {n_timed} timed) x {args.rows_per_chunk} rows, "
          f"{args.per_source} rows/source; {args.image_size} px PNGs, mean {png_kib:.0f} KiB; timed blocks "
          f"{rows} rows, {mb:.0f} MiB in memory; made in {time.perf_counter() - t0:.1f} s")
    kw = lambda w: {"config": conf, "out": str(outs[w]), "keys": KEYS, "owner": "bench"}  # noqa: E731
    secs = {}

    # in this process
    for b in blocks[:warm]:
        sink_batch(b, **kw("in-process"))
    t0 = time.perf_counter()
    for b in blocks[warm:]:
        sink_batch(b, **kw("in-process"))
    secs["in-process"] = time.perf_counter() - t0

    import ray

    from pipeline.config import RayConfig
    from pipeline.local_ray import start_ray

    t0 = time.perf_counter()
    start_ray(RayConfig(num_cpus=2))
    init_s = time.perf_counter() - t0
    U.quiet_ray_data()
    try:
        refs = [ray.put(b) for b in blocks]

        @ray.remote(num_cpus=1)
        def _start_worker():  # two at once: two worker processes, each with the sink's imports done
            from training.data import schema

            schema.dataset_features(False)
            time.sleep(1.0)

        ray.get([_start_worker.remote() for _ in range(2)])
        for way, cpus in (("ray-1", 2), ("ray-2", 1)):
            task = ray.remote(num_cpus=cpus)(sink_batch)
            ray.get([task.remote(r, **kw(way)) for r in refs[:warm]])
            t0 = time.perf_counter()
            ray.get([task.remote(r, **kw(way)) for r in refs[warm:]])
            secs[way] = time.perf_counter() - t0

        def ray_data(part, cpus, way):
            ds = ray.data.from_arrow_refs(part).map_batches(sink_batch, batch_size=None, batch_format="pyarrow",
                                                            num_cpus=cpus, fn_kwargs=kw(way))
            return sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))

        for way, cpus in (("ray-data", cfg.build.sink_num_cpus), ("ray-data-1cpu", 1.0)):
            ray_data(refs[:warm], cpus, way)
            t0 = time.perf_counter()
            n_summaries = ray_data(refs[warm:], cpus, way)
            secs[way] = time.perf_counter() - t0
    finally:
        ray.shutdown()
    same, ds_bytes = sink_dirs_check(outs, chunks)
    print(f"ray:          init {init_s:.2f} s (not timed); Ray Data returned {n_summaries} summaries for "
          f"{n_timed} chunks")
    print(f"check:        every way committed all {len(chunks)} chunks with the same dataset hashes: {same}; "
          f"dataset shards {ds_bytes / 2**20:.0f} MiB per way")
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "chunks": n_timed, "secs": secs, "same": same, "sink_num_cpus": cfg.build.sink_num_cpus}


# ------------------------------------------------------------------------------------------- part 2: the driver


def driver_child(config_path: str, out: str, result_path: str) -> int:
    """Run ``run_build`` with cheap stand-in model stages; write the driver's RSS per phase to ``result_path``."""
    import pipeline.build as B
    import pipeline.report as R
    from pipeline.config import load_config
    from pipeline.stages import _Stage, flight_table, plan_sources

    class SynthSources(_Stage):
        """Chunk id -> the chunk's final records (what the dialogue stage would emit), from its plan shard."""

        name = "sources"

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.pool = png_pool(self.cfg.build.sources.image_size, 8)

        def __call__(self, batch):
            recs = []
            for chunk in batch["chunk"].to_pylist():
                recs += final_records(chunk, plan_sources(self.out, self.keys["plan"], chunk),
                                      self.cfg.build.instructions.per_source, self.pool)
            return flight_table(recs)

    class GeneratePass:
        def __init__(self, *args, **kwargs):  # the stages' constructor arguments (config, out, keys, owner, ...)
            pass

        def __call__(self, batch):
            return batch

    class ScorePass(GeneratePass):
        pass

    class DialoguePass(GeneratePass):
        pass

    B.SourcesStage, B.GenerateStage, B.ScoreStage, B.DialogueStage = SynthSources, GeneratePass, ScorePass, DialoguePass
    U.quiet_ray_data()
    cfg = load_config(config_path)
    times: dict[str, float] = {}
    with U.RssSampler(0.01) as rss:
        def phased(name, fn, after):
            def wrapper(*a, **k):
                rss.phase(name)
                times[name] = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    times[name] = time.perf_counter() - times[name]
                    rss.phase(after)
            return wrapper

        B.write_plan = phased("plan", B.write_plan, "pipeline")
        B._aggregate = phased("aggregate", B._aggregate, "manifest+card")
        R.write_report = phased("report", R.write_report, "end")
        rss.phase("setup")
        t0 = time.perf_counter()
        result = B.run_build(cfg, out_dir=out)
        wall = time.perf_counter() - t0
    m = result.manifest
    Path(result_path).write_text(json.dumps({
        "baseline": rss.baseline, "peak": rss.peak, "peaks": rss.peaks, "hwm": rss.hwm,
        "phase_s": times, "wall": wall, "pipeline_wall": m["timings_s"]["pipeline_wall"],
        "chunks": m["num_chunks"], "rows": m["counts"]["candidates"], "kept": m["counts"]["kept"],
        "status": m["status"]}))
    return 0


def part_driver(root: Path, models: Path, sizes: list[int]) -> dict[int, dict]:
    from tests.buildutil import write_yaml

    results = {}
    for n in sizes:
        cfg_path = write_yaml(root / f"driver-{n}.yaml", synth_config(models, n, 2, 2, 64))
        res, log = root / f"driver-{n}.json", root / f"driver-{n}.log"
        t0 = time.perf_counter()
        with open(log, "wb") as f:
            rc = subprocess.run([sys.executable, __file__, "--driver-child", str(cfg_path), str(root / f"drv-{n}"),
                                 str(res)], cwd=U.REPO, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0 or not res.is_file():
            print(f"driver {n} chunks: FAILED rc={rc}; log tail:\n{log.read_text(errors='replace')[-3000:]}")
            results[n] = None
            continue
        results[n] = json.loads(res.read_text())
        r = results[n]
        print(f"driver {n:5d} chunks: {r['rows']} rows ({r['kept']} kept), {r['status']}, run_build {r['wall']:.1f} s "
              f"(pipeline_wall {r['pipeline_wall']:.1f} s), subprocess {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(root / f"drv-{n}", ignore_errors=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the numbers")
    ap.add_argument("--chunks", type=int, default=24, help="timed chunks of the sink part (default 24)")
    ap.add_argument("--rows-per-chunk", type=int, default=64, help="sink part (default 64, configs/paper.yaml)")
    ap.add_argument("--per-source", type=int, default=4, help="sink part: rows per source (default 4, paper)")
    ap.add_argument("--image-size", type=int, default=512, help="sink part: PNG side in px (default 512, paper)")
    ap.add_argument("--driver-chunks", type=int, default=10, help="N of the driver part (runs N and 100·N)")
    ap.add_argument("--skip", choices=("sink", "driver"), default=None, help="run one part only")
    ap.add_argument("--driver-child", nargs=3, metavar=("CONFIG", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver_child:
        return driver_child(*args.driver_child)
    if args.quick:
        args.chunks, args.rows_per_chunk, args.image_size, args.driver_chunks = 4, 8, 64, 4

    U.header("bench_sink: publishing rows/s with 1 vs 2 workers; driver RSS at N vs 100·N chunks")
    tmp = tempfile.TemporaryDirectory(prefix="bench_sink_")
    root = Path(tmp.name)
    U.quiet_libraries()
    ok = True
    if args.skip != "sink":
        s = part_sink(root, args)
        ok &= s["same"]
        base = s["rows"] / s["secs"]["in-process"]
        labels = {"in-process": "in this process, 1 worker (no Ray)",
                  "ray-1": "Ray tasks, num_cpus=2 (1 at a time)",
                  "ray-2": "Ray tasks, num_cpus=1 (2 at a time)",
                  "ray-data": f"Ray Data map_batches, num_cpus={s['sink_num_cpus']} (as the build)",
                  "ray-data-1cpu": "Ray Data map_batches, num_cpus=1"}
        rows = [[labels[w], s["chunks"], s["rows"], U.fmt_s(sec), f"{s['rows'] / sec:.1f}",
                 U.fmt_s(s["rows"] / sec / base)] for w, sec in s["secs"].items()]
        print(U.table(["sink", "chunks", "rows", "seconds", "rows/s", "vs 1 worker in-process"], rows))
        print()
        r2 = s["rows"] / s["secs"]["ray-2"] / base
        print(f"RESULT  sink rows/s: 1 worker {base:.1f} · 2 workers (Ray tasks) {s['rows'] / s['secs']['ray-2']:.1f} "
              f"· ratio 2 workers / 1 worker = {r2:.2f} (ideal 2.0 on 2 cores) · as the build runs it "
              f"(Ray Data) {s['rows'] / s['secs']['ray-data']:.1f} rows/s = {s['secs']['in-process'] / s['secs']['ray-data']:.2f}x")
        print()
    if args.skip != "driver":
        t0 = time.perf_counter()
        models = U.make_tiny_models(root / "models")
        print(f"tiny models written in {time.perf_counter() - t0:.1f} s (run_build checks and fingerprints them; "
              "the stand-in stages do not load them)")
        n = args.driver_chunks
        res = part_driver(root, models, [n, 100 * n])
        phases = ["setup", "plan", "pipeline", "aggregate", "manifest+card", "report", "end"]
        rows = []
        for size, r in res.items():
            if r is None:
                rows.append([size] + ["failed"] * (len(phases) + 4))
                continue
            rows.append([size, r["rows"], U.mib(r["baseline"])]
                        + [U.mib(r["peaks"].get(p, 0)) for p in phases]
                        + [U.mib(r["peak"]), U.mib(r["hwm"])])
        print(U.table(["chunks", "rows", "RSS at start (MiB)"] + [f"peak in {p} (MiB)" for p in phases]
                      + ["peak (MiB)", "VmHWM (MiB)"], rows))
        rows = [[size, r["rows"]] + [U.fmt_s(r["phase_s"].get(p)) for p in ("plan", "aggregate", "report")]
                + [U.fmt_s(r["pipeline_wall"]), U.fmt_s(r["wall"])] for size, r in res.items() if r]
        print(U.table(["chunks", "rows", "plan (s)", "aggregate (s)", "report (s)", "pipeline_wall (s)",
                       "run_build (s)"], rows))
        print()
        small, large = res[n], res[100 * n]
        ok &= small is not None and large is not None
        if small and large:
            print(f"RESULT  driver peak RSS: N={n} chunks: {U.mib(small['peak'])} MiB · 100N={100 * n} chunks: "
                  f"{U.mib(large['peak'])} MiB · ratio = {large['peak'] / small['peak']:.3f} (target: flat, 1.0); "
                  f"growth {(large['peak'] - small['peak']) / 2**10 / (99 * n):.1f} KiB per extra chunk")
            print(f"RESULT  driver VmHWM: {U.mib(small['hwm'])} vs {U.mib(large['hwm'])} MiB · "
                  f"ratio = {large['hwm'] / small['hwm']:.3f}")
    if args.quick:
        print("NOTE    --quick: tiny sizes; the figures are noise.")
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
