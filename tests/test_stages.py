"""Build stages called in-process (no Ray): rows in blocks, generation ledger, transient vs input failures."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from pipeline.build import stage_keys, write_plan
from pipeline.stages import (NEW, DialogueStage, GenerateStage, GenerationLedger, ScoreStage, SourcesStage,
                             sink_batch)
from pipeline.store import Storage
from tests.buildutil import as_config, tiny_build_config
from training.data import schema as S


def _setup(tiny_models, tmp_path, **overrides):
    data = tiny_build_config(tiny_models, sources={"classes": ["cat", "dog"]}, profusion={"num_inference_steps": 2},
                             rows_per_chunk=4, **overrides)
    cfg = as_config(data)
    keys = stage_keys(cfg, {})
    out = Storage(tmp_path / "out", owner="test")
    (chunk,) = write_plan(cfg, out, keys["plan"], [])
    kw = {"config": cfg.model_dump(mode="json"), "out": out.uri, "keys": keys, "owner": "test"}
    return cfg, out, keys, chunk, kw


def _sources(kw, chunk):
    return SourcesStage(**kw)(pa.table({"chunk": [chunk]}))


def test_chain_in_process_commits_a_chunk(tiny_models, tmp_path):
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    block = _sources(kw, chunk)
    assert block.num_rows == 4 and set(block[S.STATUS].to_pylist()) == {S.STATUS_ROW}
    assert all(block[NEW].to_pylist()) and set(block[S.CHUNK].to_pylist()) == {chunk}
    block = GenerateStage(**kw)(block)
    info = GenerationLedger(out, keys["generate"], chunk).commit_info()
    assert len(info["parts"]) == 1 and info["pending_sources"] == []
    assert block[S.TARGET_PNG].null_count == 0 and not any(block[NEW].to_pylist())
    block = DialogueStage(**kw)(ScoreStage(**kw)(block))
    assert out.is_file(f"_work/score/{keys['score']}/{chunk}.parquet")
    summary = sink_batch(block, **kw).to_pylist()
    marker = out.read_json(f"_work/sink/{keys['dialogue']}/{chunk}.json")
    # the stored marker streams back to the driver in the summary (it folds the funnel without reading markers)
    assert summary == [{"chunk": chunk, "committed": True, "pending": 0, "kept": 4, "reasons": "[]",
                        "marker": json.dumps(marker, sort_keys=True)}]
    assert marker["funnel"]["generate"] == {"stage": "generate", "unit": "rows", "in": 4, "out": 4, "removed": {}}
    # a second pass reads the committed generation instead of decoding or generating again
    again = SourcesStage(**kw)
    block2 = again(pa.table({"chunk": [chunk]}))
    assert not again._ready and not any(block2[NEW].to_pylist())
    gen = GenerateStage(**kw)
    assert gen(block2)[S.TARGET_PNG].to_pylist() == block[S.TARGET_PNG].to_pylist() and not gen._ready


class _FlakyGenerator:
    """Wraps the real generator: raises ``exc`` when a batch holds one of the row seeds in ``fail``."""

    def __init__(self, real, fail: set[str], exc: Exception):
        self.real, self.fail, self.exc, self.calls = real, fail, exc, []

    def finetuned(self, source, seed):
        return self.real.finetuned(source, seed)

    def sample(self, sources, sstar, ref, seeds):
        self.calls.append(tuple(seeds))
        if any(s in self.fail for s in seeds):
            raise self.exc
        return self.real.sample(sources, sstar, ref, seeds)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 RuntimeError("CUDA error: an illegal memory access was encountered")])
def test_transient_generation_failure_stays_pending_then_retries_exactly_that_source(tiny_models, tmp_path, exc):
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    block = _sources(kw, chunk)
    rows = block.to_pylist()
    dog_prompts = {r[S.SEED] for r in rows if r[S.CLASS] == "dog"}
    stage = GenerateStage(**kw)
    stage._setup_once()
    stage.generator = _FlakyGenerator(stage.generator, dog_prompts, exc)
    result = stage(block)
    status = {r[S.ID]: r[S.STATUS] for r in result.to_pylist()}
    dog_ids = {r[S.ID] for r in rows if r[S.CLASS] == "dog"}
    assert {i for i, s in status.items() if s == S.STATUS_PENDING} == dog_ids
    assert len(stage.generator.calls) == 1 + 2  # cat once; dog tried twice (one in-process retry)
    info = GenerationLedger(out, keys["generate"], chunk).commit_info()
    assert len(info["pending_sources"]) == 1 and len(info["parts"]) == 1
    assert sink_batch(result, **kw).to_pylist()[0]["committed"] is False  # pending chunk: not published
    # the next run decodes and generates only the pending source; the cat's samples are reused as stored
    block2 = _sources(kw, chunk)
    assert sum(block2[NEW].to_pylist()) == 2
    stage2 = GenerateStage(**kw)
    result2 = stage2(block2)
    assert set(result2[S.STATUS].to_pylist()) == {S.STATUS_ROW}
    info = GenerationLedger(out, keys["generate"], chunk).commit_info()
    assert len(info["parts"]) == 2 and info["pending_sources"] == []
    cat_before = {r[S.ID]: r[S.TARGET_PNG] for r in result.to_pylist() if r[S.STATUS] == S.STATUS_ROW}
    assert {r[S.ID]: r[S.TARGET_PNG] for r in result2.to_pylist() if r[S.ID] in cat_before} == cat_before


def test_input_caused_generation_failure_is_quarantined(tiny_models, tmp_path):
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    block = _sources(kw, chunk)
    stage = GenerateStage(**kw)
    stage._setup_once()
    prompts = {r[S.SEED] for r in block.to_pylist() if r[S.CLASS] == "dog"}
    stage.generator = _FlakyGenerator(stage.generator, prompts, ValueError("latent 9x9 gives 4 S* tokens"))
    result = stage(block).to_pylist()
    q = [r for r in result if r[S.STATUS] == S.STATUS_QUARANTINED]
    assert len(q) == 2 and {r["q_reason"] for r in q} == {"generation_failed"}
    assert all("ValueError: latent 9x9" in r["q_detail"] for r in q)
    assert GenerationLedger(out, keys["generate"], chunk).commit_info()["pending_sources"] == []


def test_chunk_that_keeps_killing_its_worker_is_quarantined(tiny_models, tmp_path):
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    ledger = GenerationLedger(out, keys["generate"], chunk)
    for _ in range(cfg.build.max_chunk_attempts):  # earlier attempts of this run that died mid-chunk
        ledger.attempt(kw["owner"])
    stage = GenerateStage(**kw)
    result = stage(_sources(kw, chunk)).to_pylist()
    assert not stage._ready  # gave up without loading the models
    assert {(r[S.STATUS], r["q_reason"]) for r in result} == {(S.STATUS_QUARANTINED, "worker_crashed")}
    summary = sink_batch(pa.Table.from_pylist(result, schema=stage(_sources(kw, chunk)).schema), **kw).to_pylist()
    assert summary[0]["committed"] and summary[0]["kept"] == 0
    q = out.read_parquet(f"quarantine/data/{chunk}.parquet").to_pylist()
    assert len(q) == 4 and {r[S.Q_REASON] for r in q} == {"worker_crashed"}


def test_attempts_cut_short_by_infrastructure_do_not_count(tiny_models, tmp_path):
    """Attempts of another run (its driver or job died) and attempts on a node that is gone say nothing about the
    chunk: only this run's attempts on nodes still alive count toward ``worker_crashed``."""
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    ledger = GenerationLedger(out, keys["generate"], chunk)
    n = cfg.build.max_chunk_attempts
    for i in range(3 * n):
        ledger.attempt(f"dead-driver-{i % 3}", node="n1", alive={"n1"})  # three earlier runs, each killed
    for _ in range(n):
        ledger.attempt(kw["owner"], node="lost-node", alive={"n1", "lost-node"})  # this run, on a node since lost
    assert ledger.attempt(kw["owner"], node="n1", alive={"n1"}) == 0
    assert ledger.attempt(kw["owner"], node="n1", alive={"n1"}) == 1  # the previous attempt of this run counts
    assert ledger.attempt(kw["owner"]) == n + 2  # without node facts, every attempt of this run counts
    # through the stage: the earlier runs' attempts are all there, yet the chunk is generated, not quarantined
    out2, keys2 = Storage(tmp_path / "out2", owner="test"), keys
    (chunk2,) = write_plan(cfg, out2, keys2["plan"], [])
    kw2 = {**kw, "out": out2.uri}
    other_runs = GenerationLedger(out2, keys2["generate"], chunk2)
    for i in range(3 * n):
        other_runs.attempt(f"dead-driver-{i}")
    result = GenerateStage(**kw2)(_sources(kw2, chunk2)).to_pylist()
    assert {r[S.STATUS] for r in result} == {S.STATUS_ROW}


def test_sink_refuses_a_chunk_missing_sources(tiny_models, tmp_path):
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    block = _sources(kw, chunk)
    half = block.filter(pa.compute.equal(block[S.CLASS], "cat"))
    with pytest.raises(RuntimeError, match="have no record"):
        sink_batch(half, **kw)


def test_retried_generate_task_after_its_commit_does_not_generate_again(tiny_models, tmp_path):
    """An actor killed after committing but before returning: Ray retries the same input block."""
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    block = _sources(kw, chunk)
    first = GenerateStage(**kw)(block)
    retry = GenerateStage(**kw)
    again = retry(block)  # the very same block, records still marked new
    assert not retry._ready  # nothing to generate: the models were never loaded
    info = GenerationLedger(out, keys["generate"], chunk).commit_info()
    assert len(info["parts"]) == 1
    key = lambda t: sorted((r[S.ID], r[S.TARGET_PNG]) for r in t.to_pylist())  # noqa: E731
    assert key(again) == key(first)


def test_workers_of_a_superseded_driver_do_not_commit(tiny_models, tmp_path):
    """A generation actor and a sink of lease epoch 1 refuse their commit markers once a successor driver holds
    epoch 2 (a zombie worker must not commit beside the successor's); epoch 2's workers commit."""
    import time

    from pipeline.store import Lease, OutputBusy

    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    block = _sources(kw, chunk)
    for epoch in (1, 2):
        out.write_json(Lease._key(epoch), {"owner": f"driver{epoch}", "host": "h", "pid": 1, "heartbeat": time.time()})
    with pytest.raises(OutputBusy, match="epoch 1 does not commit"):
        GenerateStage(**kw, epoch=1)(block)
    assert GenerationLedger(out, keys["generate"], chunk).commit_info() is None
    generated = GenerateStage(**kw, epoch=2)(block)
    scored = DialogueStage(**kw)(ScoreStage(**kw)(generated))
    with pytest.raises(OutputBusy):
        sink_batch(scored, **kw, epoch=1)
    assert not out.exists(f"_work/sink/{keys['dialogue']}/{chunk}.json")
    assert sink_batch(scored, **kw, epoch=2).to_pylist()[0]["committed"]


def test_an_actor_whose_model_copy_differs_from_the_drivers_refuses_to_load_it(tiny_models, tmp_path):
    """Each stage checks the fingerprints of the models it loads against the driver's (what the stage keys hold)
    before loading: the same copy passes; another copy fails with the node, role, path and both fingerprints."""
    from pipeline.models import ModelMismatch
    from training.models.fingerprint import fingerprint

    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    fps = {r: fingerprint(cfg.models.role_dir(r)) for r in ("t2i", "promptnet", "clip_filter", "dino_filter")}
    for stage in (GenerateStage, ScoreStage):
        stage(**kw, fingerprints=fps).check_models()  # the driver's copy: passes
    with pytest.raises(ModelMismatch, match=r"generate on .*: promptnet at .* has fingerprint [0-9a-f]{16}, "
                                            r"the driver's is 0{16}"):
        GenerateStage(**kw, fingerprints={**fps, "promptnet": "0" * 16})._setup_once()
    with pytest.raises(ModelMismatch, match="dino_filter"):
        ScoreStage(**kw, fingerprints={**fps, "dino_filter": "f" * 16})._setup_once()
    assert set(GenerateStage(**kw).model_dirs()) == {"t2i", "promptnet"}


def test_the_plan_is_few_objects_with_a_row_group_per_chunk_and_old_plans_still_read(tiny_models, tmp_path,
                                                                                      monkeypatch):
    """``write_plan`` streams parts of ``PLAN_PART_CHUNKS`` row groups (row group = chunk); ``plan_sources`` reads
    one row group of one part; a plan in the earlier layout (one ``<chunk>.parquet`` per chunk) reads the same."""
    import pyarrow.parquet as pq

    import pipeline.build
    import pipeline.stages
    from pipeline.stages import plan_sources, plan_table

    monkeypatch.setattr(pipeline.stages, "PLAN_PART_CHUNKS", 2)  # 5 chunks: parts of 2, 2 and 1
    monkeypatch.setattr(pipeline.build, "PLAN_PART_CHUNKS", 2)
    data = tiny_build_config(tiny_models, sources={"classes": ["cat", "dog"], "num_per_class": 5}, rows_per_chunk=4)
    cfg = as_config(data)
    keys = stage_keys(cfg, {})
    out = Storage(tmp_path / "out", owner="test")
    chunks = write_plan(cfg, out, keys["plan"], [])
    assert chunks == [f"{i:06d}" for i in range(len(chunks))] and len(chunks) == 5  # 10 sources, 2 per chunk
    parts = ["plan-00000.parquet", "plan-00001.parquet", "plan-00002.parquet"]
    assert sorted(out.list(f"_work/plan/{keys['plan']}")) == ["_PLAN.json", *parts]
    groups = [pq.ParquetFile(str(tmp_path / "out" / "_work" / "plan" / keys["plan"] / p)).metadata.num_row_groups
              for p in parts]
    assert groups == [2, 2, 1]
    got = {c: plan_sources(out, keys["plan"], c) for c in chunks}
    assert [len(v) for v in got.values()] == [2] * 5 and len({s["source_id"] for v in got.values() for s in v}) == 10
    assert [json.loads(s) for s in plan_table(out, keys["plan"])["source"].to_pylist()] == \
        [s for c in chunks for s in got[c]]
    old = Storage(tmp_path / "old", owner="test")  # the earlier layout, written by hand from the same sources
    for c, sources in got.items():
        old.write_parquet(f"_work/plan/{keys['plan']}/{c}.parquet",
                          pa.table({"source": [json.dumps(s, sort_keys=True) for s in sources]}))
    assert {c: plan_sources(old, keys["plan"], c) for c in chunks} == got


def test_generation_commits_are_idempotent_and_never_duplicate_a_row(tiny_models, tmp_path):
    """A commit of the same sources again (a retry, or a zombie actor beside its successor) writes the same part
    and adds none; parts that overlap (an earlier layout's leftovers) read each row id once."""
    cfg, out, keys, chunk, kw = _setup(tiny_models, tmp_path)
    generated = GenerateStage(**kw)(_sources(kw, chunk))
    ledger = GenerationLedger(out, keys["generate"], chunk)
    info = ledger.commit_info()
    rows = ledger.records()
    assert len(info["parts"]) == 1 and len({r[S.ID] for r in rows}) == len(rows) == 4
    ledger.commit(rows, [])  # the same sources committed a second time
    assert ledger.commit_info()["parts"] == info["parts"] and ledger.records() == rows
    out.write_parquet(f"{ledger.dir}/part-000.parquet", out.read_parquet(f"{ledger.dir}/{info['parts'][0]}"))
    out.write_json(f"{ledger.dir}/commit.json", {**info, "parts": ["part-000.parquet", *info["parts"]]})
    assert [r[S.ID] for r in ledger.records()] == [r[S.ID] for r in rows]  # overlapping parts: each id once
    assert generated.num_rows == 4
