"""How fast the `cafe` command answers where no model is needed: help, config validation, a config error, an
unknown concept, the loop's plan. Each is run as a fresh process (what a user waits for), 3 times; the median
wall time is printed. Target (issue 26): ≤ 2 s each.

    python bench/bench_cli.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAFE = [sys.executable, "-m", "pipeline"]


def main() -> None:
    tmp = tempfile.mkdtemp()
    commands = {
        "cafe --help": ["--help"],
        "cafe config validate (2 configs)": ["config", "validate", "configs/tiny.yaml", "configs/paper.yaml"],
        "cafe config validate (an error)": ["config", "validate", "--set", "ray.num_cpus=0", "configs/tiny.yaml"],
        "cafe concepts generate (unknown concept)": ["concepts", "generate", "--config", "configs/concepts/tiny.yaml",
                                                     "--concept", "nope", "--prompt", "x", "--set",
                                                     f"concepts.output={tmp}/c"],
        "cafe pipeline plan": ["pipeline", "plan", "configs/tiny.yaml", "--set", f"pipeline.output={tmp}/loop"],
    }
    print(f"python {sys.version.split()[0]}; each command 3 times as a fresh process; median wall seconds")
    worst = 0.0
    for name, args in commands.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(CAFE + args, cwd=ROOT, capture_output=True)
            times.append(time.perf_counter() - t0)
        worst = max(worst, statistics.median(times))
        print(f"{name:45s} {statistics.median(times):6.2f} s")
    print(f"RESULT slowest median {worst:.2f} s (target ≤ 2 s: {'met' if worst <= 2 else 'missed'})")


if __name__ == "__main__":
    main()
