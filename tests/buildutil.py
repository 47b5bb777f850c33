"""Helpers shared by the build integration tests: tiny build configs, subprocess builds, killing them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from pipeline.config import CafeConfig, load_config_dict

REPO = Path(__file__).resolve().parents[1]


def tiny_build_config(models_root: Path, **build_overrides) -> dict:
    """3 generated sources (one per class) × 2 instructions, 2 rows per chunk → 3 chunks, 3 steps each."""
    build = {
        "sources": {"kind": "generate", "classes": ["person", "cat", "dog"], "num_per_class": 1,
                    "generation_steps": 2, "image_size": 64},
        "instructions": {"phrases": ["on the beach", "in the snow", "wearing a red hat"], "per_source": 2},
        "profusion": {"num_inference_steps": 3, "batch_size": 2},
        "rules": {"clip_t_min": -1.0, "dino_min": -1.0},
        "dialogue": {"backend": "template"},
        "rows_per_chunk": 2,
        "report_samples": 2,
    }
    for key, value in build_overrides.items():
        build[key] = {**build.get(key, {}), **value} if isinstance(value, dict) else value
    return {"run": {"name": "t", "seed": 0}, "ray": {"num_cpus": 2},
            "models": {"root": str(models_root)}, "build": build}


def as_config(data: dict) -> CafeConfig:
    return load_config_dict(data)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def start_build(config_path: Path, out: Path, address: str | None = None, log: Path | None = None):
    cmd = [sys.executable, "-m", "pipeline.cli", "build", str(config_path), "--out", str(out)]
    if address:
        cmd += ["--address", address]
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=open(log or os.devnull, "wb"), stderr=subprocess.STDOUT)


def committed(out: Path, stage: str) -> list[str]:
    """Chunks committed by ``generate`` (a ``commit.json`` marker) or by the ``sink`` (a marker per chunk)."""
    d = out / "_work" / stage
    if not d.is_dir():
        return []
    if stage == "generate":
        return sorted(p.parent.name for p in d.glob("*/*/commit.json"))
    return sorted(p.stem for p in d.glob("*/*.json"))


def read_parquet_dir(path: Path):
    """All shards of ``path`` (e.g. OUT/dataset/data) as one table sorted by id (images as stored bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables) if tables else None
    return table.sort_by("id") if table is not None and table.num_rows else table


def mtimes(root: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob(pattern))}


def wait_for(predicate, timeout: float, proc=None, what: str = "condition") -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"build exited (rc={proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_session(proc) -> None:
    """SIGKILL the build's whole session (driver and anything it started), then reap it."""
    victims = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                victims.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    proc.wait(timeout=60)


def find_actor_pids(marker: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and marker in cmd:
            out.append(p.pid)
    return out
