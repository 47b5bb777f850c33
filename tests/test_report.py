"""Tests of the dataset report (``pipeline.report``) on small build output directories in the Parquet layout.

The fixtures write the shards the way the sink does (``pipeline.stages.dataset_table`` for the kept rows, the
``candidates`` / ``quarantine`` Arrow schemas for the others): no Ray.
"""
from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import report as report_module
from pipeline.report import FIGURES, funnel_text, funnel_warnings, write_report
from pipeline.stages import dataset_table
from training.data import schema

FUNNEL = [
    {"stage": "sources", "unit": "sources", "in": 7, "out": 5, "removed": {"too_small": 1, "not_an_image": 1}},
    {"stage": "generate", "unit": "rows", "in": 5, "out": 5, "removed": {}},
    {"stage": "rules", "unit": "rows", "in": 5, "out": 3, "removed": {"clip_t_below": 1, "score_missing": 1}},
    {"stage": "dialogue", "unit": "rows", "in": 3, "out": 3, "removed": {}},
]
RULES = {"mode": "absolute", "clip_t_min": 0.25, "dino_min": 0.55, "thresholds": {"clip_t": 0.25, "dino": 0.55}}
QUARANTINE = [  # (stage, reason)
    ("sources", "too_small"), ("sources", "not_an_image"), ("rules", "clip_t_below"), ("rules", "score_missing"),
]
# candidate scores: c3 has no clip_t (NaN) and c4 no dino (null); kept = c0, c1, c2
CLIP_T = [0.31, 0.40, 0.27, float("nan"), 0.10]
DINO = [0.70, 0.61, 0.90, 0.80, None]


def _png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def pair_rows(ids: list[str], clip_t: list | None = None, dino: list | None = None) -> list[dict]:
    """Work rows (the sink's input): lineage, PNG bytes, dialogue and scores, one per id."""
    n = len(ids)
    clip_t, dino = clip_t or [0.5] * n, dino or [0.5] * n
    return [{
        schema.ID: i, schema.ROUND: 0, schema.SOURCE_ID: f"s-{i}", schema.SOURCE_URI: f"/data/{i}.png",
        schema.CLASS: "dog", schema.INSTRUCTION: f"on the beach {i}", schema.FILLED_PROMPT: f"a dog on the beach {i}",
        schema.SOURCE_PNG: _png((200, 10, 10)), schema.TARGET_PNG: _png((10, 10, 200)),
        schema.USER_TEXT: f"Put this dog on the beach please, row {i}.",
        schema.ASSISTANT_TEXT: f"Here is this dog on a sunny beach | row {i}.",
        schema.DIALOGUE_STYLE: "clear", schema.GENERATOR: "tiny", schema.GENERATOR_PARAMS: "{}", schema.SEED: k,
        schema.CLIP_T: clip_t[k], schema.DINO: dino[k], schema.CLIP_I: 0.5,
    } for k, i in enumerate(ids)]


def write_shards(out: Path, table: str, shards: dict[str, pa.Table]) -> None:
    """Replace ``out/<table>/data/`` with one Parquet file per ``{file name: table}`` (none: zero shards)."""
    data = out / table / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for name, t in shards.items():
        pq.write_table(t, data / name)


def split(items: list, parts: int) -> list[list]:
    k, r = divmod(len(items), parts)
    bounds = [i * k + min(i, r) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def make_out(root: Path) -> Path:
    """A fake ``cafe build`` output directory: manifest, candidates (2 shards), dataset (3 kept rows), quarantine."""
    out = root / "out"
    out.mkdir(parents=True)
    rows = pair_rows([f"c{i}" for i in range(5)], CLIP_T, DINO)
    for r, keep, reason in zip(rows, [True, True, True, False, False],
                               [None, None, None, "score_missing", "clip_t_below"]):
        r[schema.KEEP], r[schema.FILTER_REASON] = keep, reason
    cand_schema = schema.arrow_schema("candidates")
    write_shards(out, "candidates", {
        f"{chunk:06d}.parquet": pa.Table.from_pylist([{c: r.get(c) for c in cand_schema.names} for r in part],
                                                     schema=cand_schema)
        for chunk, part in enumerate(split(rows, 2))})
    write_kept(out, ["c2", "c0", "c1"])  # unordered on disk on purpose
    quarantine = [{schema.Q_ID: f"q{i}", schema.Q_STAGE: s, schema.Q_REASON: r, schema.Q_DETAIL: "x",
                   schema.Q_INPUT: "/data/x.png"} for i, (s, r) in enumerate(QUARANTINE)]
    write_shards(out, "quarantine",
                 {"000000.parquet": pa.Table.from_pylist(quarantine, schema=schema.arrow_schema("quarantine"))})
    manifest = {
        "funnel": FUNNEL, "rules": RULES,
        "config_hash": "cfg0123abcd", "dataset_hash": "ds4567efgh", "created": "2025-01-02T03:04:05Z",
        "counts": {"kept": 3, "candidates": 5, "quarantined": len(QUARANTINE)},
        "timings_s": {"sources": 0.5, "generate": 2.25, "rules": 0.01},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def write_kept(out: Path, kept_ids: list[str], num_shards: int = 2) -> None:
    """(Re)write ``out/dataset/data`` with the kept rows ``kept_ids`` in ``num_shards`` shards (0: no shard at
    all; shards may be empty) and set ``counts.kept`` to match."""
    parts = split(pair_rows(kept_ids), num_shards) if num_shards else []
    write_shards(out, "dataset",
                 {f"train-{chunk:06d}.parquet": dataset_table(part) for chunk, part in enumerate(parts)})
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest["counts"]["kept"] = len(kept_ids)
        manifest_path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The fake output directory, built once per module; tests work on copies (:func:`clone`)."""
    return make_out(tmp_path_factory.mktemp("pristine"))


def clone(pristine: Path, tmp_path: Path, **manifest_updates) -> Path:
    """A copy of the pristine output directory, with top-level manifest keys replaced."""
    out = Path(shutil.copytree(pristine, tmp_path / "out"))
    if manifest_updates:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.update(manifest_updates)
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def table_rows(md: str, first_cell: str) -> list[list[str]]:
    """Cells of every Markdown table row whose first cell is ``first_cell``."""
    rows = []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cells[0] == first_cell:
                rows.append(cells)
    return rows


def assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width > 0 and im.height > 0
        return im.size


@pytest.fixture(scope="module")
def built(pristine, tmp_path_factory) -> tuple[Path, str]:
    out = clone(pristine, tmp_path_factory.mktemp("built"))
    path = write_report(out, max_samples=2)
    return out, path.read_text(encoding="utf-8")


def test_files_written_and_valid_pngs(built):
    out, _ = built
    report = out / "report"
    assert (report / "report.md").is_file()
    for role, name in FIGURES.items():
        if role in ("sweep", "oracle_hist"):  # drawn only for candidates with the world oracle's verdicts
            assert not (report / name).exists()
        else:
            assert_png(report / name)
    assert not [p.name for p in report.iterdir() if ".tmp" in p.name]


def test_funnel_table_has_exact_numbers(built):
    _, md = built
    for rec in FUNNEL:
        (cells,) = table_rows(md, rec["stage"])[:1]
        assert cells[1:5] == [rec["unit"], str(rec["in"]), str(rec["out"]), str(sum(rec["removed"].values()))]
        for reason, n in rec["removed"].items():
            assert f"{reason}: {n}" in cells[5]
    assert "Warning" not in md
    for role, name in FIGURES.items():
        assert (f"]({name})" in md) == (role not in ("sweep", "oracle_hist"))  # those two: oracle builds only


def test_counts_thresholds_hashes(built):
    _, md = built
    assert table_rows(md, "kept")[0][1] == "3"
    assert table_rows(md, "candidates")[0][1] == "5"
    assert table_rows(md, "quarantined")[0][1] == "4"
    assert table_rows(md, schema.CLIP_T)[0][1:] == [repr(RULES["clip_t_min"]), repr(RULES["thresholds"]["clip_t"])]
    assert table_rows(md, schema.DINO)[0][1:] == [repr(RULES["dino_min"]), repr(RULES["thresholds"]["dino"])]
    assert "`absolute`" in md
    assert "cfg0123abcd" in md and "ds4567efgh" in md


def test_quarantine_reason_counts(built):
    _, md = built
    expected: dict[tuple[str, str], int] = {}
    for key in QUARANTINE:
        expected[key] = expected.get(key, 0) + 1
    got = {(cells[0], cells[1]): int(cells[2]) for stage in ("sources", "rules")
           for cells in table_rows(md, stage) if len(cells) == 3}
    assert got == expected
    assert "| **total** | | 4 |" in md


def test_nan_scores_counted_in_caption(built):
    _, md = built
    n_nan = {schema.CLIP_T: sum(math.isnan(v) for v in CLIP_T), schema.DINO: sum(v is None for v in DINO)}
    for score, n in n_nan.items():
        assert f"*{score} of all 5 candidates: {5 - n} plotted, {n} NaN/missing excluded; applied threshold " \
               f"{RULES['thresholds'][score]!r}" in md


def test_samples_first_by_id(built):
    _, md = built
    assert "### 1. `c0`" in md and "### 2. `c1`" in md and "`c2`" not in md
    assert "> **User:** Put this dog on the beach please, row c0." in md
    assert "> **Assistant:** Here is this dog on a sunny beach | row c1." in md


def test_inconsistent_funnel_warns(pristine, tmp_path):
    bad = [dict(FUNNEL[0]), {"stage": "rules", "unit": "rows", "in": 10, "out": 6, "removed": {"dino_below": 3}}]
    out = clone(pristine, tmp_path, funnel=bad)
    md = write_report(out, max_samples=0).read_text()
    warnings = [line for line in md.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and "'rules'" in warnings[0] and "in 10 != out 6 + removed 3" in warnings[0]
    assert funnel_warnings(bad) == ["stage 'rules': in 10 != out 6 + removed 3 (= 9)"]
    assert "WARNING: stage 'rules'" in funnel_text({"funnel": bad})
    assert not (out / "report" / "samples.png").exists()


def test_quantile_mode_thresholds(pristine, tmp_path):
    rules = {"mode": "quantile", "clip_t_min": 0.3, "dino_min": 0.6, "clip_t_quantile": 0.25,
             "dino_quantile": 0.5, "thresholds": {"clip_t": 0.2731234431266785}}  # no dino threshold recorded
    out = clone(pristine, tmp_path, rules=rules)
    md = write_report(out, max_samples=0).read_text()
    assert "`quantile`" in md
    assert table_rows(md, schema.CLIP_T)[0][1:] == ["0.3", "0.25", "0.2731234431266785"]
    assert table_rows(md, schema.DINO)[0][1:] == ["0.6", "0.5", "not recorded"]
    assert "applied threshold 0.2731234431266785 (dashed line)" in md
    assert "*dino of all 5 candidates: 4 plotted, 1 NaN/missing excluded; no threshold recorded.*" in md
    assert_png(out / "report" / FIGURES[schema.DINO])


@pytest.mark.parametrize("num_shards", [0, 1, 2], ids=["zero-shards", "one-empty-shard", "two-empty-shards"])
def test_empty_dataset(pristine, tmp_path, num_shards):
    out = clone(pristine, tmp_path)
    write_kept(out, [], num_shards=num_shards)
    (out / "report").mkdir()
    (out / "report" / "samples.png").write_bytes(b"stale")  # from an earlier run: must go
    md = write_report(out).read_text()
    assert "No rows were kept" in md
    assert not (out / "report" / "samples.png").exists()
    assert table_rows(md, "kept")[0][1] == "0"
    for role in ("funnel", schema.CLIP_T, schema.DINO):
        assert_png(out / "report" / FIGURES[role])


def test_missing_candidates_and_stale_figures(pristine, built, tmp_path):
    out = clone(pristine, tmp_path)
    write_report(out, max_samples=1)  # a previous run, with histograms
    assert (out / "report" / FIGURES[schema.CLIP_T]).exists()
    shutil.rmtree(out / "candidates")
    md = write_report(out).read_text()  # default max_samples: all 3 kept rows
    assert "No `candidates/` table" in md
    assert not (out / "report" / FIGURES[schema.CLIP_T]).exists()
    assert not (out / "report" / FIGURES[schema.DINO]).exists()
    # one grid row per sample: 3 rows here, 2 in ``built``; same width
    three = assert_png(out / "report" / "samples.png")
    two = assert_png(built[0] / "report" / "samples.png")
    assert three[0] == two[0] and three[1] > two[1]


def test_funnel_text_lines_and_alignment():
    lines = funnel_text({"funnel": FUNNEL}).splitlines()
    assert len(lines) == 1 + len(FUNNEL) and lines[0].split() == ["stage", "unit", "in", "out", "removed"]
    for rec, line in zip(FUNNEL, lines[1:]):
        tokens = line.replace(",", " ").split()
        assert tokens[:4] == [rec["stage"], rec["unit"], str(rec["in"]), str(rec["out"])]
        assert set(tokens[4:]) == ({f"{r}={n}" for r, n in rec["removed"].items()} or {"-"})
    # counts are right-aligned: the "in" and the "out" values of every line end in the same columns
    ends = {tuple(m.end() for m in list(re.finditer(r"\S+", line))[2:4]) for line in lines}
    assert len(ends) == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="max_samples"):
        write_report(tmp_path, max_samples=-1)
    with pytest.raises(ValueError, match=r"funnel\[0\]\.in"):
        funnel_text({"funnel": [{"stage": "x", "unit": "rows", "in": "3", "out": 1, "removed": {}}]})


def test_reads_lazily_only_needed_columns(tmp_path, monkeypatch):
    """Scores and reasons are streamed as their own columns; images are read for the sample rows' batches only."""
    out = make_out(tmp_path)
    ids = [f"r{i:03d}" for i in range(90)]
    write_kept(out, ids[::-1], num_shards=3)  # samples r000, r001 sit at the end of the last shard
    reads: list[tuple[tuple[str, ...], int]] = []  # (columns, rows) of every batch read
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            reads.append((tuple(batch.schema.names), batch.num_rows))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read a whole table"))
    md = write_report(out, max_samples=2).read_text()
    assert "### 1. `r000`" in md and "### 2. `r001`" in md and "`r002`" not in md
    assert "The first 2 of 90 kept rows by id." in md
    image_batches = [n for cols, n in reads if schema.INPUT_IMAGE in cols or schema.TARGET_IMAGE in cols]
    assert max(image_batches) <= report_module._SAMPLE_BATCH  # images held: one small batch at a time
    assert 2 <= sum(image_batches) <= 30  # only the shard (row group) holding the samples, not all 90 rows
    column_sets = {cols for cols, _ in reads}
    assert column_sets <= {(schema.CLIP_T, schema.DINO), (schema.Q_STAGE, schema.Q_REASON), (schema.ID,),
                           tuple(schema.DATASET_COLUMNS), (schema.ORACLE_IDENTITY,)}  # no verdicts: one bool column
    assert sum(n for cols, n in reads if cols == (schema.ID,)) == 90  # one pass over the ids


def test_manifest_counts_disagree_warns(pristine, tmp_path):
    out = clone(pristine, tmp_path, counts={"kept": 4, "candidates": 5, "quarantined": 9})
    md = write_report(out, max_samples=0).read_text()
    assert "> **Warning:** manifest counts.kept = 4 but `dataset/` has 3 rows" in md
    assert "> **Warning:** manifest counts.quarantined = 9 but `quarantine/` has 4 rows" in md
    assert "counts.candidates" not in md


def test_every_table_with_zero_shards(pristine, tmp_path):
    out = clone(pristine, tmp_path, counts={"kept": 0, "candidates": 0, "quarantined": 0})
    for table in ("candidates", "dataset", "quarantine"):
        write_shards(out, table, {})
    md = write_report(out).read_text()
    assert "No rows or inputs were quarantined." in md and "No rows were kept" in md
    assert f"*{schema.CLIP_T} of all 0 candidates: 0 plotted, 0 NaN/missing excluded" in md
    assert "Warning" not in md  # the counts agree with the (empty) shards
    assert not (out / "report" / "samples.png").exists()


def test_threshold_sweep_against_the_oracle(pristine, tmp_path):
    """With oracle verdicts on the candidates: the sweep's precision/recall/F1 equal a direct count for every
    threshold, the applied threshold is marked, both figures are written, and the rows listed are the ones
    nearest each applied threshold (not the first by id)."""
    import numpy as np

    from pipeline.report import threshold_sweep

    out = clone(pristine, tmp_path)
    rng = np.random.default_rng(3)
    n = 40
    clip_t, dino = rng.uniform(0.1, 0.5, n), rng.uniform(0.3, 0.95, n)
    good_id, good_in = dino + rng.normal(0, 0.08, n) > 0.6, clip_t + rng.normal(0, 0.05, n) > 0.25
    rows = pair_rows([f"o{i:02d}" for i in range(n)], list(clip_t), list(dino))
    applied = RULES["thresholds"]
    for r, ok_id, ok_in in zip(rows, good_id, good_in):
        keep = r[schema.CLIP_T] >= applied["clip_t"] and r[schema.DINO] >= applied["dino"]
        r.update({schema.KEEP: bool(keep), schema.FILTER_REASON: None if keep else "below",
                  schema.ORACLE_IDENTITY: bool(ok_id), schema.ORACLE_INSTRUCTION: bool(ok_in),
                  schema.ORACLE_READING: "read"})
    cand = schema.arrow_schema("candidates")
    write_shards(out, "candidates", {"000000.parquet": pa.Table.from_pylist(
        [{c: r.get(c) for c in cand.names} for r in rows], schema=cand)})
    md = Path(write_report(out)).read_text()

    good = good_id & good_in
    sweep = threshold_sweep({"clip_t": clip_t, "dino": dino}, good, applied)
    for rec in sweep:
        other = "dino" if rec["score"] == "clip_t" else "clip_t"
        values = {"clip_t": clip_t, "dino": dino}
        kept = (values[rec["score"]] >= rec["threshold"]) & (values[other] >= applied[other])
        assert rec["kept"] == kept.sum()
        assert rec["precision"] == pytest.approx((kept & good).sum() / kept.sum(), nan_ok=True) if kept.sum() else \
            np.isnan(rec["precision"])
        assert rec["recall"] == pytest.approx((kept & good).sum() / good.sum())
    assert sum(r["applied"] for r in sweep) == 2  # the applied threshold of each score is a row
    at_applied = [r for r in sweep if r["applied"]][0]
    keep = (clip_t >= applied["clip_t"]) & (dino >= applied["dino"])
    assert at_applied["precision"] == pytest.approx((keep & good).sum() / keep.sum())  # = the filter's own
    assert "### Threshold sweep against the oracle" in md and "(applied)" in md and "Best F1 for dino" in md
    from pipeline.report import oracle_sweep, sweep_lines

    assert oracle_sweep(out) == sweep_lines(sweep)  # what `cafe refilter` prints after its new thresholds
    for role in ("sweep", "oracle_hist"):
        assert (out / "report" / FIGURES[role]).read_bytes()[:4] == b"\x89PNG"
    nearest = sorted(range(n), key=lambda i: (abs(dino[i] - applied["dino"]), f"o{i:02d}"))[0]
    assert f"`o{nearest:02d}`" in md.split("Rows nearest each applied threshold")[1]
