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
    d = out / "_work" / stage
    return sorted(p.name for p in d.iterdir() if (p / "counts.json").is_file()) if d.is_dir() else []


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
