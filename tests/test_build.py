"""`cafe build` end to end on tiny models and a local Ray cluster: output, keys, determinism, exactly-once."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from pipeline.build import BuildConflict, run_build, stage_keys
from pipeline.stages import choose_phrases
from tests.buildutil import (as_config, committed, find_actor_pids, kill_session, mtimes, read_parquet_dir,
                             start_build, tiny_build_config, wait_for, write_yaml)
from training.data import schema as S
from training.data.ids import row_id, stable_int
from training.models.kit import fingerprint

pytestmark = pytest.mark.integration


SENTINEL_KEY = "sk-sentinel-7f3a9c1e5b2d4f60"
S3_SECRET = "testing-secret-sentinel"  # tests/s3util.py's AWS_SECRET_ACCESS_KEY


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """This module's local cluster, started with the credentials its builds need already in the environment (the
    S3 server's ``AWS_*``, the dialogue key): a local cluster's workers inherit the driver's environment, as
    Kubernetes nodes get theirs from Secrets; no credential travels in a runtime_env."""
    from pipeline.config import RayConfig
    from pipeline.local_ray import ray_session

    saved = os.environ.get("CAFE_TEST_LLM_KEY")
    os.environ["CAFE_TEST_LLM_KEY"] = SENTINEL_KEY
    try:
        with ray_session(RayConfig(num_cpus=2)):
            import ray

            yield ray
    finally:
        if saved is None:
            os.environ.pop("CAFE_TEST_LLM_KEY", None)
        else:
            os.environ["CAFE_TEST_LLM_KEY"] = saved


def _session_files_with(ray, needle: str) -> list[str]:
    from tests.cluster import files_containing

    return files_containing(ray._private.worker._global_node.get_session_dir_path(), needle)


@pytest.fixture(scope="module")
def build_a(tiny_models, tmp_path_factory, ray_local):
    """The uninterrupted reference build."""
    out = tmp_path_factory.mktemp("build-a")
    cfg = as_config(tiny_build_config(tiny_models))
    return cfg, run_build(cfg, out_dir=out)


def test_dataset_rows_lineage_and_scores(build_a):
    cfg, result = build_a
    table = read_parquet_dir(result.out_dir / "dataset" / "data")
    assert tuple(table.column_names) == S.DATASET_COLUMNS
    ids = table[S.ID].to_pylist()
    assert len(ids) == 6 == len(set(ids))
    expected = {row_id(0, sid, p) for sid in set(table[S.SOURCE_ID].to_pylist())
                for p in choose_phrases(sid, cfg.build.instructions.phrases, 2, cfg.run.seed)}
    assert set(ids) == expected
    for r in table.to_pylist():
        assert r[S.FILLED_PROMPT] == f"a {r[S.CLASS]} {r[S.INSTRUCTION]}"
        assert r[S.SEED] == stable_int("row", 0, r[S.ID])
        assert json.loads(r[S.GENERATOR_PARAMS])["s1"] == 7.0 and r[S.GENERATOR] == "profusion"
        assert r[S.CLASS] in r[S.USER_TEXT] and r[S.ASSISTANT_TEXT]
        assert all(-1.0 <= r[c] <= 1.0 for c in (S.CLIP_T, S.DINO, S.CLIP_I))
        assert r[S.INPUT_IMAGE]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"


def test_output_round_trips_through_datasets_and_ray_data(build_a, ray_local, tmp_path, monkeypatch):
    """Every column through datasets.load_dataset and ray.data.read_parquet; images byte-identical."""
    import datasets
    import ray

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _, result = build_a
    ref = read_parquet_dir(result.out_dir / "dataset" / "data").to_pylist()
    hf = datasets.load_dataset(str(result.out_dir / "dataset"), split="train")
    assert tuple(hf.column_names) == S.DATASET_COLUMNS and isinstance(hf.features[S.TARGET_IMAGE], datasets.Image)
    raw = hf.cast_column(S.INPUT_IMAGE, datasets.Image(decode=False)).cast_column(
        S.TARGET_IMAGE, datasets.Image(decode=False))
    hf_rows = sorted(raw, key=lambda r: r[S.ID])
    rd_rows = sorted(ray.data.read_parquet(str(result.out_dir / "dataset" / "data")).take_all(), key=lambda r: r[S.ID])
    for a, b, c in zip(ref, hf_rows, rd_rows):
        for col in S.DATASET_COLUMNS:
            if col in (S.INPUT_IMAGE, S.TARGET_IMAGE):
                assert a[col]["bytes"] == b[col]["bytes"] == c[col]["bytes"]
            elif isinstance(a[col], float):
                assert a[col] == pytest.approx(b[col]) and a[col] == pytest.approx(c[col])
            else:
                assert a[col] == b[col] == c[col], col
    decoded = hf[0][S.TARGET_IMAGE]
    assert decoded.size == (64, 64) and decoded.mode == "RGB"
    card = (result.out_dir / "dataset" / "README.md").read_text()
    assert card.startswith("---\n") and "license: other" in card and "num_examples: 6" in card


def test_stored_scores_match_separate_scorers_on_stored_images(build_a, tiny_models):
    """The fused scoring stage feeds each score the right row's images and prompt."""
    from filtering.scorers import ClipIScorer, ClipTScorer, DinoScorer

    _, result = build_a
    rows = read_parquet_dir(result.out_dir / "dataset" / "data").to_pylist()
    batch = {S.SOURCE_PNG: np.array([r[S.INPUT_IMAGE]["bytes"] for r in rows], dtype=object),
             S.TARGET_PNG: np.array([r[S.TARGET_IMAGE]["bytes"] for r in rows], dtype=object),
             S.FILLED_PROMPT: np.array([r[S.FILLED_PROMPT] for r in rows], dtype=object)}
    for scorer, col, role in ((ClipTScorer, S.CLIP_T, "clip_filter"), (DinoScorer, S.DINO, "dino_filter"),
                              (ClipIScorer, S.CLIP_I, "clip_filter")):
        np.testing.assert_allclose([r[col] for r in rows], scorer(str(tiny_models / role))(batch)[col], atol=1e-5)


def test_manifest_counts_and_bytes(build_a, tiny_models):
    cfg, result = build_a
    m = json.loads((result.out_dir / "manifest.json").read_text())
    assert m["schema_version"] == S.SCHEMA_VERSION and m["dataset_hash"] == result.manifest["dataset_hash"]
    assert m["model_fingerprints"]["t2i"] == fingerprint(tiny_models / "t2i")
    assert m["status"] == "complete" and m["pending"] == 0 and result.pending == 0
    stages = {f["stage"]: f for f in m["funnel"]}
    assert list(stages) == ["sources", "generate", "score", "rules", "dialogue"]
    for f in m["funnel"]:
        assert f["in"] == f["out"] + sum(f["removed"].values()), f
    assert stages["sources"]["in"] == 3 and stages["generate"]["in"] == 6
    assert {k: m["counts"][k] for k in ("kept", "candidates", "quarantined")} == {"kept": 6, "candidates": 6,
                                                                                 "quarantined": 0}
    assert m["keys"] == stage_keys(cfg, m["model_fingerprints"])
    for name in ("report.md", "funnel.png", "clip_t_hist.png", "dino_hist.png", "samples.png"):
        assert (result.out_dir / "report" / name).stat().st_size > 0
    assert (result.out_dir / "_SUCCESS").exists()
    assert json.loads((result.out_dir / "_work" / "lease" / "0000000001.json").read_text())["released"]
    # candidates keep ids and scores, not a second copy of the images
    cand = read_parquet_dir(result.out_dir / "candidates" / "data")
    assert cand.num_rows == 6 and S.TARGET_IMAGE not in cand.column_names and S.TARGET_PNG not in cand.column_names


def test_same_config_same_hash_and_rerun_is_a_no_op(build_a, tmp_path):
    cfg, result = build_a
    second = run_build(cfg, out_dir=tmp_path / "b")
    assert second.manifest["dataset_hash"] == result.manifest["dataset_hash"]
    before = mtimes(result.out_dir, "_work/generate/*/*/*") | mtimes(result.out_dir, "dataset/data/*")
    again = run_build(cfg, out_dir=result.out_dir)  # everything committed: nothing is recomputed
    assert again.manifest["dataset_hash"] == result.manifest["dataset_hash"] and again.computed["chunks_run"] == 0
    assert mtimes(result.out_dir, "_work/generate/*/*/*") | mtimes(result.out_dir, "dataset/data/*") == before


def test_operational_changes_resume_without_recomputing(build_a, tiny_models):
    """Actor counts, GPUs, batch sizes, endpoint URL, timeouts, report settings: same keys, nothing redone."""
    cfg, result = build_a
    data = tiny_build_config(tiny_models, profusion={"batch_size": 1, "num_actors": 2},
                             scoring={"batch_size": 3, "num_actors": 2}, report_samples=1, lease_wait_s=5.0)
    data["build"]["dialogue"] = {"backend": "template", "openai": {"base_url": "http://127.0.0.1:9/v1",
                                                                  "timeout_s": 5.0, "max_concurrency": 64}}
    other = as_config(data)
    assert stage_keys(other, result.manifest["model_fingerprints"]) == result.manifest["keys"]
    again = run_build(other, out_dir=result.out_dir)
    assert again.computed["chunks_run"] == 0 and again.manifest["dataset_hash"] == result.manifest["dataset_hash"]


def test_rules_change_recomputes_rules_and_dialogue_only(build_a, tiny_models, tmp_path):
    cfg, result = build_a
    import shutil

    out = tmp_path / "rules"
    shutil.copytree(result.out_dir, out)
    cand = read_parquet_dir(out / "candidates" / "data")
    ct = float(np.median(cand[S.CLIP_T].to_numpy()))
    gen_before = mtimes(out, "_work/generate/*/*/*")
    score_before = mtimes(out, "_work/score/*/*")
    new = as_config(tiny_build_config(tiny_models, rules={"clip_t_min": ct, "dino_min": -1.0}))
    keys = stage_keys(new, result.manifest["model_fingerprints"])
    changed = {k for k in keys if keys[k] != result.manifest["keys"][k]}
    assert changed == {"rules", "dialogue"}
    res = run_build(new, out_dir=out)
    assert res.computed["chunks_run"] == 3
    # generation and scores untouched (not rewritten), rules + dialogue redone into new markers
    assert mtimes(out, "_work/generate/*/*/*") == gen_before and mtimes(out, "_work/score/*/*") == score_before
    assert len(list((out / "_work" / "sink" / keys["dialogue"]).glob("*.json"))) == 3
    kept = read_parquet_dir(out / "dataset" / "data")
    expected = {i for i, v in zip(cand[S.ID].to_pylist(), cand[S.CLIP_T].to_pylist()) if v >= np.float32(ct)}
    assert set(kept[S.ID].to_pylist()) == expected and 0 < len(expected) < 6


def test_other_sources_into_same_dir_are_refused(build_a, tiny_models):
    _, result = build_a
    other = as_config(tiny_build_config(tiny_models, sources={"classes": ["person", "cat", "bird"]}))
    with pytest.raises(BuildConflict, match="holds a build of other sources"):
        run_build(other, out_dir=result.out_dir)


def _start(tmp_path, data: dict, name: str, ray, out=None):
    """Start `cafe build` in its own session, connected to the module's Ray cluster; return (proc, out)."""
    out = out or tmp_path / name
    proc = start_build(write_yaml(tmp_path / f"{name}.yaml", data), out,
                       address=ray.get_runtime_context().gcs_address, log=tmp_path / f"{name}.log")
    return proc, out


def test_driver_killed_during_generation_resumes_exactly(build_a, tiny_models, tmp_path, ray_local):
    """With ``max_chunk_attempts: 1`` a chunk in flight when the driver dies would be quarantined as
    ``worker_crashed`` if the dead run's attempt counted (it did: 24 of 216 rows on the embedded default); it does
    not, and the resumed dataset equals the uninterrupted one."""
    _, reference = build_a
    data = tiny_build_config(tiny_models, lease_ttl_s=2.0, max_chunk_attempts=1)
    proc, out = _start(tmp_path, data, "killed", ray_local)
    wait_for(lambda: len(committed(out, "generate")) >= 1, 300, proc, "a committed generate chunk")
    kill_session(proc)
    assert len(committed(out, "sink")) < 3, "the build finished before it could be killed"
    gen_before = mtimes(out, "_work/generate/*/*/part-*")
    resumed = run_build(as_config(data), out_dir=out, lease_wait_s=10)  # the dead driver's lease expires
    assert resumed.manifest["dataset_hash"] == reference.manifest["dataset_hash"]
    assert resumed.manifest["counts"] == reference.manifest["counts"]
    after = mtimes(out, "_work/generate/*/*/part-*")
    assert {k: after[k] for k in gen_before} == gen_before  # no sample generated twice
    assert len(after) == 3


def test_worker_killed_during_generation_then_rerun(build_a, tiny_models, tmp_path, ray_local):
    _, reference = build_a
    data = tiny_build_config(tiny_models, lease_ttl_s=2.0)
    proc, out = _start(tmp_path, data, "worker-killed", ray_local)
    wait_for(lambda: len(committed(out, "generate")) >= 1 and find_actor_pids("GenerateStage"), 300, proc,
             "a running generate actor")
    for pid in find_actor_pids("GenerateStage"):
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=300)  # Ray restarts the actor (bounded) and finishes, or the driver fails: both fine
    finally:
        kill_session(proc) if proc.poll() is None else None
    resumed = run_build(as_config(data), out_dir=out, lease_wait_s=10)
    assert resumed.manifest["dataset_hash"] == reference.manifest["dataset_hash"]


def test_driver_killed_while_publishing_resumes_exactly(build_a, tiny_models, tmp_path, ray_local):
    _, reference = build_a
    data = tiny_build_config(tiny_models, lease_ttl_s=2.0)
    proc, out = _start(tmp_path, data, "killed-sink", ray_local)
    wait_for(lambda: len(committed(out, "sink")) >= 1, 300, proc, "a sunk chunk")
    kill_session(proc)
    sunk = committed(out, "sink")
    resumed = run_build(as_config(data), out_dir=out, lease_wait_s=10)
    assert resumed.manifest["dataset_hash"] == reference.manifest["dataset_hash"]
    assert resumed.computed["chunks_run"] == 3 - len(sunk)


def test_two_drivers_on_one_out(build_a, tiny_models, tmp_path, ray_local):
    """The second driver refuses clearly while the first is alive; nothing is lost or done twice."""
    from pipeline.store import OutputBusy

    _, reference = build_a
    data = tiny_build_config(tiny_models)
    proc, out = _start(tmp_path, data, "first", ray_local)
    wait_for(lambda: (out / "_work" / "lease").is_dir(), 300, proc, "the first driver's lease")
    with pytest.raises(OutputBusy, match="being built by another driver"):
        run_build(as_config(data), out_dir=out, lease_wait_s=0)
    assert proc.wait(timeout=600) == 0
    # the first driver's console: the project's progress lines and the funnel, no Ray Data dumps or deprecations
    console = (tmp_path / "first.log").read_text().splitlines()
    assert len(console) <= 60, "\n".join(console)
    assert any("build: 3/3 chunks (100%), 6 rows kept" in line for line in console), console
    for noise in ("Total Progress", "Starting execution of Dataset", "Deprecat", "Progress bars", "issue detector"):
        assert not any(noise in line for line in console), (noise, console)
    again = run_build(as_config(data), out_dir=out)
    assert again.computed["chunks_run"] == 0
    assert again.manifest["dataset_hash"] == reference.manifest["dataset_hash"]
    assert len(mtimes(out, "_work/generate/*/*/part-*")) == 3


def test_build_on_s3_equals_local_and_survives_a_kill(build_a, tiny_models, tmp_path, ray_local, s3_bucket):
    """Output only on s3:// (a real S3-compatible server on 127.0.0.1): same dataset hash; kill + resume."""
    import pyarrow.fs as pafs

    _, reference = build_a
    data = tiny_build_config(tiny_models, lease_ttl_s=2.0)
    out = f"{s3_bucket}/build"
    proc, _ = _start(tmp_path, data, "s3", ray_local, out=out)
    fs, root = pafs.FileSystem.from_uri(out)

    def n_gen():
        sel = pafs.FileSelector(f"{root}/_work/generate", recursive=True, allow_not_found=True)
        return sum(1 for i in fs.get_file_info(sel) if i.path.endswith("commit.json"))

    wait_for(lambda: n_gen() >= 1, 300, proc, "a committed generate chunk on s3")
    kill_session(proc)
    # resume as a fresh driver (the cluster's workers have the storage variables from their own environment)
    proc, _ = _start(tmp_path, {**data, "build": {**data["build"], "lease_wait_s": 10.0}}, "s3-resume", ray_local,
                     out=out)
    assert proc.wait(timeout=600) == 0, (tmp_path / "s3-resume.log").read_text()[-3000:]
    with fs.open_input_stream(f"{root}/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["dataset_hash"] == reference.manifest["dataset_hash"] and manifest["status"] == "complete"
    assert S3_SECRET not in json.dumps(manifest)
    assert _session_files_with(ray_local, S3_SECRET) == []  # nor in any file of Ray's session (runtime_env logs)
    assert fs.get_file_info(f"{root}/_SUCCESS").type == pafs.FileType.File
    import ray

    rows = ray.data.read_parquet(f"{out}/dataset/data").take_all()
    assert sorted(r[S.ID] for r in rows) == sorted(
        read_parquet_dir(reference.out_dir / "dataset" / "data")[S.ID].to_pylist())



def _s3_count(out: str, prefix: str, suffix: str) -> int:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(out)
    sel = pafs.FileSelector(f"{root}/{prefix}", recursive=True, allow_not_found=True)
    return sum(1 for i in fs.get_file_info(sel) if i.path.endswith(suffix))


def _s3_resume_equals(reference, data: dict, tmp_path, ray_local, out: str, name: str) -> dict:
    """Resume as a fresh `cafe build` process; return the manifest read back from s3 after checking the hash."""
    import pyarrow.fs as pafs

    proc, _ = _start(tmp_path, {**data, "build": {**data["build"], "lease_wait_s": 10.0}}, name, ray_local, out=out)
    assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    fs, root = pafs.FileSystem.from_uri(out)
    with fs.open_input_stream(f"{root}/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["dataset_hash"] == reference.manifest["dataset_hash"] and manifest["status"] == "complete"
    return manifest


@pytest.mark.parametrize("moment", ["worker-during-generation", "driver-during-publishing"])
def test_kills_on_s3_resume_exactly(build_a, tiny_models, tmp_path, ray_local, s3_bucket, moment):
    """The other kill moments on s3://: a generate worker, and the driver while chunks are being sunk."""
    _, reference = build_a
    data = tiny_build_config(tiny_models, lease_ttl_s=2.0)
    out = f"{s3_bucket}/{moment}"
    proc, _ = _start(tmp_path, data, moment, ray_local, out=out)
    if moment == "worker-during-generation":
        wait_for(lambda: _s3_count(out, "_work/generate", "commit.json") >= 1 and find_actor_pids("GenerateStage"),
                 300, proc, "a running generate actor")
        for pid in find_actor_pids("GenerateStage"):
            os.kill(pid, signal.SIGKILL)
        try:
            proc.wait(timeout=300)
        finally:
            kill_session(proc) if proc.poll() is None else None
    else:
        wait_for(lambda: _s3_count(out, "_work/sink", ".json") >= 1, 300, proc, "a sunk chunk on s3")
        kill_session(proc)
    _s3_resume_equals(reference, data, tmp_path, ray_local, out, f"{moment}-resume")
    assert _s3_count(out, "_work/generate", "commit.json") == 3
    assert _s3_count(out, "_work/generate", ".parquet") == 3  # one generation part per chunk: nothing twice

from tests.s3util import s3_bucket, s3_server  # noqa: E402,F401  (fixtures)


class _FakeLLM:
    """OpenAI-compatible chat endpoint on 127.0.0.1: deterministic; malformed for one phrase; can be 'down'.

    ``mode``: "ok" answers; "down" answers 503 with an error page that echoes the request headers (so the
    Authorization header would leak into stored details if it were not redacted).
    """

    CLASSES = ("person", "cat", "dog")
    PHRASES = ("on the beach", "in the snow", "wearing a red hat")

    def __init__(self, delay: float = 0.0, mode: str = "ok", hold: tuple[str, ...] = ()):
        import http.server
        import threading

        self.delay, self.mode, self.requests = delay, mode, []
        #: requests for these classes wait until ``release`` is set (a chunk that cannot finish before a kill)
        self.hold, self.release = set(hold), threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, payload: bytes, ctype: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                import time as _time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if fake.mode == "down":
                    echo = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
                    return self._send(503, f"<html>upstream down; your request:\n{echo}</html>".encode(), "text/html")
                text = " ".join(m["content"] for m in body["messages"] if m["role"] == "user")
                cls = next(c for c in fake.CLASSES if c in text)
                phrase = next(p for p in fake.PHRASES if p in text)
                if cls in fake.hold:
                    fake.release.wait(timeout=120)
                fake.requests.append((cls, phrase))
                _time.sleep(fake.delay)
                if phrase == "in the snow":
                    content = "{not json"
                else:
                    content = json.dumps({"user": f"Please show this {cls} {phrase}.",
                                          "assistant": f"Here is your {cls} {phrase}."})
                payload = {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(payload).encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.server.shutdown()


def _openai_data(tiny_models, url: str) -> dict:
    return tiny_build_config(tiny_models, lease_ttl_s=2.0, dialogue={
        "backend": "openai", "openai": {"base_url": url, "model": "fake", "max_concurrency": 4, "max_retries": 1,
                                        "backoff_s": 0.01, "timeout_s": 10, "api_key_env": "CAFE_TEST_LLM_KEY"}})


def test_endpoint_down_leaves_rows_pending_then_rerun_completes(build_a, tiny_models, tmp_path, ray_local,
                                                                monkeypatch):
    """5xx after retries: nothing quarantined, exit non-zero with the count; the next run retries exactly those.

    Both runs are `cafe build` processes connecting to the cluster (the key reaches workers from the nodes'
    environment, never the runtime env); the key's value must appear in nothing stored and in no log, Ray's
    session files included.
    """
    monkeypatch.setenv("CAFE_TEST_LLM_KEY", SENTINEL_KEY)
    llm = _FakeLLM(mode="down")
    try:
        data = _openai_data(tiny_models, llm.url)
        proc, out = _start(tmp_path, data, "down", ray_local)
        assert proc.wait(timeout=600) == 1, (tmp_path / "down.log").read_text()[-3000:]
        assert "6 record(s) pending" in (tmp_path / "down.log").read_text()
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "incomplete" and manifest["pending"] == 6
        assert manifest["counts"]["quarantined"] == 0 and not (out / "_SUCCESS").exists()
        assert len(committed(out, "generate")) == 3 and committed(out, "sink") == []
        gen_before = mtimes(out, "_work/generate/*/*/part-*")
        llm.mode = "ok"
        proc, _ = _start(tmp_path, data, "up", ray_local, out=out)
        assert proc.wait(timeout=600) == 0, (tmp_path / "up.log").read_text()[-3000:]
    finally:
        llm.close()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pending"] == 0 and manifest["status"] == "complete"
    assert mtimes(out, "_work/generate/*/*/part-*") == gen_before  # generation was not redone
    q = read_parquet_dir(out / "quarantine" / "data").to_pylist()
    snow = {r[S.ID] for r in read_parquet_dir(out / "candidates" / "data").to_pylist()
            if r[S.INSTRUCTION] == "in the snow"}
    assert {r[S.ID] for r in q} == snow and {r[S.Q_STAGE] for r in q} == {"dialogue"}
    kept = read_parquet_dir(out / "dataset" / "data").to_pylist()
    assert len(kept) == 4 and all(r[S.USER_TEXT] == f"Please show this {r[S.CLASS]} {r[S.INSTRUCTION]}."
                                  for r in kept)
    # the key never reaches anything stored or logged; its name is recorded
    stored = b"".join(p.read_bytes() for p in list(out.rglob("*")) + list(tmp_path.glob("*.log")) if p.is_file())
    assert SENTINEL_KEY.encode() not in stored
    assert _session_files_with(ray_local, SENTINEL_KEY) == []
    assert "CAFE_TEST_LLM_KEY" in json.dumps(manifest["config"])


def test_openai_dialogue_killed_during_dialogue_resumes_without_redoing_generation(
        build_a, tiny_models, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("CAFE_TEST_LLM_KEY", SENTINEL_KEY)
    llm = _FakeLLM(hold=("dog",))  # the dog's chunk cannot finish its dialogue before the kill
    try:
        data = _openai_data(tiny_models, llm.url)
        data["build"]["dialogue"]["openai"].update({"max_concurrency": 1, "timeout_s": 120})
        proc, out = _start(tmp_path, data, "dialogue-killed", ray_local)
        wait_for(lambda: len(committed(out, "sink")) >= 1, 300, proc, "a sunk chunk")
        kill_session(proc)
        sunk = committed(out, "sink")
        assert 1 <= len(sunk) < 3
        llm.hold.clear()
        llm.release.set()
        gen_before = mtimes(out, "_work/generate/*/*/part-*")
        n_before = len(llm.requests)
        data["build"]["lease_wait_s"] = 10.0
        proc, _ = _start(tmp_path, data, "dialogue-resume", ray_local, out=out)
        assert proc.wait(timeout=600) == 0, (tmp_path / "dialogue-resume.log").read_text()[-3000:]
    finally:
        llm.close()
    resumed = {"manifest": json.loads((out / "manifest.json").read_text())}
    import pyarrow.parquet as pq

    assert {k: v for k, v in mtimes(out, "_work/generate/*/*/part-*").items() if k in gen_before} == gen_before
    sunk_rows = {(r[S.CLASS], r[S.INSTRUCTION]) for c in sunk
                 for r in pq.read_table(out / "candidates" / "data" / f"{c}.parquet").to_pylist()}
    assert not sunk_rows & set(llm.requests[n_before:])  # sunk chunks were not asked again
    ref = {r[S.ID]: r[S.TARGET_IMAGE]["bytes"] for r in read_parquet_dir(
        build_a[1].out_dir / "dataset" / "data").to_pylist()}
    mine = read_parquet_dir(out / "dataset" / "data").to_pylist()
    assert all(ref[r[S.ID]] == r[S.TARGET_IMAGE]["bytes"] for r in mine)  # same generation as the template run
    fm = {f["stage"]: f for f in resumed["manifest"]["funnel"]}
    assert sum(fm["dialogue"]["removed"].values()) == 2 and fm["dialogue"]["out"] == 4
