"""A round-0 build on the synthetic world (the embedded default, on a subset of its sources): the oracle's
verdicts land in candidates/, the report's agreement table equals an independent computation, and the world
generator (per-image fine-tuned ProFusion) keeps identity and follows the instruction, as measured by the oracle."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.build import run_build
from pipeline.config import load_config_dict
from training.data import schema as S

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "models" / "world"


@pytest.fixture(scope="module")
def world_build(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("world-build")
    src = tmp / "sources"
    for cls_dir in sorted((WORLD / "sources").iterdir()):  # the first 2 instances of every class
        for p in sorted(cls_dir.glob("*.png"))[:2]:
            (src / cls_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, src / cls_dir.name / p.name)
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["models"]["root"] = str(WORLD)
    data["build"]["sources"]["path"] = str(src)
    data["build"]["scoring"]["oracle"] = str(WORLD / "oracle")
    data["build"]["instructions"]["per_source"] = 3
    data["build"]["sources"]["exclude"] = []  # the first 2 instances of every class, whichever they are
    cfg = load_config_dict(data)
    out = tmp / "out"
    result = run_build(cfg, out_dir=out)
    return out, result


@pytest.mark.integration
@pytest.mark.slow
def test_oracle_verdicts_and_report_table(world_build):
    out, result = world_build
    assert not result.pending
    cand = pq.read_table(out / "candidates" / "data").to_pydict()
    n = len(cand[S.ID])
    assert n == 12 * 3
    assert all(v is not None for c in S.ORACLE_COLUMNS for v in cand[c])  # every phrase is a world phrase
    keep = np.array(cand[S.KEEP])
    good = np.array(cand[S.ORACLE_IDENTITY]) & np.array(cand[S.ORACLE_INSTRUCTION])
    tp = int((keep & good).sum())
    report = (out / "report" / "report.md").read_text()
    assert "## Oracle (synthetic world)" in report
    assert f"| rows judged | {n} (not judgeable: 0) |" in report
    assert f"| kept by the filter | {int(keep.sum())} |" in report
    assert "### Threshold sweep against the oracle" in report and "Rows nearest each applied threshold" in report
    card = (out / "dataset" / "README.md").read_text()
    assert "`absolute` rules: clip_t ≥ 0.2, dino ≥ 0.6" in card and "| `dino` | DINO similarity" in card
    if keep.sum():
        assert f"| precision of kept (good among kept) | {tp / keep.sum():.3f} |" in report
        assert result.manifest["oracle"]["precision"] == pytest.approx(tp / keep.sum())
        assert f"{tp / keep.sum():.1%} of the kept rows keep the source's identity" in card
    # the published dataset does not carry the evaluation columns
    kept = pq.read_table(out / "dataset" / "data")
    assert not set(S.ORACLE_COLUMNS) & set(kept.column_names)


@pytest.mark.integration
@pytest.mark.slow
def test_world_round0_keeps_identity_and_follows_instructions(world_build):
    """Measured by the oracle on the shipped ProFusion settings (per-image fine-tuning, S* fused with the reference
    prompt): the source's identity (class, colour and mark) is kept far above chance (about 1/18 for colour × mark
    when the class is right; 0.04 with the S* branch off) and the asked-for attribute is drawn above chance
    (1/4 to 1/2 by attribute). Measured when written: identity 0.59, instruction 0.84 on 768 rows
    (bench/RESULTS.md, issue 20); the bounds leave room for 36 rows' noise (s.e. ≈ 0.08)."""
    out, _ = world_build
    cand = pq.read_table(out / "candidates" / "data").to_pydict()
    identity = np.array(cand[S.ORACLE_IDENTITY], bool)
    instruction = np.array(cand[S.ORACLE_INSTRUCTION], bool)
    assert len(identity) == 36
    assert identity.mean() >= 0.35, identity.mean()
    assert instruction.mean() >= 0.65, instruction.mean()
