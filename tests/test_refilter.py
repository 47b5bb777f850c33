"""Tests of ``cafe refilter`` (``pipeline.refilter``) on a small build output written the way the sink writes it.

The source output (3 chunks × 5 rows) is built without Ray: per chunk, the build-time rule decides, the kept rows
become a dataset shard (``pipeline.stages.dataset_table``), every row a candidates shard, and the quarantine shard
holds one source that failed and one row whose dialogue was rejected (kept by the rules, absent from the dataset).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.build import stage_keys, write_dataset_card
from pipeline.refilter import refilter
from pipeline.report import funnel_warnings
from pipeline.stages import dataset_table
from pipeline.store import Storage, table_hash
from tests.buildutil import as_config, tiny_build_config
from training.data import schema as S
from training.data.ids import stable_hash

BUILD_RULES = {"clip_t_min": 0.3, "dino_min": 0.5}
CHUNKS = ("000000", "000001", "000002")
ROWS_PER_CHUNK = 5


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(rng: np.random.Generator, chunk: str) -> list[dict]:
    rows = []
    for k in range(ROWS_PER_CHUNK):
        rid = stable_hash("row", chunk, k)
        rows.append({
            S.ID: rid, S.ROUND: 0, S.SOURCE_ID: f"src-{chunk}-{k // 2}", S.SOURCE_URI: f"/data/{chunk}/{k}.png",
            S.CLASS: "dog", S.INSTRUCTION: f"phrase {k}", S.FILLED_PROMPT: f"a dog phrase {k}", S.SEED: k,
            S.SOURCE_PNG: _png(rng), S.TARGET_PNG: _png(rng), S.GENERATOR: "profusion", S.GENERATOR_PARAMS: "{}",
            S.CLIP_T: float(np.float32(rng.uniform(0.0, 0.6))), S.DINO: float(np.float32(rng.uniform(0.2, 0.9))),
            S.CLIP_I: 0.5, S.USER_TEXT: f"Put the dog {k} somewhere.", S.ASSISTANT_TEXT: f"Here it is ({rid[:6]}).",
            S.DIALOGUE_STYLE: "clear",
        })
    return rows


def make_src(root: Path) -> Path:
    """A complete ``cafe build`` output (see the module docstring); returns its directory."""
    from filtering.rules import apply_rules

    cfg = as_config(tiny_build_config(root / "models", rules=BUILD_RULES))
    src = root / "src"
    store = Storage(src)
    rng = np.random.default_rng(0)
    h = hashlib.sha256()
    counts = {"kept": 0, "candidates": 0, "quarantined": 0, "dataset_bytes": 0}
    rules_removed: dict[str, int] = {}
    n_pass = 0
    rejected_done = False
    for chunk in CHUNKS:
        rows = sorted(_rows(rng, chunk), key=lambda r: r[S.ID])
        if chunk == CHUNKS[1]:
            rows[0][S.CLIP_T] = float("nan")  # a score that failed
        decision = apply_rules({S.CLIP_T: np.array([r[S.CLIP_T] for r in rows], np.float32),
                                S.DINO: np.array([r[S.DINO] for r in rows], np.float32)}, cfg.build.rules)
        quarantine = [] if chunk != CHUNKS[0] else [
            {S.Q_ID: "src-bad", S.Q_STAGE: "sources", S.Q_REASON: "not_an_image", S.Q_DETAIL: "x", S.Q_INPUT: "/x"}]
        kept = []
        for r, keep, reason in zip(rows, decision.keep, decision.reason):
            r[S.KEEP], r[S.FILTER_REASON] = bool(keep), reason
            if keep and not rejected_done:  # the dialogue of the first kept row is rejected
                rejected_done = True
                r[S.USER_TEXT] = r[S.ASSISTANT_TEXT] = None
                quarantine.append({S.Q_ID: r[S.ID], S.Q_STAGE: "dialogue", S.Q_REASON: "unparseable",
                                   S.Q_DETAIL: "no JSON", S.Q_INPUT: r[S.SOURCE_URI]})
            elif keep:
                kept.append(r)
            else:
                rules_removed[reason] = rules_removed.get(reason, 0) + 1
        n_pass += int(decision.keep.sum())
        data = dataset_table(kept)
        cand_schema = S.arrow_schema("candidates")
        counts["dataset_bytes"] += store.write_parquet(f"dataset/data/train-{chunk}.parquet", data)
        store.write_parquet(f"candidates/data/{chunk}.parquet", pa.Table.from_pylist(
            [{c: r.get(c) for c in cand_schema.names} for r in rows], schema=cand_schema))
        store.write_parquet(f"quarantine/data/{chunk}.parquet",
                            pa.Table.from_pylist(quarantine, schema=S.arrow_schema("quarantine")))
        h.update(f"{chunk}:{table_hash(data)}\n".encode())
        counts["kept"] += len(kept)
        counts["candidates"] += len(rows)
        counts["quarantined"] += len(quarantine)
    n = counts["candidates"]
    manifest = {
        "schema_version": S.SCHEMA_VERSION, "created": "2025-01-01T00:00:00Z", "status": "complete",
        "config_path": "configs/tiny.yaml", "config": cfg.model_dump(mode="json"), "keys": stage_keys(cfg, {}),
        "config_hash": stage_keys(cfg, {})["dialogue"], "model_fingerprints": {}, "code_version": "test",
        "license": "cc-by-4.0", "license_link": "https://creativecommons.org/licenses/by/4.0/",
        "funnel": [
            {"stage": "sources", "unit": "sources", "in": 9, "out": 8, "removed": {"not_an_image": 1}},
            {"stage": "generate", "unit": "rows", "in": n, "out": n, "removed": {}},
            {"stage": "score", "unit": "rows", "in": n, "out": n, "removed": {}},
            {"stage": "rules", "unit": "rows", "in": n, "out": n_pass, "removed": rules_removed},
            {"stage": "dialogue", "unit": "rows", "in": n_pass, "out": counts["kept"], "removed": {"unparseable": 1}},
        ],
        "rules": {"mode": "absolute", **BUILD_RULES, "clip_t_quantile": 0.5, "dino_quantile": 0.5,
                  "thresholds": {"clip_t": 0.3, "dino": 0.5}},
        "counts": counts, "pending": 0, "dataset_hash": h.hexdigest(),
        "timings_s": {"pipeline_wall": 1.0, "total_wall": 2.0}, "num_chunks": len(CHUNKS),
    }
    write_dataset_card(store, manifest)
    store.write_json("manifest.json", manifest)
    store.write_bytes("_SUCCESS", b"")
    return src


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_src(tmp_path_factory.mktemp("refilter"))


def read_dir(path: Path) -> pa.Table:
    """Every shard below ``path`` (``OUT/<table>/data``) as one table sorted by id."""
    tables = [pq.read_table(f) for f in sorted(path.glob("*.parquet"))]
    return pa.concat_tables(tables).sort_by(S.ID)


def comparable(table: pa.Table) -> list[dict]:
    """Rows with NaN written as a string (NaN != NaN would make equal tables differ)."""
    return [{k: "nan" if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()} for r in table.to_pylist()]


def by_id(table: pa.Table) -> dict[str, dict]:
    return {r[S.ID]: r for r in table.to_pylist()}


def scores(src: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    cand = read_dir(src / "candidates" / "data")
    return (cand.column(S.ID).to_pylist(), np.asarray(cand.column(S.CLIP_T).to_numpy(), np.float64),
            np.asarray(cand.column(S.DINO).to_numpy(), np.float64))


def expected_keep(src: Path, clip_t_min: float, dino_min: float) -> set[str]:
    """Ids passing an absolute rule, computed with plain numpy (NaN never passes)."""
    ids, ct, dn = scores(src)
    with np.errstate(invalid="ignore"):
        keep = (ct >= clip_t_min) & (dn >= dino_min)
    return {i for i, k in zip(ids, keep) if k}


def dialogue_rejected(src: Path) -> set[str]:
    q = read_dir(src / "quarantine" / "data")
    return {i for i, s in zip(q.column(S.Q_ID).to_pylist(), q.column(S.Q_STAGE).to_pylist()) if s == "dialogue"}


def test_tighter_rule_keeps_subset_with_equal_rows(src, tmp_path):
    new = tmp_path / "tight"
    result = refilter(src, ["build.rules.clip_t_min=0.4"], new)
    m = result.manifest
    want = expected_keep(src, 0.4, 0.5)
    src_rows, new_rows = by_id(read_dir(src / "dataset" / "data")), by_id(read_dir(new / "dataset" / "data"))
    assert set(new_rows) == want & set(src_rows) and 0 < len(new_rows) < len(src_rows)
    for rid, row in new_rows.items():
        assert row == src_rows[rid]  # every column, images byte for byte
    # candidates: all rows, the new decision, everything else unchanged
    cand_old, cand_new = read_dir(src / "candidates" / "data"), read_dir(new / "candidates" / "data")
    assert {r[S.ID] for r in cand_new.to_pylist() if r[S.KEEP]} == want
    same = [S.KEEP, S.FILTER_REASON]
    assert comparable(cand_new.drop_columns(same)) == comparable(cand_old.drop_columns(same))
    assert cand_new.schema == cand_old.schema
    assert read_dir(new / "quarantine" / "data").equals(read_dir(src / "quarantine" / "data"))
    # funnel: upstream stages copied; rules and dialogue add up; the rejected dialogue keeps its reason
    assert [f["stage"] for f in m["funnel"]] == ["sources", "generate", "score", "rules", "dialogue"]
    assert funnel_warnings(m["funnel"]) == []
    dialogue = m["funnel"][-1]
    assert (dialogue["in"], dialogue["out"]) == (len(want), len(new_rows))
    rejected = len(want & dialogue_rejected(src))
    assert dialogue["removed"] == ({"unparseable": rejected} if rejected else {})
    assert m["counts"] == {"kept": len(new_rows), "candidates": 15, "quarantined": 2, "pending_dialogue": 0,
                           "dataset_bytes": sum(f.stat().st_size for f in (new / "dataset" / "data").iterdir())}
    assert m["status"] == "complete" and m["refiltered_from"] == str(src.resolve())
    assert m["rules"]["thresholds"] == {S.CLIP_T: 0.4, S.DINO: 0.5}
    # the dataset hash is the build's: per chunk, table_hash of the sink's table of exactly these rows
    h = hashlib.sha256()
    for chunk in CHUNKS:
        kept = pq.read_table(src / "dataset" / "data" / f"train-{chunk}.parquet").to_pylist()
        rows = [{**r, S.SOURCE_PNG: r[S.INPUT_IMAGE]["bytes"], S.TARGET_PNG: r[S.TARGET_IMAGE]["bytes"]}
                for r in kept if r[S.ID] in want]
        h.update(f"{chunk}:{table_hash(dataset_table(rows))}\n".encode())
    assert m["dataset_hash"] == h.hexdigest()
    assert (new / "_SUCCESS").is_file() and (new / "report" / "report.md").is_file()
    assert "PENDING" not in result.summary()


def test_looser_rule_counts_pending_dialogue(src, tmp_path):
    new = tmp_path / "loose"
    result = refilter(src, ["build.rules.clip_t_min=0.1", "build.rules.dino_min=0.3"], new)
    m = result.manifest
    want = expected_keep(src, 0.1, 0.3)
    src_ids = set(by_id(read_dir(src / "dataset" / "data")))
    assert src_ids < want  # every row kept before still passes, and more
    pending = want - src_ids - dialogue_rejected(src)
    assert len(pending) > 0
    assert set(by_id(read_dir(new / "dataset" / "data"))) == src_ids
    assert m["counts"]["pending_dialogue"] == len(pending) and m["status"] == "pending_dialogue"
    assert m["funnel"][-1] == {"stage": "dialogue", "unit": "rows", "in": len(want), "out": len(src_ids),
                               "removed": {"unparseable": 1, "pending_dialogue": len(pending)}}
    assert funnel_warnings(m["funnel"]) == []
    assert m["rebuild_command"] == (f"cafe build configs/tiny.yaml --out {src.resolve()} "
                                    "--set build.rules.clip_t_min=0.1 --set build.rules.dino_min=0.3")
    summary = result.summary()
    assert f"PENDING DIALOGUE: {len(pending)} row(s)" in summary and m["rebuild_command"] in summary
    md = (new / "report" / "report.md").read_text()
    assert f"| pending_dialogue | {len(pending)} |" in md and "Warning" not in md


def test_quantile_mode_over_all_candidates(src, tmp_path):
    new = tmp_path / "quantile"
    m = refilter(src, ["build.rules.mode=quantile", "build.rules.clip_t_quantile=0.5",
                       "build.rules.dino_quantile=0.25"], new).manifest
    ids, ct, dn = scores(src)
    thr_ct, thr_dn = float(np.nanquantile(ct, 0.5)), float(np.nanquantile(dn, 0.25))  # over all 3 chunks
    assert m["rules"]["thresholds"] == {S.CLIP_T: thr_ct, S.DINO: thr_dn}
    want = expected_keep(src, thr_ct, thr_dn)
    cand = read_dir(new / "candidates" / "data")
    assert {r[S.ID] for r in cand.to_pylist() if r[S.KEEP]} == want
    assert m["funnel"][3]["out"] == len(want)
    assert set(by_id(read_dir(new / "dataset" / "data"))) == want & set(by_id(read_dir(src / "dataset" / "data")))
    # a build applies quantiles per chunk: the rebuild command carries the resolved absolute thresholds
    assert f"--set build.rules.clip_t_min={thr_ct!r} --set build.rules.dino_min={thr_dn!r}" in m["rebuild_command"]
    assert "mode" not in m["rebuild_command"]  # the original build was absolute already


def _another_build(path: Path) -> None:
    (path / "dataset" / "data").mkdir(parents=True)
    (path / "dataset" / "data" / "train-000000.parquet").write_bytes(b"precious")
    (path / "manifest.json").write_text(json.dumps({"funnel": [], "counts": {}}))


@pytest.mark.parametrize("case", ["another-build", "unrelated-files", "refilter-of-another-source", "a-file"])
def test_refuses_to_overwrite_another_output(src, tmp_path, case):
    out = tmp_path / "taken"
    if case == "a-file":
        out.write_text("x")
        match = "not a directory"
    else:
        out.mkdir()
        match = "refusing to overwrite"
        if case == "another-build":
            _another_build(out)
        elif case == "unrelated-files":
            (out / "notes.txt").write_text("mine")
        else:
            (out / "manifest.json").write_text(json.dumps({"refiltered_from": str(tmp_path / "elsewhere")}))
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=match):
        refilter(src, ["build.rules.clip_t_min=0.4"], out)
    after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, nothing removed


def test_refuses_source_directory_and_bad_overrides(src, tmp_path):
    for out, match in ((src, "is the dataset directory"), (src / "sub", "inside it"),
                       (src.parent, "contains the dataset directory")):
        with pytest.raises(ValueError, match=match):
            refilter(src, [], out)
    with pytest.raises(ValueError, match=r"build\.profusion\.num_inference_steps=5.*only build\.rules\.\*"):
        refilter(src, ["build.profusion.num_inference_steps=5"], tmp_path / "x")
    incomplete = Path(shutil.copytree(src, tmp_path / "incomplete"))
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    with pytest.raises(ValueError, match="incomplete build"):
        refilter(incomplete, [], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_rerun_replaces_its_own_previous_output(src, tmp_path):
    new = tmp_path / "again"
    first = refilter(src, ["build.rules.clip_t_min=0.1"], new).manifest
    (new / "dataset" / "data" / "train-999999.parquet").write_bytes(b"stale")  # must not survive the re-run
    second = refilter(src, ["build.rules.clip_t_min=0.45"], new).manifest
    assert second["counts"]["kept"] < first["counts"]["kept"]
    assert json.loads((new / "manifest.json").read_text())["rules"]["clip_t_min"] == 0.45
    names = sorted(p.name for p in (new / "dataset" / "data").iterdir())
    # one shard per chunk that kept a row; a chunk that kept none has no shard (datasets refuses zero-row files)
    assert names and set(names) <= {f"train-{c}.parquet" for c in CHUNKS}
    assert all(pq.read_metadata(new / "dataset" / "data" / n).num_rows > 0 for n in names)
    assert set(by_id(read_dir(new / "dataset" / "data"))) == expected_keep(src, 0.45, 0.5) - dialogue_rejected(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary or replaced directory left
    # a refilter of the refilter output: the rebuild still points at the original build and its rules
    chained = refilter(new, ["build.rules.clip_t_min=0.05"], tmp_path / "chained").manifest
    assert chained["refiltered_from"] == str(new.resolve()) and chained["original_build"] == str(src.resolve())
    assert chained["rebuild_command"].endswith(f"--out {src.resolve()} --set build.rules.clip_t_min=0.05")


def test_result_loads_with_datasets_and_images_are_identical(src, tmp_path):
    import datasets

    new = tmp_path / "hf"
    m = refilter(src, ["build.rules.clip_t_min=0.35"], new).manifest
    ds = datasets.load_dataset(str(new / "dataset"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == m["counts"]["kept"] > 0
    assert list(ds.features) == list(S.DATASET_COLUMNS)
    assert isinstance(ds[0][S.INPUT_IMAGE], Image.Image)  # decoded through the HF Image feature
    raw = ds.cast_column(S.INPUT_IMAGE, datasets.Image(decode=False)).cast_column(
        S.TARGET_IMAGE, datasets.Image(decode=False))
    src_rows = by_id(read_dir(src / "dataset" / "data"))
    for row in raw:
        for col in (S.INPUT_IMAGE, S.TARGET_IMAGE):
            assert row[col]["bytes"] == src_rows[row[S.ID]][col]["bytes"]
    card = (new / "dataset" / "README.md").read_text()
    assert f"rows: {m['counts']['kept']}" in card and m["dataset_hash"] in card
    import yaml

    header = yaml.safe_load(card.split("---\n")[1])  # the license and its link travel to the refiltered card
    assert header["license"] == "cc-by-4.0" and header["license_link"] == "https://creativecommons.org/licenses/by/4.0/"
