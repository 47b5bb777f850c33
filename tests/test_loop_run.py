"""`cafe pipeline run` end to end on the world's models (a few sources, a few steps): SIGKILL inside a stage and
re-run, no finished stage redone, a no-op re-run, the datasets readable by `datasets` and Ray Data."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.buildutil import REPO, kill_session, wait_for, write_yaml
from tests.trainutil import WORLD

pytestmark = pytest.mark.integration


def loop_config(tmp: Path) -> Path:
    src = tmp / "sources"
    for cls, n in (("circle", 2), ("star", 2)):
        (src / cls).mkdir(parents=True)
        for f in sorted((WORLD / "sources" / cls).glob("*.png"))[:n]:
            (src / cls / f.name).write_bytes(f.read_bytes())
    data = {
        "base": str(REPO / "configs" / "tiny.yaml"),
        "run": {"name": "loop", "output_dir": str(tmp / "outputs")},
        "build": {"sources": {"path": str(src), "exclude": []},
                  "instructions": {"per_source": 2},
                  "profusion": {"num_inference_steps": 3, "finetune_steps": 3},
                  "rules": {"clip_t_min": -1.0, "dino_min": -1.0}, "rows_per_chunk": 4},
        "train": {"mllm": {"max_steps": 3, "micro_batch_size": 2}, "diffusion": {"max_steps": 3, "micro_batch_size": 2},
                  "checkpoint": {"every_steps": 1}},
        "pipeline": {"rounds": 1, "eval": {"max_prompts": 2, "num_inference_steps": 2}},
    }
    return write_yaml(tmp / "loop.yaml", data)


def cafe(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def test_killed_loop_resumes_without_redoing_finished_stages(tmp_path, ray_local):
    import datasets

    cfg = loop_config(tmp_path)
    out = tmp_path / "outputs" / "loop-loop"
    log = tmp_path / "log.txt"
    proc = cafe("pipeline", "run", str(cfg), log=log)
    running = out / "_loop" / "running" / "train-mllm-r0.json"
    wait_for(running.exists, 600, proc, "train-mllm-r0 to start")
    wait_for(lambda: any((out / "train" / "runs").rglob("*")) if (out / "train" / "runs").exists() else False,
             300, proc, "the Ray Train run to start")
    time.sleep(2)
    kill_session(proc)  # SIGKILL inside a stage: driver, its Ray cluster and the training workers
    build_record = (out / "_loop" / "stages" / "build-r0.json").read_text()
    assert not (out / "_loop" / "stages" / "train-mllm-r0.json").exists()

    plan = subprocess.run([sys.executable, "-m", "pipeline.cli", "pipeline", "plan", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "skip  build-r0" in plan.stdout and "interrupted: started, never finished" in plan.stdout

    rerun = cafe("pipeline", "run", str(cfg), log=log)
    assert rerun.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert (out / "_loop" / "stages" / "build-r0.json").read_text() == build_record  # not redone
    records = {p.stem: json.loads(p.read_text()) for p in (out / "_loop" / "stages").glob("*.json")}
    assert set(records) == {"build-r0", "train-mllm-r0", "train-diffusion-r0", "eval-r0", "report"}
    assert not list((out / "_loop" / "running").glob("*.json"))

    # a no-op re-run: nothing runs, nothing is rewritten
    t0 = time.perf_counter()
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "pipeline", "run", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ran 0, skipped 5" in again.stdout, again.stdout + again.stderr[-2000:]
    assert {p.stem: json.loads(p.read_text()) for p in (out / "_loop" / "stages").glob("*.json")} == records
    assert time.perf_counter() - t0 < 120  # loose: a no-op must not train (the bench measures seconds)

    # the round's dataset: datasets (no warning about the card) and Ray Data read it; the report exists
    dataset = records["build-r0"]["outputs"]["dataset"]
    hf = datasets.load_dataset(f"{dataset}/dataset", split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == records["build-r0"]["outputs"]["kept"] == 8
    assert ray_local.data.read_parquet(f"{dataset}/dataset/data").count() == 8
    # the union of two rounds is a list of directories (no copy): Ray Data reads several paths at once (it once
    # failed on a missing aiohttp, see pyproject.toml); datasets reads the same list of files
    import shutil

    other = tmp_path / "other-round"
    shutil.copytree(f"{dataset}/dataset", other)
    assert ray_local.data.read_parquet([f"{dataset}/dataset/data", str(other / "data")]).count() == 16
    files = [str(p) for d in (Path(dataset) / "dataset", other) for p in sorted((d / "data").glob("*.parquet"))]
    union = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf2"))
    assert union.num_rows == 16
    metrics = json.loads((Path(records["eval-r0"]["outputs"]["report"]) / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"assistant", "direct", "input", "t2i"} and metrics["n"] == 2
    assert metrics["methods"]["input"]["oracle"]["all"]["identity"]["rate"] == 1.0  # the input is its own identity
    assert (out / "report" / "report.md").read_text().count("## Round 0") == 1
