"""`cafe pipeline run` end to end on the world's models (a few sources, a few steps), every location on s3: a
SIGKILL inside a stage and a resume that redoes no finished stage, a no-op re-run, the datasets readable by
`datasets` and Ray Data, then `cafe report` and `cafe refilter` on the s3 output."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.buildutil import REPO, kill_session, wait_for, write_yaml
from tests.trainutil import WORLD

pytestmark = pytest.mark.integration


def loop_config(tmp: Path, root: str | None = None) -> Path:
    """The loop on 4 world sources; every location under ``root`` (a local directory or an ``s3://`` URI) when
    given, else under ``tmp``."""
    from pipeline.store import Storage

    root = root or str(tmp)
    src = Storage(f"{root}/sources")
    for cls, n in (("circle", 2), ("star", 2)):
        for f in sorted((WORLD / "sources" / cls).glob("*.png"))[:n]:
            src.write_bytes(f"{cls}/{f.name}", f.read_bytes())
    data = {
        "base": str(REPO / "configs" / "tiny.yaml"),
        "run": {"name": "loop", "output_dir": f"{root}/outputs"},
        "build": {"sources": {"path": src.uri, "exclude": []},
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


def test_loop_with_every_location_on_s3_resumes_and_its_outputs_are_read(tmp_path, s3_bucket):
    """Sources, round datasets, Ray Train runs, exported weights, TensorBoard, evaluation and the loop's state all
    on a real S3-compatible server: a SIGKILL inside a stage, a resume that redoes nothing finished, a no-op re-run
    that rewrites nothing, the round's dataset (and a union of two) read by Ray Data and `datasets`, then
    `cafe report` and `cafe refilter` on the s3 round dataset.

    One run covers local storage too: the loop reaches storage only through :class:`pipeline.store.Storage`, whose
    local backend every build, training and store test exercises (and `make run` runs the loop locally)."""
    import datasets
    import pyarrow.fs as pafs

    from pipeline.store import Storage, local_copy

    cfg = loop_config(tmp_path, root=s3_bucket)
    out = Storage(f"{s3_bucket}/outputs/loop-loop")
    log = tmp_path / "log.txt"
    proc = cafe("pipeline", "run", str(cfg), log=log)
    wait_for(lambda: out.is_file("_loop/running/train-mllm-r0.json"), 600, proc, "train-mllm-r0 to start")
    wait_for(lambda: bool(out.list("train/runs", recursive=True)), 300, proc, "the Ray Train run to start on s3")
    time.sleep(2)
    kill_session(proc)
    build_record = out.read_bytes("_loop/stages/build-r0.json")
    assert not out.exists("_loop/stages/train-mllm-r0.json")
    plan = subprocess.run([sys.executable, "-m", "pipeline.cli", "pipeline", "plan", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "skip  build-r0" in plan.stdout and "interrupted: started, never finished" in plan.stdout, plan.stdout

    rerun = cafe("pipeline", "run", str(cfg), log=log)
    assert rerun.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert out.read_bytes("_loop/stages/build-r0.json") == build_record  # not redone
    records = {k.removesuffix(".json"): out.read_json(f"_loop/stages/{k}") for k in out.list("_loop/stages")}
    assert set(records) == {"build-r0", "train-mllm-r0", "train-diffusion-r0", "eval-r0", "report"}
    assert out.list("_loop/running") == []
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "pipeline", "run", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ran 0, skipped 5" in again.stdout, again.stdout + again.stderr[-2000:]
    assert {k.removesuffix(".json"): out.read_json(f"_loop/stages/{k}") for k in out.list("_loop/stages")} == records

    # the round's dataset: Ray Data reads it on s3, `datasets` reads a copy of it (no warning about the card); the
    # union of two rounds is a list of directories (no copy): Ray Data reads several paths at once (it once failed
    # on a missing aiohttp, see pyproject.toml), datasets reads the same list of files
    dataset = records["build-r0"]["outputs"]["dataset"]
    local = local_copy(f"{dataset}/dataset", cache_dir=tmp_path / "cache")
    hf = datasets.load_dataset(local, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == records["build-r0"]["outputs"]["kept"] == 8
    other = Storage(f"{s3_bucket}/other-round")
    for key in Storage(f"{dataset}/dataset").list("data"):
        other.write_bytes(f"data/{key}", Storage(f"{dataset}/dataset").read_bytes(f"data/{key}"))
    from pipeline.config import RayConfig
    from pipeline.local_ray import ray_session

    with ray_session(RayConfig(num_cpus=2)):  # started now: an idle cluster beside the loop's would slow it down
        import ray

        assert ray.data.read_parquet(f"{dataset}/dataset/data").count() == 8
        assert ray.data.read_parquet([f"{dataset}/dataset/data", other.uri_of("data")]).count() == 16
    files = sorted(str(p) for p in Path(local).glob("data/*.parquet"))
    union = datasets.load_dataset("parquet", data_files=files * 2, split="train", cache_dir=str(tmp_path / "hf2"))
    assert union.num_rows == 16
    metrics = Storage(records["eval-r0"]["outputs"]["report"]).read_json("metrics.json")
    assert set(metrics["methods"]) == {"assistant", "direct", "input", "t2i"} and metrics["n"] == 2
    assert metrics["methods"]["input"]["oracle"]["all"]["identity"]["rate"] == 1.0  # the input is its own identity
    # per-pair verdicts beside the rates (the report's paired comparisons read them): they add up to the rates
    from pipeline.loop.evaluate import read_pairs

    pairs = read_pairs(records["eval-r0"]["outputs"]["report"])
    assert len(pairs["subject"]) == metrics["n"]
    for method in metrics["methods"]:
        for verdict in ("identity", "instruction", "both"):
            rate = metrics["methods"][method]["oracle"]["all"][verdict]["rate"]
            assert sum(pairs[f"{method}.{verdict}"]) / metrics["n"] == pytest.approx(rate, abs=1e-4)
    assert sum(pairs["changing"]) == metrics["n_changing"]
    report_md = out.read_bytes("report/report.md").decode()
    assert report_md.count("## Round 0") == 1 and "| assistant r0 − t2i r0 |" in report_md  # the paired table

    # every output is on s3 and nothing of the run was written locally
    for rec, key in ((records["build-r0"], "dataset"), (records["train-mllm-r0"], "weights"),
                     (records["train-diffusion-r0"], "weights"), (records["eval-r0"], "report")):
        assert rec["outputs"][key].startswith(s3_bucket + "/"), rec["outputs"]
    assert Storage(records["train-diffusion-r0"]["outputs"]["weights"]).is_file("conditioner.json")
    assert any("tfevents" in k for k in out.list("train/tensorboard", recursive=True))
    assert not (REPO / "outputs" / "loop-loop").exists() and not list(tmp_path.glob("outputs*"))

    # `cafe report` and `cafe refilter` read (and write) s3
    dataset = Storage(records["build-r0"]["outputs"]["dataset"])
    dataset.delete("report/report.md")
    rep = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", dataset.uri], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and f"report: {dataset.uri}/report/report.md" in rep.stdout, rep.stderr[-2000:]
    assert "## Funnel" in dataset.read_bytes("report/report.md").decode()
    refiltered = f"{s3_bucket}/refiltered"
    ref = subprocess.run([sys.executable, "-m", "pipeline.cli", "refilter", dataset.uri, "--set",
                          "build.rules.clip_t_min=1.0", "--out", refiltered], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    assert "threshold sweep against the oracle" in ref.stdout and "| clip_t | 1.000 (applied) | 0 |" in ref.stdout
    new = Storage(refiltered)
    manifest = new.read_json("manifest.json")
    assert manifest["refiltered_from"] == dataset.uri and manifest["counts"]["kept"] == 0  # no cosine reaches 1
    assert manifest["counts"]["candidates"] == records["build-r0"]["outputs"]["candidates"]
    assert new.is_file("_SUCCESS") and new.is_file("report/report.md")
    fs, root = pafs.FileSystem.from_uri(refiltered)
    assert fs.get_file_info(f"{root}/dataset/data").type == pafs.FileType.Directory  # an empty table still exists

    # `cafe retrain` on the same s3 output (the registry: a log of decisions on s3). The first call registers the
    # finished loop (nothing re-runs); then a new source file: round 0 builds only it (source increment 1), the
    # increment-0 dataset is untouched, training continues from version 1's weights, the gate decides version 2
    from pipeline.loop.registry import open_registry

    def retrain() -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "retrain", str(cfg)], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    assert "version 1 promoted" in retrain().stdout
    first = {k: dataset.read_bytes(f"dataset/data/{k}") for k in dataset.list("dataset/data")}
    new_file = sorted((WORLD / "sources" / "circle").glob("*.png"))[2]
    Storage(f"{s3_bucket}/sources").write_bytes(f"circle/{new_file.name}", new_file.read_bytes())
    second = retrain()
    assert "1 new source(s)" in second.stdout and "continues from version 1" in second.stdout, second.stdout
    build = out.read_json("_loop/stages/build-r0.json")
    incs = build["outputs"]["increments"]
    assert [i["dataset"] for i in incs][0] == dataset.uri and len(incs) == 2
    assert {k: dataset.read_bytes(f"dataset/data/{k}") for k in dataset.list("dataset/data")} == first
    new = Storage(incs[1]["dataset"])
    sources = {u for k in new.list("candidates/data") for u in new.read_parquet(f"candidates/data/{k}",
                                                                                  columns=["source_id"])[0].to_pylist()}
    assert incs[1]["candidates"] == 2 and len(sources) == 1  # one new source × instructions.per_source 2
    reg = open_registry(f"{out.uri}/registry")
    v1, v2 = reg.list()
    assert v2.base == 1 and v2.status in ("promoted", "rejected") and v2.reason
    for model in ("mllm", "diffusion"):
        trained = out.read_json(f"_loop/stages/train-{model}-r0.json")
        assert trained["parts"]["init"] == v1.checkpoint[model]
        assert trained["outputs"]["datasets"] == [i["dataset"] for i in incs]
    assert "nothing new" in retrain().stdout


from tests.s3util import s3_bucket, s3_server  # noqa: E402,F401  (fixtures)
