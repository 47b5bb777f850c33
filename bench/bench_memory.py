"""Peak resident memory of ``cafe build`` at N and 10·N rows (targets: peak(N) <= 3.5 GiB; peak(10·N) / peak(N) <= 1.2).

Usage::

    python bench/bench_memory.py            # N = 8 rows and 10·N = 80 rows
    python bench/bench_memory.py --n 16     # N = 16 and 160
    python bench/bench_memory.py --quick    # N = 2 and 20: checks that the script works

Each build runs as ``python -m pipeline.cli build CONFIG --out DIR`` in a subprocess (its own session), with
generation kept cheap so that 10·N stays feasible: ``tests.buildutil.tiny_build_config`` with one class
(``person``) x N sources, 1 instruction per source (rows = sources), ``sources.generation_steps`` 1,
``profusion.num_inference_steps`` 1; 2 rows per chunk, template dialogue, tiny models from
``training.models.tiny.make_tiny``.

A thread samples, every 0.2 s, the resident set size (RSS) summed over the build's process tree: the driver,
all its descendants (the driver starts Ray locally, so gcs_server, raylet and the Ray workers -- children of
the raylet -- are descendants) and, to be safe, any other process in the build's session. The peak of that sum
is reported per build, with the number of processes and the largest ones at the peak. Summed RSS counts pages
shared between processes (libraries, Ray's shared-memory object store) once per process, so it overstates
the machine's real use; it is the same measure at both sizes, which is what the ratio needs.

The build has four actor pools (sources, generate, score -- CLIP-T, DINO and CLIP-I fused in one actor --
and dialogue) and the sink's tasks. The peak depends on timing: each stage loads its models on its first chunk,
and Ray Data stops an operator's actors once that operator has finished, so in a small build the first stages'
actors may be gone before the last ones have loaded their models. A second figure does not depend on that overlap: the sum over processes of
each process's own peak RSS. Both ratios are printed. No threshold is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as U  # noqa: E402  (repo on sys.path, loopback Ray env)

import psutil  # noqa: E402

INTERVAL_S = 0.2


def memory_config(models_root: Path, rows: int) -> dict:
    from tests.buildutil import tiny_build_config

    return tiny_build_config(
        models_root,
        sources={"classes": ["person"], "num_per_class": rows, "generation_steps": 1},
        instructions={"per_source": 1},
        profusion={"num_inference_steps": 1},
    )


def _short(p: psutil.Process) -> str:
    """A readable name: 'cafe build (driver)', 'actor GenerateStage', 'raylet', 'gcs_server', ..."""
    try:
        cmd = p.cmdline()
        joined = " ".join(cmd)
        if "pipeline.cli" in joined:
            return "cafe build (driver)"
        if cmd and cmd[0].startswith("ray::"):
            name = cmd[0][5:]
            if name.startswith("MapWorker(MapBatches("):
                name = "actor " + name[len("MapWorker(MapBatches("):].split(")")[0]
            return name[:40]
        return p.name()[:40]
    except psutil.Error:
        return "?"


def _session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error, OSError):
            continue
    return out


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process, its descendants and its session every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = INTERVAL_S):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_event = threading.Event()
        self.peak_bytes = 0
        self.peak_at_s = 0.0
        self.peak_procs: list[tuple[str, int]] = []
        self.samples = 0
        self.max_procs = 0
        self.seen_pids: set[int] = set()
        self.per_pid_peak: dict[int, int] = {}  # pid -> its own peak RSS (whenever it happened)
        self.t0 = time.perf_counter()

    def _tree(self) -> list[psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.pid)
            procs[root.pid] = root
            for c in root.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            pass
        for p in psutil.process_iter():
            try:
                if p.pid not in procs and os.getsid(p.pid) == self.pid:
                    procs[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error, OSError):
                continue
        return list(procs.values())

    def sample(self) -> None:
        total, per = 0, []
        for p in self._tree():
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            per.append((p, rss))
            self.seen_pids.add(p.pid)
            self.per_pid_peak[p.pid] = max(rss, self.per_pid_peak.get(p.pid, 0))
        self.samples += 1
        self.max_procs = max(self.max_procs, len(per))
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_at_s = time.perf_counter() - self.t0
            per.sort(key=lambda x: -x[1])
            self.peak_procs = [(_short(p), rss) for p, rss in per]

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def run_build_measured(config_path: Path, out: Path, log_path: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "build", str(config_path),
           "--out", str(out)]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=U.REPO, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop_event.set()
    sampler.join()
    # Ray is stopped by the driver; its processes may take a moment to exit. Wait up to 15 s, then report
    # (and SIGTERM, by pid) whatever of this build's session is still alive.
    t_exit = time.perf_counter()
    while _session_procs(proc.pid) and time.perf_counter() - t_exit < 15:
        time.sleep(0.2)
    linger_s = time.perf_counter() - t_exit
    leftovers = []
    for p in _session_procs(proc.pid):
        leftovers.append(f"{p.pid}:{_short(p)}")
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else None
    return {"rc": rc, "wall": wall, "peak": sampler.peak_bytes, "peak_at": sampler.peak_at_s,
            "peak_procs": sampler.peak_procs, "max_procs": sampler.max_procs, "samples": sampler.samples,
            "pids_seen": len(sampler.seen_pids), "sum_of_peaks": sum(sampler.per_pid_peak.values()),
            "manifest": manifest, "leftovers": leftovers,
            "linger_s": linger_s, "log": log_path}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 2 (and 20): checks the script, not the numbers")
    ap.add_argument("--n", type=int, default=8, help="rows of the small build (default 8; the large one has 10·N)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, outputs, logs)")
    args = ap.parse_args(argv)
    n = 2 if args.quick else args.n

    U.header("bench_memory: peak summed RSS of `cafe build` (driver + Ray processes) at N and 10·N rows")
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    t0 = time.perf_counter()
    models = U.make_tiny_models(tmp / "models")
    print(f"tiny models written in {time.perf_counter() - t0:.1f} s; work dir {tmp}")
    from tests.buildutil import write_yaml

    results = {}
    for rows in (n, 10 * n):
        cfg_path = write_yaml(tmp / f"build-{rows}.yaml", memory_config(models, rows))
        r = run_build_measured(cfg_path, tmp / f"out-{rows}", tmp / f"build-{rows}.log")
        results[rows] = r
        status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']} (log: {r['log']})"
        print(f"build {rows:4d} rows: {status}; {r['wall']:.1f} s; peak {r['peak'] / 2**30:.2f} GiB at "
              f"{r['peak_at']:.1f} s over {len(r['peak_procs'])} processes ({r['samples']} samples, "
              f"{r['pids_seen']} distinct pids)")
        if r["leftovers"]:
            print(f"   ** processes of the build's session still alive 15 s after the driver exited (sent "
                  f"SIGTERM): {', '.join(r['leftovers'])}")
        elif r["linger_s"] > 1.0:
            print(f"   Ray processes of the build outlived the driver by {r['linger_s']:.1f} s")
        if r["rc"] != 0:
            print(open(r["log"], errors="replace").read()[-3000:])
    print()

    rows_out = []
    for rows, r in results.items():
        m = r["manifest"] or {}
        top = ", ".join(f"{name} {rss / 2**20:.0f}" for name, rss in r["peak_procs"][:4])
        rows_out.append([rows, (m.get("counts") or {}).get("candidates", "n/a"), m.get("num_chunks", "n/a"),
                         f"{r['wall']:.1f}", f"{r['peak'] / 2**30:.2f}", f"{r['sum_of_peaks'] / 2**30:.2f}",
                         len(r["peak_procs"]), top])
    print(U.table(["rows", "candidates", "chunks", "wall (s)", "peak summed RSS (GiB)",
                   "sum of per-process peaks (GiB)", "processes at peak", "largest at peak (MiB)"], rows_out))
    print()
    small, large = results[n], results[10 * n]
    ok = small["rc"] == 0 and large["rc"] == 0
    r = U.ratio(large["peak"], small["peak"])
    print(f"RESULT  peak summed RSS of the tiny build (N={n} rows): {small['peak'] / 2**30:.2f} GiB (target <= 3.5 GiB; "
          f"previous design 6.42 GiB)")
    print(f"RESULT  peak summed RSS: N={n}: {small['peak'] / 2**30:.2f} GiB · 10N={10 * n}: "
          f"{large['peak'] / 2**30:.2f} GiB · ratio = {U.fmt_s(r, 3)} (target <= 1.2)"
          + ("" if ok else "   ** a build failed: the ratio is not meaningful **"))
    r2 = U.ratio(large["sum_of_peaks"], small["sum_of_peaks"])
    print(f"RESULT  sum of per-process peak RSS (no timing overlap needed): N={n}: "
          f"{small['sum_of_peaks'] / 2**30:.2f} GiB · 10N={10 * n}: {large['sum_of_peaks'] / 2**30:.2f} GiB · "
          f"ratio = {U.fmt_s(r2, 3)}")
    if args.quick:
        print("NOTE    --quick: N is tiny; the ratio is mostly Ray's own footprint.")
    if args.keep:
        print(f"kept: {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
