"""The report's oracle section on a hand-made build output (no Ray): the table equals an independent count."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.report import write_report
from tests.test_report import make_out, write_shards
from training.data import schema


def _with_verdicts(out, identity, instruction):
    cand = pq.read_table(out / "candidates" / "data").to_pylist()
    for r, i, f in zip(sorted(cand, key=lambda r: r[schema.ID]), identity, instruction):
        r[schema.ORACLE_IDENTITY], r[schema.ORACLE_INSTRUCTION] = i, f
        r[schema.ORACLE_READING] = "red-star-none → red-star-none dark gray left small solid"
    write_shards(out, "candidates", {"000000.parquet": pa.Table.from_pylist(cand, schema=schema.arrow_schema("candidates"))})


def test_no_oracle_section_without_verdicts(tmp_path):
    out = make_out(tmp_path)  # candidates carry the oracle columns, all null: a build without the world's oracle
    assert "Oracle (synthetic world)" not in write_report(out).read_text()


def test_agreement_table_matches_an_independent_count(tmp_path):
    out = make_out(tmp_path)  # c0, c1, c2 kept; c3, c4 dropped
    identity = [True, False, True, True, None]
    instruction = [True, True, True, False, True]
    _with_verdicts(out, identity, instruction)
    text = write_report(out).read_text()
    # judged rows: c0..c3 (c4 has no identity verdict); good = c0, c2; kept among judged = c0, c1, c2
    assert "| rows judged | 4 (not judgeable: 1) |" in text
    assert "| kept by the filter | 3 |" in text
    assert "| oracle: good (both) | 2 (50.0%) |" in text
    assert "| precision of kept (good among kept) | 0.667 |" in text
    assert "| recall of kept (kept among good) | 1.000 |" in text
    assert "| agreement (kept == good) | 0.750 |" in text
    # the rows nearest each applied threshold: every judged candidate here (4 ≤ 12 per score), each once; c4 has no
    # verdict and is not listed
    assert text.count("red-star-none → red-star-none") == 4
    assert "dropped (score_missing)" in text
