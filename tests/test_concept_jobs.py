"""Concept job files, per-job validation, run ids and the job table's state machine (no Ray, no models)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.concept_jobs import SUCCESS_MARKER, JobTable, format_status, load_jobs, parse_job
from pipeline.config import ConfigError
from pipeline.store import Storage


def _png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(path)
    return str(path)


@pytest.fixture
def job_file(tmp_path):
    refs = [_png(tmp_path / "refs" / f"{i}.png") for i in range(2)]
    base = tmp_path / "base.yaml"
    base.write_text("models:\n  root: /somewhere/models\nconcepts:\n  ico: {steps: 7}\n")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "base: base.yaml\n"
        f"concepts:\n  output: {tmp_path / 'out'}\n  infusion: {{steps: 3}}\n"
        "jobs:\n"
        f"  - {{id: red, method: ico, noun: circle, images: {json.dumps(refs)}}}\n"
        f"  - {{id: red, method: infusion, noun: circle, images: {tmp_path / 'refs'}, params: {{learning_rate: 0.5}}}}\n")
    return jobs, refs


def test_yaml_job_file_extends_its_base_and_resolves_params(job_file):
    path, refs = job_file
    cfg, raw = load_jobs(path, overrides=["concepts.seed=5"])
    assert cfg.models.root == "/somewhere/models"          # from base
    assert cfg.concepts.ico == {"steps": 7} and cfg.concepts.infusion == {"steps": 3}
    assert cfg.concepts.seed == 5
    jobs = [parse_job(r, cfg, "fp0", i) for i, r in enumerate(raw)]
    assert [j.error for j in jobs] == [None, None]
    assert jobs[0].params["steps"] == 7 and jobs[0].seed == 5
    assert jobs[1].params["steps"] == 3 and jobs[1].params["learning_rate"] == 0.5
    assert jobs[1].images == refs                          # a folder expands to its images, sorted
    assert jobs[0].artifact == f"red/ico/{jobs[0].run_id}"


def test_run_id_depends_on_what_determines_the_result(job_file):
    path, _ = job_file
    cfg, raw = load_jobs(path)
    a = parse_job(raw[0], cfg, "fp0")
    assert parse_job(raw[0], cfg, "fp0").run_id == a.run_id
    assert parse_job(raw[0], cfg, "fp1").run_id != a.run_id          # another base model
    assert parse_job(dict(raw[0], seed=9), cfg, "fp0").run_id != a.run_id
    assert parse_job(dict(raw[0], params={"steps": 8}), cfg, "fp0").run_id != a.run_id
    cfg2, _ = load_jobs(path, overrides=["concepts.actors.num_actors=3", "concepts.heartbeat_s=1.0"])
    assert parse_job(raw[0], cfg2, "fp0").run_id == a.run_id         # how it runs is not what it computes
    for change in ("models.t2i.dtype=float16", "concepts.sample.steps=7", "concepts.samples_per_job=5"):
        cfg3, _ = load_jobs(path, overrides=[change])
        assert parse_job(raw[0], cfg3, "fp0").run_id != a.run_id, change
    _png(Path(raw[0]["images"][0]), colour=(1, 2, 3))                  # same path, new content
    assert parse_job(raw[0], cfg, "fp0").run_id != a.run_id


@pytest.mark.parametrize("change, needle", [
    ({"id": "../escape"}, "one path segment"),
    ({"id": "a/b"}, "one path segment"),
    ({"id": ".hidden"}, "one path segment"),
    ({"method": "dreambooth"}, "unknown method"),
    ({"noun": "teddy bear"}, "one word"),
    ({"noun": ""}, "one word"),
    ({"images": []}, "no reference images"),
    ({"params": {"stepz": 3}}, "unknown parameter"),
    ({"params": {"steps": "many"}}, "steps"),
    ({"seed": -1}, "seed"),
    ({"colour": "red"}, "unknown job key"),
])
def test_bad_jobs_fail_alone_with_a_clear_error(job_file, change, needle):
    path, _ = job_file
    cfg, raw = load_jobs(path)
    job = parse_job(dict(raw[0], **change), cfg, "fp0")
    assert job.error is not None and needle in job.error, job.error
    assert "/" not in job.concept_id and not job.concept_id.startswith(".")
    ok = parse_job(raw[1], cfg, "fp0")
    assert ok.error is None


def test_em_jobs_need_no_noun_and_bad_em_jobs_fail_alone(job_file, tmp_path):
    path, refs = job_file
    cfg, raw = load_jobs(path)
    good = {"id": "scene", "method": "em", "images": refs[:1], "params": {"tokens": ["[v1]", "[v2]"]},
            "masks": {"[v1]": refs[0]}}
    job = parse_job(good, cfg, "fp0")
    assert job.error is None and job.noun == "" and job.params["tokens"] == ["[v1]", "[v2]"]
    # the ground truth is part of what the artifact holds (its IoU history): another mask, another run
    other = _png(tmp_path / "other-mask.png", colour=(255, 255, 255))
    assert parse_job(dict(good, masks={"[v1]": other}), cfg, "fp0").run_id != job.run_id
    assert parse_job(dict(good, masks={}), cfg, "fp0").run_id != job.run_id
    for change, needle in (({"masks": {"[v9]": refs[0]}}, "not tokens of this job"),
                           ({"masks": "gt.png"}, "expected a mapping"),
                           ({"images": refs, "params": {"tokens": ["[v1]"]}}, "images [1] have no token"),
                           ({"params": {"tokens": ["[v1]"], "token_images": [2]}}, "more images named"),
                           ({"params": {"tokens": ["[v1]", "[v1]"]}}, "distinct"),
                           ({"params": {"init": "word"}}, "one word per token")):
        bad = parse_job(dict(good, **change), cfg, "fp0")
        assert bad.error is not None and needle in bad.error, (change, bad.error)
    assert "EM jobs only" in parse_job(dict(raw[0], masks={"x": refs[0]}), cfg, "fp0").error


def test_empty_folder_is_no_images(job_file, tmp_path):
    path, _ = job_file
    cfg, raw = load_jobs(path)
    (tmp_path / "empty").mkdir()
    job = parse_job(dict(raw[0], images=str(tmp_path / "empty")), cfg, "fp0")
    assert "no reference images" in job.error


def test_jsonl_and_parquet_sources(job_file, tmp_path):
    path, refs = job_file
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"concepts:\n  output: {tmp_path / 'o'}\n")
    rows = [{"id": "a", "method": "ico", "noun": "circle", "images": refs},
            {"id": "b", "method": "infusion", "noun": "star", "images": refs, "params": {"steps": 2}}]
    jl = tmp_path / "jobs.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    cfg, raw = load_jobs(jl, config=cfg_file)
    jobs = [parse_job(r, cfg, "fp", i) for i, r in enumerate(raw)]
    assert [j.error is None for j in jobs] == [True, True, False]
    assert "not valid JSON" in jobs[2].error
    pq.write_table(pa.Table.from_pylist([dict(r, params=json.dumps(r.get("params", {}))) for r in rows]),
                   tmp_path / "jobs.parquet")
    cfg, raw = load_jobs(tmp_path / "jobs.parquet", config=cfg_file)
    jobs = [parse_job(r, cfg, "fp", i) for i, r in enumerate(raw)]
    assert [j.error for j in jobs] == [None, None] and jobs[1].params["steps"] == 2
    with pytest.raises(ConfigError, match="unknown job source"):
        load_jobs(tmp_path / "jobs.csv")


def test_invalid_config_in_a_job_file_lists_every_error(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("concepts:\n  max_attempts: 0\n  ico: {nope: 1}\n  actorz: 2\njobs: []\n")
    with pytest.raises(ConfigError) as err:
        load_jobs(p)
    text = str(err.value)
    assert "max_attempts" in text and "actorz" in text


def test_job_table_state_machine(job_file, tmp_path):
    path, _ = job_file
    cfg, raw = load_jobs(path)
    job = parse_job(raw[0], cfg, "fp0")
    storage = Storage(cfg.concepts.output)
    table = JobTable(storage)
    rec = table.record(job, max_attempts=2)
    assert rec["state"] == "queued" and rec["attempts"] == 0
    rec.update(state="running", attempts=1, owner="concept-worker-0")
    table.put(rec)
    # a new driver finds a running record: its owner died with the old driver; the attempt counts
    rec = table.record(job, max_attempts=2)
    assert rec["state"] == "queued" and rec["attempts"] == 1 and "died" in rec["error"]
    rec.update(state="running", attempts=2)
    table.put(rec)
    rec = table.record(job, max_attempts=2)
    assert rec["state"] == "failed" and rec["attempts"] == 2
    assert table.record(job, max_attempts=2)["state"] == "failed"            # stays failed ...
    rec = table.record(job, max_attempts=2, retry_failed=True)             # ... unless asked to retry
    assert rec["state"] == "queued" and rec["attempts"] == 0
    rec.update(state="failed", attempts=2)
    table.put(rec)
    # a success marker wins over the table (killed between the marker and the table update)
    storage.sub(job.artifact).write_bytes(SUCCESS_MARKER, b"{}")
    rec = table.record(job, max_attempts=2)
    assert rec["state"] == "done"
    assert table.record(job, max_attempts=2)["attempts"] == 2      # a finished job is left alone
    bad = parse_job(dict(raw[0], id="x/y"), cfg, "fp0")
    assert table.record(bad, 2)["state"] == "failed"
    text = format_status(table.records())
    assert "done: 1" in text and "failed: 1" in text and "one path segment" in text


def test_shipped_job_file_loads_and_every_job_is_valid():
    cfg, raw = load_jobs("configs/concepts/tiny.yaml")
    assert cfg.models.root.endswith("models/world")             # the embedded default's models (base: ../tiny.yaml)
    jobs = [parse_job(r, cfg, "fp", i) for i, r in enumerate(raw)]
    assert [j.error for j in jobs] == [None] * len(jobs)
    assert {j.method for j in jobs} == {"ico", "infusion"}
    assert all(len(j.images) >= 2 for j in jobs)


def test_shipped_em_job_file_loads_on_the_scene_model():
    cfg, raw = load_jobs("configs/concepts/em.yaml")
    assert cfg.models.role_dir("t2i").as_posix().endswith("models/world/t2i_scenes")
    jobs = [parse_job(r, cfg, "fp", i) for i, r in enumerate(raw)]
    assert [j.error for j in jobs] == [None] * len(jobs) and {j.method for j in jobs} == {"em"}
    assert all(j.noun == "" and set(j.masks) == set(j.params["tokens"]) and j.params["attn_res"] == 8 for j in jobs)
    assert all(Path(m).is_file() for j in jobs for m in j.masks.values())
