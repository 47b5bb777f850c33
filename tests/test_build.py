"""`cafe build` end to end on tiny models and a local Ray cluster: output, determinism, exactly-once under kills."""
from __future__ import annotations

import json
import os
import signal

import datasets
import numpy as np
import pytest

from pipeline import schema as S
from pipeline.build import BuildConflict, run_build
from pipeline.stages import choose_phrases, row_id, stable_int
from tests.buildutil import (as_config, committed, find_actor_pids, kill_session, start_build, tiny_build_config,
                             wait_for, write_yaml)
from training.models.kit import fingerprint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def build_a(tiny_models, tmp_path_factory, ray_local):
    """The uninterrupted reference build."""
    out = tmp_path_factory.mktemp("build-a")
    cfg = as_config(tiny_build_config(tiny_models))
    return cfg, run_build(cfg, out_dir=out)


def test_dataset_loads_with_expected_rows(build_a):
    cfg, result = build_a
    ds = datasets.load_from_disk(str(result.out_dir / "dataset"))
    assert tuple(ds.column_names) == S.DATASET_COLUMNS
    assert len(ds) == 6 and len(set(ds[S.ID])) == 6
    phrases = cfg.build.instructions.phrases
    expected_ids = set()
    for sid in set(ds[S.SOURCE_ID]):
        for phrase in choose_phrases(sid, phrases, 2, cfg.run.seed):
            expected_ids.add(row_id(0, sid, phrase))
    assert set(ds[S.ID]) == expected_ids
    row = ds[0]
    assert row[S.INPUT_IMAGE].size == (64, 64) and row[S.INPUT_IMAGE].mode == "RGB"
    assert row[S.TARGET_IMAGE].size == (64, 64)
    assert row[S.FILLED_PROMPT] == f"a {row[S.CLASS]} {row[S.INSTRUCTION]}"
    assert row[S.SEED] == stable_int("row", 0, row[S.ID])
    assert json.loads(row[S.GENERATOR_PARAMS])["s1"] == 7.0 and row[S.GENERATOR] == "profusion"
    assert row[S.CLASS] in row[S.USER_TEXT] and row[S.ASSISTANT_TEXT]
    assert all(-1.0 <= v <= 1.0 for v in list(ds[S.CLIP_T]) + list(ds[S.DINO]) + list(ds[S.CLIP_I]))


def test_stored_scores_match_scorers_on_stored_images(build_a, tiny_models):
    """The pipeline feeds each scorer the right row's images and prompt."""
    from filtering.scorers import ClipTScorer, DinoScorer

    _, result = build_a
    table = datasets.load_from_disk(str(result.out_dir / "candidates")).data.table
    work = result.out_dir / "_work" / "dialogue"
    import pyarrow as pa

    from pipeline.store import read_arrow

    rows = pa.concat_tables([read_arrow(d / "rows.arrow") for d in sorted(work.iterdir())]).sort_by(S.ID)
    batch = {c: np.array(rows[c].to_pylist(), dtype=object) for c in (S.SOURCE_PNG, S.TARGET_PNG, S.FILLED_PROMPT)}
    clip_t = ClipTScorer(str(tiny_models / "clip_filter"))(batch)[S.CLIP_T]
    dino = DinoScorer(str(tiny_models / "dino_filter"))(batch)[S.DINO]
    np.testing.assert_allclose(np.array(table.sort_by(S.ID)[S.CLIP_T].to_pylist()), clip_t, atol=1e-5)
    np.testing.assert_allclose(np.array(table.sort_by(S.ID)[S.DINO].to_pylist()), dino, atol=1e-5)


def test_manifest_and_counts_add_up(build_a, tiny_models):
    cfg, result = build_a
    m = json.loads((result.out_dir / "manifest.json").read_text())
    assert m["schema_version"] == S.SCHEMA_VERSION and m["dataset_hash"] == result.manifest["dataset_hash"]
    assert m["model_fingerprints"]["t2i"] == fingerprint(tiny_models / "t2i")
    assert set(m["model_fingerprints"]) == {"t2i", "promptnet", "clip_filter", "dino_filter"}
    assert m["code_version"] and m["config"]["build"]["rules"]["clip_t_min"] == -1.0
    stages = {f["stage"]: f for f in m["funnel"]}
    assert list(stages) == ["sources", "generate", "score_clip_t", "score_dino", "score_clip_i", "rules", "dialogue"]
    for f in m["funnel"]:
        assert f["in"] == f["out"] + sum(f["removed"].values()), f
    assert stages["sources"]["in"] == 3 and stages["generate"]["in"] == 2 * stages["sources"]["out"]
    assert m["counts"] == {"kept": 6, "candidates": 6, "quarantined": 0}
    for name in ("report.md", "funnel.png", "clip_t_hist.png", "dino_hist.png", "samples.png"):
        assert (result.out_dir / "report" / name).stat().st_size > 0
    assert (result.out_dir / "_SUCCESS").exists()
    assert len(datasets.load_from_disk(str(result.out_dir / "quarantine"))) == 0


def test_same_config_same_hash_and_rerun_is_a_no_op(build_a, tmp_path):
    cfg, result = build_a
    second = run_build(cfg, out_dir=tmp_path / "b")
    assert second.manifest["dataset_hash"] == result.manifest["dataset_hash"]
    gen_dir = result.out_dir / "_work" / "generate"
    inodes = {p.name: p.stat().st_ino for p in gen_dir.iterdir()}
    again = run_build(cfg, out_dir=result.out_dir)  # everything committed: nothing is recomputed
    assert again.manifest["dataset_hash"] == result.manifest["dataset_hash"]
    assert {p.name: p.stat().st_ino for p in gen_dir.iterdir()} == inodes


def test_other_config_into_same_dir_is_refused(build_a, tiny_models):
    _, result = build_a
    other = as_config(tiny_build_config(tiny_models, profusion={"s1": 3.0}))
    with pytest.raises(BuildConflict, match="holds a build of another config"):
        run_build(other, out_dir=result.out_dir)


def _start(tmp_path, data: dict, name: str, ray):
    """Start `cafe build` in its own session, connected to the module's Ray cluster; return (proc, out)."""
    out = tmp_path / name
    proc = start_build(write_yaml(tmp_path / "c.yaml", data), out, address=ray.get_runtime_context().gcs_address,
                       log=tmp_path / "build.log")
    return proc, out


def test_driver_killed_during_generation_resumes_exactly(build_a, tiny_models, tmp_path, ray_local):
    _, reference = build_a
    data = tiny_build_config(tiny_models)
    proc, out = _start(tmp_path, data, "killed", ray_local)
    wait_for(lambda: len(committed(out, "generate")) >= 1, 300, proc, "a committed generate chunk")
    kill_session(proc)
    assert len(committed(out, "dialogue")) < 3, "the build finished before it could be killed"
    resumed = run_build(as_config(data), out_dir=out)
    assert resumed.manifest["dataset_hash"] == reference.manifest["dataset_hash"]
    assert resumed.manifest["counts"] == reference.manifest["counts"]


def test_worker_killed_during_generation_then_rerun(build_a, tiny_models, tmp_path, ray_local):
    _, reference = build_a
    data = tiny_build_config(tiny_models)
    proc, out = _start(tmp_path, data, "worker-killed", ray_local)
    wait_for(lambda: len(committed(out, "generate")) >= 1 and find_actor_pids("GenerateStage"), 300, proc,
             "a running generate actor")
    for pid in find_actor_pids("GenerateStage"):
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=300)  # Ray may restart the actor and finish, or the driver fails: both are fine
    finally:
        kill_session(proc) if proc.poll() is None else None
    resumed = run_build(as_config(data), out_dir=out)
    assert resumed.manifest["dataset_hash"] == reference.manifest["dataset_hash"]


class _FakeLLM:
    """OpenAI-compatible chat endpoint on 127.0.0.1: slow, deterministic, malformed for one phrase."""

    CLASSES = ("person", "cat", "dog")
    PHRASES = ("on the beach", "in the snow", "wearing a red hat")

    def __init__(self, delay: float = 0.3):
        import http.server
        import threading

        self.delay, self.requests = delay, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                import time as _time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = " ".join(m["content"] for m in body["messages"] if m["role"] == "user")
                cls = next(c for c in fake.CLASSES if c in text)
                phrase = next(p for p in fake.PHRASES if p in text)
                fake.requests.append((cls, phrase))
                _time.sleep(fake.delay)
                if phrase == "in the snow":
                    payload = b"{not json"
                else:
                    content = json.dumps({"user": f"Please show this {cls} {phrase}.",
                                          "assistant": f"Here is your {cls} {phrase}."})
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()


def test_openai_dialogue_killed_during_dialogue_resumes_without_redoing_generation(
        build_a, tiny_models, tmp_path, ray_local):
    _, reference = build_a
    llm = _FakeLLM()
    try:
        data = tiny_build_config(tiny_models, dialogue={
            "backend": "openai", "openai": {"base_url": llm.url, "model": "fake", "max_concurrency": 1,
                                            "max_retries": 1, "backoff_s": 0.01, "timeout_s": 10}})
        proc, out = _start(tmp_path, data, "dialogue-killed", ray_local)
        wait_for(lambda: len(committed(out, "dialogue")) >= 1, 300, proc, "a committed dialogue chunk")
        kill_session(proc)
        done_dialogue = committed(out, "dialogue")
        assert len(done_dialogue) < 3, "the build finished before it could be killed"
        gen_dir = out / "_work" / "generate"
        gen_inodes = {p.name: p.stat().st_ino for p in gen_dir.iterdir() if (p / "counts.json").exists()}
        requests_before = len(llm.requests)
        resumed = run_build(as_config(data), out_dir=out)
    finally:
        llm.close()
    # finished work was not redone: committed generate chunks kept, committed dialogue chunks not re-requested
    assert {n: (gen_dir / n).stat().st_ino for n in gen_inodes} == gen_inodes
    ds = datasets.load_from_disk(str(out / "dataset"))
    cand = datasets.load_from_disk(str(out / "candidates"))
    quarantine = datasets.load_from_disk(str(out / "quarantine"))
    assert len(set(cand[S.ID])) == len(cand) == 6
    assert sorted(list(ds[S.ID]) + list(quarantine[S.Q_ID])) == sorted(cand[S.ID])
    assert set(quarantine[S.Q_REASON]) <= {"malformed_response"} and set(quarantine[S.Q_STAGE]) <= {"dialogue"}
    snow = {r[S.ID] for r in cand if r[S.INSTRUCTION] == "in the snow"}
    assert set(quarantine[S.Q_ID]) == snow
    for r in ds:
        assert r[S.USER_TEXT] == f"Please show this {r[S.CLASS]} {r[S.INSTRUCTION]}."
    # generation is the same as the template run's: same ids, same target bytes
    ref = datasets.load_from_disk(str(reference.out_dir / "candidates")).cast_column(
        S.TARGET_IMAGE, datasets.Image(decode=False))
    ref_bytes = {r[S.ID]: r[S.TARGET_IMAGE]["bytes"] for r in ref}
    mine = cand.cast_column(S.TARGET_IMAGE, datasets.Image(decode=False))
    assert {r[S.ID]: r[S.TARGET_IMAGE]["bytes"] for r in mine} == ref_bytes
    # rows in chunks committed before the kill were asked exactly once (no repeat after the resume)
    committed_rows = set()
    from pipeline.store import ChunkStore

    store = ChunkStore(out / "_work")
    for cid in done_dialogue:
        committed_rows |= {(r[S.CLASS], r[S.INSTRUCTION]) for r in store.rows("dialogue", cid).to_pylist()}
    later = llm.requests[requests_before:]
    assert not committed_rows & set(later)
    fm = {f["stage"]: f for f in resumed.manifest["funnel"]}
    assert fm["dialogue"]["removed"] == {"malformed_response": len(snow)}


def test_refilter_reapplies_rules_without_recomputing(build_a, tmp_path):
    from pipeline.cli import EXIT_OK, main
    from pipeline.refilter import refilter

    _, result = build_a
    cand = datasets.load_from_disk(str(result.out_dir / "candidates"))
    clip_t, dino = np.array(cand[S.CLIP_T]), np.array(cand[S.DINO])
    ct, dn = float(np.median(clip_t)), float(np.median(dino))
    out = refilter(result.out_dir, [f"build.rules.clip_t_min={ct}", f"build.rules.dino_min={dn}"], tmp_path / "rf")
    kept = datasets.load_from_disk(str(tmp_path / "rf" / "dataset"))
    expected = {i for i, a, b in zip(cand[S.ID], clip_t, dino) if a >= np.float32(ct) and b >= np.float32(dn)}
    assert set(kept[S.ID]) == expected and 0 < len(expected) < len(cand)
    assert out.manifest["counts"]["pending_dialogue"] == 0
    rules = {f["stage"]: f for f in out.manifest["funnel"]}["rules"]
    assert rules["in"] == len(cand) and rules["out"] == len(expected)
    # images are carried over byte for byte, not regenerated
    a = kept.cast_column(S.TARGET_IMAGE, datasets.Image(decode=False))
    b = cand.cast_column(S.TARGET_IMAGE, datasets.Image(decode=False))
    by_id = {r[S.ID]: r[S.TARGET_IMAGE]["bytes"] for r in b}
    assert all(by_id[r[S.ID]] == r[S.TARGET_IMAGE]["bytes"] for r in a)
    # a stricter-then-looser chain: rows that never got dialogue are reported, not invented
    refilter(tmp_path / "rf", ["build.rules.clip_t_min=-1.0", "build.rules.dino_min=-1.0"], tmp_path / "rf2")
    assert (tmp_path / "rf2" / "report" / "report.md").exists()
    assert main(["report", str(tmp_path / "rf")]) == EXIT_OK


def test_refilter_rejects_bad_override_before_work(build_a, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.refilter import refilter

    _, result = build_a
    with pytest.raises(ConfigError, match="build.rules.clip_t_min = 5"):
        refilter(result.out_dir, ["build.rules.clip_t_min=5"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
