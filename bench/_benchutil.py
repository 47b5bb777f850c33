"""Small helpers shared by the benchmark scripts in ``bench/`` (not a benchmark itself).

Every script puts the repository root on ``sys.path`` (so ``pipeline``, ``filtering``, ``training`` and
``tests.buildutil`` import from the checkout) and imports :mod:`pipeline` before anything imports Ray, so a
local Ray cluster listens on loopback only.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before `import ray`)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def machine_lines() -> list[str]:
    """Who/what/when: printed at the top of every benchmark so a pasted result is self-describing."""
    import psutil

    lines = [
        f"date (UTC):   {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')}",
        f"command:      {' '.join([os.path.basename(sys.executable)] + sys.argv)}",
        f"machine:      {platform.node()} · {platform.machine()} · {os.cpu_count()} logical CPUs · "
        f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM",
        f"python:       {platform.python_version()}",
        f"code:         {code_version()}",
    ]
    try:
        load1, load5, _ = os.getloadavg()
        lines.append(f"load average: {load1:.2f} (1 min), {load5:.2f} (5 min) at start"
                     + ("   ** machine is busy: figures will be noisy **" if load1 > 0.5 * (os.cpu_count() or 1)
                        else ""))
    except OSError:  # pragma: no cover - not on Linux
        pass
    return lines


def code_version() -> str:
    """``git rev-parse --short HEAD`` (+ ``-dirty`` and a short hash of ``git diff HEAD``, so that two runs on
    different uncommitted trees can be told apart)."""
    import hashlib
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not rev:
        return "unknown"
    return rev + (f"-dirty (diff {hashlib.sha256(diff).hexdigest()[:10]})" if diff else "")


def library_line() -> str:
    import importlib.metadata as md

    parts = []
    for dist in ("torch", "ray", "open_clip_torch", "diffusers", "transformers"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        parts.append(f"torch threads {torch.get_num_threads()}")
    except ImportError:  # pragma: no cover
        pass
    return "libraries:    " + ", ".join(parts)


def header(title: str) -> None:
    print("=" * 100)
    print(title)
    print("=" * 100)
    for line in machine_lines():
        print(line)
    print(library_line())
    print()


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text (also valid Markdown) table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def fmt_s(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def make_tiny_models(root: Path) -> Path:
    """The project's tiny model set (every role) under ``root``; returns ``root``."""
    from training.models.tiny import make_tiny

    quiet_libraries()
    make_tiny(root, seed=0)
    return root


def quiet_ray_data() -> None:
    """No progress bars from Ray Data (they would interleave with the tables)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.print_on_execution_start = False
    except Exception:  # noqa: BLE001 - older/newer Ray without the knob
        pass


def quiet_libraries() -> None:
    """No progress bars from datasets / transformers / huggingface_hub (saving, weight loading)."""
    import logging

    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


class RssSampler:
    """Peak resident set size of *this* process, sampled by a daemon thread, per named phase.

    Usage::

        with RssSampler() as rss:
            rss.phase("plan"); plan()
            rss.phase("run"); run()
        rss.peak, rss.peaks["plan"], rss.hwm

    ``hwm`` is the kernel's own high-water mark of the process (``VmHWM`` in ``/proc/self/status``), which no
    sampling interval can miss; it covers the whole life of the process since its ``exec``, imports included.
    (``getrusage``'s ``ru_maxrss`` is not used: Linux carries it over ``exec`` from the parent process.)
    """

    def __init__(self, interval_s: float = 0.01):
        import threading

        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self.peaks: dict[str, int] = {}
        self.current = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        self.peak = max(self.peak, rss)
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def phase(self, name: str) -> None:
        self._sample()  # closes the previous phase with a last sample
        self.current = name
        self._sample()

    @property
    def hwm(self) -> int | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        except OSError:  # pragma: no cover - not Linux
            pass
        return None

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

