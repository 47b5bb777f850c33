"""Build stages called in-process (no Ray): wiring, counts and the transformers dialogue backend."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import schema as S
from pipeline.build import make_plan
from pipeline.stages import DialogueStage, GenerateStage, ScoreStage, SourcesStage
from pipeline.store import ChunkStore, quarantine_table
from tests.buildutil import as_config, tiny_build_config


@pytest.fixture(scope="module")
def chain(tiny_models, tmp_path_factory):
    """sources → generate → three scores for one chunk, run in-process; returns (cfg, work, chunk_id)."""
    data = tiny_build_config(tiny_models, sources={"classes": ["cat"]}, profusion={"num_inference_steps": 2},
                             dialogue={"backend": "transformers", "transformers": {"max_new_tokens": 12}})
    cfg = as_config(data)
    work = tmp_path_factory.mktemp("work")
    plan = make_plan(cfg, {})
    (work / "plan.json").write_text(json.dumps(plan))
    (chunk_id,) = plan["chunks"]
    kw = {"config": cfg.model_dump(mode="json"), "work_dir": str(work)}
    for stage in (SourcesStage(**kw), GenerateStage(**kw), ScoreStage(**kw, score="clip_t"),
                  ScoreStage(**kw, score="dino"), ScoreStage(**kw, score="clip_i")):
        stage({"chunk_id": np.array([chunk_id])})
    return cfg, work, chunk_id, kw


def test_chain_commits_every_stage_with_scores(chain):
    cfg, work, cid, _ = chain
    store = ChunkStore(work)
    rows = store.rows("score_clip_i", cid)
    assert rows.num_rows == 2
    for col in (S.CLIP_T, S.DINO, S.CLIP_I, S.TARGET_PNG):
        assert rows[col].null_count == 0
    assert store.counts("generate", cid)["generate"]["in"] == 2


def test_committed_stage_is_skipped(chain):
    cfg, work, cid, kw = chain
    store = ChunkStore(work)
    before = (work / "generate" / cid / "rows.arrow").stat().st_ino
    stage = GenerateStage(**kw)
    assert not stage._ready  # every chunk committed: the models are never loaded
    stage({"chunk_id": np.array([cid])})
    assert not stage._ready
    assert (work / "generate" / cid / "rows.arrow").stat().st_ino == before
    assert store.done("generate", cid)


def test_transformers_dialogue_stage_keeps_or_quarantines_every_row(chain):
    cfg, work, cid, kw = chain
    DialogueStage(**kw)({"chunk_id": np.array([cid])})
    store = ChunkStore(work)
    rows = store.rows("dialogue", cid).to_pylist()
    quarantine = store.quarantine("dialogue", cid).to_pylist()
    counts = store.counts("dialogue", cid)
    ok = [r for r in rows if r[S.USER_TEXT] is not None]
    assert len(ok) + len(quarantine) == counts["rules"]["out"] == 2
    assert counts["dialogue"]["out"] == len(ok)
    assert sum(counts["dialogue"]["removed"].values()) == len(quarantine)
    assert all(q[S.Q_STAGE] == "dialogue" and q[S.Q_REASON] for q in quarantine)
    assert all(r[S.KEEP] for r in rows)


def test_quarantine_table_schema():
    t = quarantine_table([{S.Q_ID: "x", S.Q_STAGE: "sources", S.Q_REASON: "empty_file", S.Q_DETAIL: None,
                           S.Q_INPUT: "a/b.png"}])
    assert t.schema == S.arrow_schema("quarantine") and t.num_rows == 1
