"""A round-0 build on the synthetic world (the embedded default, on a subset of its sources): the oracle's
verdicts land in candidates/, the report's agreement table equals an independent computation, and the world
generator keeps the class and follows the instruction as measured by the oracle."""
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
    for cls_dir in sorted((WORLD / "sources").iterdir()):  # the first 3 instances of every class
        for p in sorted(cls_dir.glob("*.png"))[:3]:
            (src / cls_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, src / cls_dir.name / p.name)
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["models"]["root"] = str(WORLD)
    data["build"]["sources"]["path"] = str(src)
    data["build"]["scoring"]["oracle"] = str(WORLD / "oracle")
    data["build"]["instructions"]["per_source"] = 3
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
    assert n == 18 * 3
    assert all(v is not None for c in S.ORACLE_COLUMNS for v in cand[c])  # every phrase is a world phrase
    keep = np.array(cand[S.KEEP])
    good = np.array(cand[S.ORACLE_IDENTITY]) & np.array(cand[S.ORACLE_INSTRUCTION])
    tp = int((keep & good).sum())
    report = (out / "report" / "report.md").read_text()
    assert "## Oracle (synthetic world)" in report
    assert f"| rows judged | {n} (not judgeable: 0) |" in report
    assert f"| kept by the filter | {int(keep.sum())} |" in report
    if keep.sum():
        assert f"| precision of kept (good among kept) | {tp / keep.sum():.3f} |" in report
    # the published dataset does not carry the evaluation columns
    kept = pq.read_table(out / "dataset" / "data")
    assert not set(S.ORACLE_COLUMNS) & set(kept.column_names)


@pytest.mark.integration
@pytest.mark.slow
def test_world_generation_follows_background_and_position_instructions(world_build):
    """Measured by the oracle: ProFusion's sampler on "a {class} {phrase}" with the world t2i (S* branch off until
    PromptNet is trained) draws the asked-for background and position above chance (1/4, 1/3) — the t2i's strong
    attributes (measured when written: position 0.58 on 19 rows, below the t2i gate's 0.91 on full captions, since
    the build's prompt names one attribute). Class and style are its weak ones (docs/world.md): not asserted."""
    from training.world import domain as D

    out, _ = world_build
    cand = pq.read_table(out / "candidates" / "data").to_pydict()
    by_attr: dict[str, list[bool]] = {}
    for phrase, ok in zip(cand[S.INSTRUCTION], cand[S.ORACLE_INSTRUCTION]):
        by_attr.setdefault(D.phrase_attribute(phrase)[0], []).append(bool(ok))
    both = by_attr.get("background", []) + by_attr.get("position", [])
    assert len(both) >= 15  # enough rows to mean something
    assert np.mean(by_attr["background"]) >= 0.7, by_attr["background"]  # chance 1/4
    assert np.mean(both) >= 0.55, (np.mean(by_attr["background"]), np.mean(by_attr.get("position", [])))  # chance ≈ 0.29
