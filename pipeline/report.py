"""The report of a built CAFE dataset: ``OUT/report/report.md`` and its PNG figures.

Usage::

    path = write_report("runs/tiny")          # -> runs/tiny/report/report.md (``cafe report OUT``)
    print(funnel_text(json.loads(Path("runs/tiny/manifest.json").read_text())))  # end of ``cafe build``

Inputs (layout in :mod:`training.data.schema`; a local output directory): ``OUT/manifest.json`` (funnel,
rules, counts, hashes, timings) and the Parquet shards of ``OUT/candidates/data/``, ``OUT/dataset/data/``
and ``OUT/quarantine/data/``. The shards are read lazily, batch by batch, and only the columns a section
needs: ``clip_t`` and ``dino`` of the candidates (histograms), ``stage`` and ``reason`` of the quarantine
(reason counts), ``id`` of the dataset (to find the first rows by id) and then all columns of only those
``max_samples`` rows. Row counts come from the Parquet footers. Memory is the score arrays (8 bytes per
candidate per score) plus one batch, never a whole image column. Outputs, all rewritten on every call and
written to a temp name then renamed:

* ``report.md`` — funnel table, counts, quarantine reasons by stage, thresholds, hashes, timings, figure
  links and the text of the sample rows;
* ``funnel.png`` — per stage, rows (or sources) in vs. out;
* ``clip_t_hist.png`` / ``dino_hist.png`` — every candidate's score with the applied threshold; NaN scores
  are left out and counted in the caption;
* ``samples.png`` — one row per sample (source, target, instruction + dialogue): the first ``max_samples``
  kept rows by id.

A table directory that is absent is reported as such; one with zero shards (or only empty shards) is an
empty table. A figure whose input is absent or empty (no ``candidates``, no kept rows) is not drawn, the
report says why, and a stale copy from an earlier run is removed. A funnel record whose ``in`` is not
``out + sum(removed)`` is reported with a warning line, never corrected; so is a manifest count that
differs from the rows on disk. Matplotlib is used through its object API on the Agg canvas (no pyplot
state, no display). This module does not import Ray.
"""
from __future__ import annotations

import heapq
import io
import json
import math
import os
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.store import Storage, open_parquet, parquet_shards
from training.data import schema

__all__ = ["write_report", "funnel_text", "funnel_warnings", "load_manifest", "REPORT_DIR", "FIGURES"]

REPORT_DIR = "report"
#: every figure this module may write, by role
FIGURES: dict[str, str] = {
    "funnel": "funnel.png",
    schema.CLIP_T: "clip_t_hist.png",
    schema.DINO: "dino_hist.png",
    "samples": "samples.png",
    "oracle_hist": "scores_by_oracle.png",
    "sweep": "threshold_sweep.png",
}
_SCORE_LABELS = {schema.CLIP_T: "CLIP-T (image vs. filled instruction)", schema.DINO: "DINO (target vs. source)"}
_DPI = 100
_THUMB = 192  # px, longer side of the sample images in samples.png
_WRAP = 64  # characters per line of the dialogue text in samples.png
_MAX_TEXT_LINES = 6  # per dialogue turn in samples.png (report.md carries the full text)
_BATCH = 65_536  # rows per batch when streaming narrow columns (ids, scores, reasons)
_SAMPLE_BATCH = 16  # rows per batch when reading the sample rows' image columns


# ---------------------------------------------------------------------------------------------------
# Manifest and funnel
# ---------------------------------------------------------------------------------------------------


def load_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``OUT/manifest.json`` and check the shape of its funnel records.

    Args:
        out_dir: output directory of a ``cafe build``.

    Returns:
        The manifest as a dict.

    Raises:
        FileNotFoundError: there is no ``manifest.json`` in ``out_dir``.
        ValueError: the manifest is not a JSON object or a funnel record is malformed.
    """
    store = Storage(out_dir)
    path = store.uri_of("manifest.json")
    if not store.is_file("manifest.json"):
        raise FileNotFoundError(f"{path}: not found; is {out_dir} the output directory of `cafe build`?")
    manifest = json.loads(store.read_bytes("manifest.json").decode("utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    _check_funnel(manifest.get("funnel", []))
    return manifest


def _check_funnel(funnel: Any) -> None:
    if not isinstance(funnel, list):
        raise ValueError(f"manifest funnel: expected a list of stage records, got {type(funnel).__name__}")
    for i, rec in enumerate(funnel):
        if not isinstance(rec, dict):
            raise ValueError(f"manifest funnel[{i}]: expected an object, got {type(rec).__name__}")
        if not isinstance(rec.get("stage"), str):
            raise ValueError(f"manifest funnel[{i}].stage: expected a string, got {rec.get('stage')!r}")
        for key in ("in", "out"):
            if not _is_count(rec.get(key)):
                raise ValueError(f"manifest funnel[{i}].{key}: expected a count >= 0, got {rec.get(key)!r}")
        removed = rec.get("removed", {})
        if not isinstance(removed, dict) or not all(_is_count(v) for v in removed.values()):
            raise ValueError(f"manifest funnel[{i}].removed: expected {{reason: count >= 0}}, got {removed!r}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def funnel_warnings(funnel: list[dict[str, Any]]) -> list[str]:
    """One message per funnel record whose ``in`` is not ``out + sum(removed)``.

    Usage: ``for line in funnel_warnings(manifest["funnel"]): log.warning(line)``

    Args:
        funnel: the manifest's ``funnel`` list.

    Returns:
        Messages such as ``"stage 'rules': in 10 != out 6 + removed 3 (= 9)"``; empty when all add up.
    """
    problems = []
    for rec in funnel:
        removed = sum(rec.get("removed", {}).values())
        if rec["in"] != rec["out"] + removed:
            problems.append(
                f"stage {rec['stage']!r}: in {rec['in']} != out {rec['out']} + removed {removed} "
                f"(= {rec['out'] + removed})"
            )
    return problems


def _removed_items(removed: dict[str, int]) -> list[tuple[str, int]]:
    """Reasons by count, largest first (ties by name), so the main cause reads first."""
    return sorted(removed.items(), key=lambda kv: (-kv[1], kv[0]))


def funnel_text(manifest: dict[str, Any]) -> str:
    """The plain-text funnel printed at the end of ``cafe build``: aligned columns, one line per stage.

    Usage: ``print(funnel_text(manifest))``

    Args:
        manifest: the build manifest (only ``funnel`` is read).

    Returns:
        A header line, then ``stage  unit  in  out  removed`` per stage with the removals as
        ``reason=count`` pairs, then one ``WARNING:`` line per record that does not add up. No trailing
        newline.

    Raises:
        ValueError: a funnel record is malformed.
    """
    funnel = manifest.get("funnel", [])
    _check_funnel(funnel)
    header = ("stage", "unit", "in", "out", "removed")
    rows = [
        (
            rec["stage"], str(rec.get("unit", "")), str(rec["in"]), str(rec["out"]),
            ", ".join(f"{r}={n}" for r, n in _removed_items(rec.get("removed", {}))) or "-",
        )
        for rec in funnel
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = []
    for r in [header, *rows]:
        # text columns left-aligned, counts right-aligned
        lines.append(
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip()
        )
    lines += [f"WARNING: {w}" for w in funnel_warnings(funnel)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def write_report(out_dir: str | os.PathLike[str], max_samples: int = 8) -> Path | str:
    """(Re)write ``OUT/report/report.md`` and its figures for a built dataset (a local directory or a URI).

    Usage: ``path = write_report("runs/tiny", max_samples=cfg.build.report_samples)``

    Args:
        out_dir: output directory or URI (``s3://…``) of a ``cafe build`` (holds ``manifest.json``).
        max_samples: how many kept rows (first by id) to show in ``samples.png`` and the report.

    Returns:
        Where ``report.md`` is: a Path for a local output, the URI otherwise.

    Raises:
        FileNotFoundError: ``out_dir`` has no ``manifest.json``.
        ValueError: ``max_samples`` is negative, or the manifest is malformed.
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
        raise ValueError(f"max_samples: expected an integer >= 0, got {max_samples!r}")
    storage = Storage(out_dir)
    manifest = load_manifest(out_dir)
    report = storage.sub(REPORT_DIR)
    written: set[str] = set()

    def save(role: str, fig: Any) -> None:
        _save_figure(fig, report, FIGURES[role])
        written.add(role)

    md: list[str] = [f"# CAFE dataset report — `{storage.uri.rstrip('/').rsplit('/', 1)[-1]}`", ""]
    md += _identity_section(manifest)

    funnel = manifest.get("funnel", [])
    md += ["## Funnel", ""]
    if funnel:
        md += [*_funnel_table(funnel), ""]
        for warning in funnel_warnings(funnel):
            md += [f"> **Warning:** funnel does not add up: {warning}", ""]
        save("funnel", _funnel_figure(funnel))
        md += [f"![funnel]({FIGURES['funnel']})", ""]
    else:
        md += ["The manifest has no funnel records.", ""]

    tables = {name: _Shards.open(storage, name) for name in ("candidates", "dataset", "quarantine")}
    md += _counts_section(manifest, tables)
    md += _quarantine_section(tables["quarantine"])

    rules = manifest.get("rules", {})
    md += _thresholds_section(rules)
    md += _score_sections(tables["candidates"], rules, save)
    md += _oracle_section(tables["candidates"], rules, save, max_rows=max(24, 3 * max_samples))
    md += _samples_section(tables["dataset"], max_samples, save)
    md += _timings_section(manifest)

    for role, name in FIGURES.items():  # a figure not drawn this time must not be left from a previous run
        if role not in written:
            report.delete(name)
    report.write_bytes("report.md", ("\n".join(md).rstrip() + "\n").encode("utf-8"))
    return Path(report.path("report.md")) if report.is_local else report.uri_of("report.md")


# ---------------------------------------------------------------------------------------------------
# Markdown sections
# ---------------------------------------------------------------------------------------------------


def _identity_section(manifest: dict[str, Any]) -> list[str]:
    rows = [(k, manifest.get(k)) for k in ("created", "dataset_hash", "config_hash")]
    rows += [(k, manifest[k]) for k in ("refiltered_from", "source_dataset_hash") if k in manifest]
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {k} | {_cell('`' + str(v) + '`' if v is not None else 'not recorded')} |" for k, v in rows]
    return lines + [""]


def _funnel_table(funnel: list[dict[str, Any]]) -> list[str]:
    lines = ["| stage | unit | in | out | removed | removed by reason |", "|---|---|---:|---:|---:|---|"]
    for rec in funnel:
        removed = rec.get("removed", {})
        reasons = ", ".join(f"{r}: {n}" for r, n in _removed_items(removed)) or "—"
        lines.append(
            f"| {_cell(rec['stage'])} | {_cell(rec.get('unit', ''))} | {rec['in']} | {rec['out']} | "
            f"{sum(removed.values())} | {_cell(reasons)} |"
        )
    return lines


def _counts_section(manifest: dict[str, Any], tables: dict[str, "_Shards | None"]) -> list[str]:
    counts = manifest.get("counts", {})
    lines = ["## Counts", "", "| count | value |", "|---|---:|"]
    for key in ("candidates", "kept", "quarantined"):
        lines.append(f"| {key} | {counts.get(key, 'not recorded')} |")
    kept, candidates = counts.get("kept"), counts.get("candidates")
    if _is_count(kept) and _is_count(candidates) and candidates > 0:
        lines.append(f"| kept / candidates | {kept / candidates:.1%} |")
    if "pending_dialogue" in counts:  # a refilter: rows that pass its rules but have no dialogue yet
        lines.append(f"| pending_dialogue | {counts['pending_dialogue']} |")
    lines.append("")
    # the manifest is what the build claims, the shards are what it wrote: say so when they disagree
    for key, where in (("candidates", "candidates"), ("kept", "dataset"), ("quarantined", "quarantine")):
        table = tables[where]
        if table is not None and counts.get(key) is not None and counts[key] != table.num_rows:
            lines += [f"> **Warning:** manifest counts.{key} = {counts[key]} but `{where}/` has {table.num_rows} rows",
                      ""]
    return lines


def _quarantine_section(quarantine: "_Shards | None") -> list[str]:
    lines = ["## Quarantine", ""]
    if quarantine is None:
        return lines + ["No `quarantine/` table in this output directory.", ""]
    if quarantine.num_rows == 0:
        return lines + ["No rows or inputs were quarantined.", ""]
    pairs: Counter[tuple[Any, Any]] = Counter()
    for batch in quarantine.batches([schema.Q_STAGE, schema.Q_REASON]):
        pairs.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
    order = {s: i for i, s in enumerate(schema.STAGES)}
    lines += ["| stage | reason | count |", "|---|---|---:|"]
    for (stage, reason), n in sorted(
        pairs.items(), key=lambda kv: (order.get(kv[0][0], len(order)), str(kv[0][0]), -kv[1], str(kv[0][1]))
    ):
        lines.append(f"| {_cell(stage)} | {_cell(reason)} | {n} |")
    lines.append(f"| **total** | | {quarantine.num_rows} |")
    return lines + [""]


def _thresholds_section(rules: dict[str, Any]) -> list[str]:
    applied = rules.get("thresholds", {})
    quantiles = any(f"{score}_quantile" in rules for score in (schema.CLIP_T, schema.DINO))
    q_head, q_rule = (" configured quantile |", "---:|") if quantiles else ("", "")
    lines = ["## Thresholds", "", f"Rule mode: `{rules.get('mode', 'not recorded')}`.", "",
             f"| score | configured minimum |{q_head} applied threshold |", f"|---|---:|{q_rule}---:|"]
    for score in (schema.CLIP_T, schema.DINO):
        quantile = f" {_num(rules.get(f'{score}_quantile'))} |" if quantiles else ""
        lines.append(f"| {score} | {_num(rules.get(f'{score}_min'))} |{quantile} {_num(applied.get(score))} |")
    if not applied:
        lines += ["", "The manifest records no applied thresholds."]
    return lines + [""]


def _score_sections(candidates: "_Shards | None", rules: dict[str, Any], save: Any) -> list[str]:
    lines = ["## Score distributions", ""]
    if candidates is None:
        return lines + ["No `candidates/` table in this output directory: score histograms not drawn.", ""]
    present = [c for c in (schema.CLIP_T, schema.DINO) if c in candidates.schema.names]
    parts: dict[str, list[np.ndarray]] = {c: [] for c in present}
    for batch in candidates.batches(present):
        for c in present:  # nulls become NaN in the float conversion; both count as "no score"
            parts[c].append(np.asarray(batch.column(c).to_numpy(zero_copy_only=False), dtype=np.float64))
    thresholds = rules.get("thresholds", {})
    for score in (schema.CLIP_T, schema.DINO):
        if score not in present:
            lines += [f"`candidates/` has no `{score}` column: histogram not drawn.", ""]
            continue
        values = np.concatenate(parts[score]) if parts[score] else np.zeros(0, dtype=np.float64)
        finite = values[np.isfinite(values)]
        n_nan = int(values.size - finite.size)
        threshold = _finite(thresholds.get(score))
        save(score, _hist_figure(score, finite, threshold, n_nan, rules.get("mode")))
        thr_text = "no threshold recorded"
        if threshold is not None:
            thr_text = f"applied threshold {_num(threshold)} (dashed line)"
        lines += [
            f"![{score} histogram]({FIGURES[score]})", "",
            f"*{score} of all {values.size} candidates: {finite.size} plotted, {n_nan} NaN/missing excluded; "
            f"{thr_text}.*", "",
        ]
    return lines


SWEEP_POINTS = 11  # thresholds per score in the report's sweep table (the plot draws more)


def threshold_sweep(scores: dict[str, np.ndarray], good: np.ndarray, applied: dict[str, float | None],
                    points: int = SWEEP_POINTS) -> list[dict[str, Any]]:
    """Precision, recall and F1 of "kept" against the oracle's "good" as each rule's threshold moves.

    For each score, ``points`` thresholds from its 5th to its 95th percentile plus the applied one; a row is kept
    when its score reaches the threshold and the other scores reach their applied thresholds (a missing score
    keeps nothing), the absolute rule of :mod:`filtering.rules`. Returns one record per (score, threshold):
    ``{score, threshold, applied, kept, precision, recall, f1}`` (NaN where a ratio has no denominator)."""
    good = np.asarray(good, bool)
    out = []
    for name, values in scores.items():
        values = np.asarray(values, np.float64)
        others = np.ones(len(good), bool)
        for other, v in scores.items():
            t = applied.get(other)
            if other != name and t is not None:
                others &= np.nan_to_num(np.asarray(v, np.float64), nan=-np.inf) >= t
        finite = values[np.isfinite(values)]
        grid = list(np.quantile(finite, np.linspace(0.05, 0.95, points))) if finite.size else []
        if applied.get(name) is not None:
            grid.append(float(applied[name]))
        for t in sorted(set(round(float(x), 6) for x in grid)):
            kept = (np.nan_to_num(values, nan=-np.inf) >= t) & others
            tp = int(np.sum(kept & good))
            p = tp / kept.sum() if kept.sum() else float("nan")
            r = tp / good.sum() if good.sum() else float("nan")
            f1 = 2 * p * r / (p + r) if (p + r) > 0 else float("nan")
            out.append({"score": name, "threshold": t, "applied": applied.get(name) is not None
                        and math.isclose(t, round(float(applied[name]), 6)), "kept": int(kept.sum()),
                        "precision": p, "recall": r, "f1": f1})
    return out


def sweep_lines(sweep: list[dict[str, Any]]) -> list[str]:
    """The sweep as a Markdown table (also printed by ``cafe refilter``), the applied threshold marked, then the
    best F1 per score."""
    ratio = lambda v: f"{v:.3f}" if math.isfinite(v) else "—"  # noqa: E731
    lines = ["| score | threshold | kept | precision | recall | F1 |", "|---|---:|---:|---:|---:|---:|"]
    for r in sweep:
        mark = " (applied)" if r["applied"] else ""
        lines.append(f"| {r['score']} | {r['threshold']:.3f}{mark} | {r['kept']} | {ratio(r['precision'])} | "
                     f"{ratio(r['recall'])} | {ratio(r['f1'])} |")
    for name in dict.fromkeys(r["score"] for r in sweep):
        rows = [r for r in sweep if r["score"] == name and math.isfinite(r["f1"])]
        if rows:
            best = max(rows, key=lambda r: r["f1"])
            lines.append(f"\nBest F1 for {name}: {best['f1']:.3f} at {best['threshold']:.3f} (precision "
                         f"{ratio(best['precision'])}, recall {ratio(best['recall'])}, {best['kept']} kept).")
    return lines


def oracle_rows(candidates: "_Shards | None") -> tuple[list[dict[str, Any]], int] | None:
    """(the candidates the world's oracle judged: id, instruction, scores, filter decision, verdicts; how many
    candidates in all), or None without oracle verdicts (one bool column read to find out)."""
    if candidates is None or not set(schema.ORACLE_COLUMNS) <= set(candidates.schema.names):
        return None
    if not any(b.column(0).null_count < b.num_rows for b in candidates.batches([schema.ORACLE_IDENTITY])):
        return None
    cols = [schema.ID, schema.INSTRUCTION, schema.CLIP_T, schema.DINO, schema.KEEP, schema.FILTER_REASON,
            *schema.ORACLE_COLUMNS]
    rows: list[dict[str, Any]] = []
    for batch in candidates.batches(cols):  # a few numbers a row
        d = batch.to_pydict()
        rows += [dict(zip(cols, r)) for r in zip(*(d[c] for c in cols))]
    judged = [r for r in rows if r[schema.ORACLE_IDENTITY] is not None and r[schema.ORACLE_INSTRUCTION] is not None
              and r[schema.KEEP] is not None]
    return judged, len(rows)


def oracle_summary(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The filter against the world's oracle for a build output's candidates (rows, kept, precision, recall of
    kept vs "good" = identity kept and instruction followed), or None without verdicts."""
    got = oracle_rows(_Shards.open(Storage(out_dir), "candidates"))
    if not got or not got[0]:
        return None
    from training.world.gates import oracle_agreement

    rows = got[0]
    a = oracle_agreement(np.array([bool(r[schema.KEEP]) for r in rows]),
                         np.array([bool(r[schema.ORACLE_IDENTITY]) and bool(r[schema.ORACLE_INSTRUCTION]) for r in rows]))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in a.items()}


def _sweep_inputs(rows: list[dict[str, Any]], rules: dict[str, Any]):
    scores = {c: np.array([np.nan if r[c] is None else float(r[c]) for r in rows]) for c in (schema.CLIP_T, schema.DINO)}
    return scores, {c: _finite(rules.get("thresholds", {}).get(c)) for c in scores}


def oracle_sweep(out_dir: str | os.PathLike[str]) -> list[str] | None:
    """The threshold sweep of a build or refilter output as Markdown lines (None without oracle verdicts)."""
    storage = Storage(out_dir)
    got = oracle_rows(_Shards.open(storage, "candidates"))
    if not got or not got[0]:
        return None
    rows = got[0]
    good = np.array([bool(r[schema.ORACLE_IDENTITY]) and bool(r[schema.ORACLE_INSTRUCTION]) for r in rows])
    scores, applied = _sweep_inputs(rows, load_manifest(out_dir).get("rules", {}))
    return sweep_lines(threshold_sweep(scores, good, applied))


def _oracle_section(candidates: "_Shards | None", rules: dict[str, Any], save: Any, max_rows: int) -> list[str]:
    """The synthetic world's oracle beside the filter: agreement table, a threshold sweep against the oracle
    (table and plot), the scores split by the oracle's verdict, and the rows nearest each applied threshold.

    Present only when the candidates carry oracle verdicts (``build.scoring.oracle`` set). A row's "good" is
    identity kept and instruction followed; rows whose instruction the oracle cannot judge are counted apart.
    """
    got = oracle_rows(candidates)
    if got is None:
        return []
    rows, n_all = got
    from training.world.gates import oracle_agreement

    k = np.array([bool(r[schema.KEEP]) for r in rows])
    good_id = np.array([bool(r[schema.ORACLE_IDENTITY]) for r in rows])
    good_in = np.array([bool(r[schema.ORACLE_INSTRUCTION]) for r in rows])
    good = good_id & good_in
    a = oracle_agreement(k, good)
    ratio = lambda v: f"{v:.3f}" if math.isfinite(v) else "— (no rows)"  # noqa: E731
    lines = ["## Oracle (synthetic world)", "",
             "The world's oracle reads each generated target: **identity kept** (same class, colour and mark as "
             "the source) and **instruction followed** (the attribute the phrase asks for). \"good\" = both. "
             "The filter (rules on CLIP-T and DINO) never sees these verdicts.", "",
             "| measure | value |", "|---|---|",
             f"| rows judged | {a['rows']} (not judgeable: {n_all - len(rows)}) |",
             f"| kept by the filter | {a['kept']} |",
             f"| oracle: identity kept | {int(good_id.sum())} ({good_id.mean() if rows else 0:.1%}) |",
             f"| oracle: instruction followed | {int(good_in.sum())} ({good_in.mean() if rows else 0:.1%}) |",
             f"| oracle: good (both) | {a['oracle_good']} ({a['oracle_good'] / max(1, a['rows']):.1%}) |",
             f"| precision of kept (good among kept) | {ratio(a['precision'])} |",
             f"| recall of kept (kept among good) | {ratio(a['recall'])} |",
             f"| agreement (kept == good) | {ratio(a['agreement'])} |", ""]
    scores, applied = _sweep_inputs(rows, rules)
    if rows:
        sweep = threshold_sweep(scores, good, applied)
        lines += ["### Threshold sweep against the oracle", "",
                  "Each rule's threshold moved alone (the other held at its applied value); \"kept\" = both rules "
                  "pass. Choose thresholds on one split of the sources and report them on another "
                  "(`cafe refilter` applies new ones without regenerating).", "", *sweep_lines(sweep), "",
                  f"![threshold sweep]({FIGURES['sweep']})", "",
                  f"![scores by oracle verdict]({FIGURES['oracle_hist']})", ""]
        save("sweep", _sweep_figure(threshold_sweep(scores, good, applied, points=41), applied))
        save("oracle_hist", _verdict_figure(scores, good, applied))
    per = max(1, max_rows // 2)
    lines += [f"Rows nearest each applied threshold ({per} per score):", "",
              "| id | instruction | clip_t | dino | filter | identity | instruction followed | oracle read |",
              "|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no", None: "—"}
    shown: set[Any] = set()
    for c, t in applied.items():
        if t is None:
            continue
        near = sorted((r for r in rows if r[c] is not None), key=lambda r: (abs(float(r[c]) - t), str(r[schema.ID])))
        for r in [r for r in near if r[schema.ID] not in shown][:per]:
            shown.add(r[schema.ID])
            decision = "kept" if r[schema.KEEP] else f"dropped ({r[schema.FILTER_REASON]})"
            lines.append(f"| `{_short_id(r[schema.ID])}` | {_cell(r[schema.INSTRUCTION])} | "
                         f"{_num(r[schema.CLIP_T], 3)} | {_num(r[schema.DINO], 3)} | {decision} | "
                         f"{yes[r[schema.ORACLE_IDENTITY]]} | {yes[r[schema.ORACLE_INSTRUCTION]]} | "
                         f"{_cell(r[schema.ORACLE_READING])} |")
    return lines + [""]


def _samples_section(kept: "_Shards | None", max_samples: int, save: Any) -> list[str]:
    lines = ["## Samples", ""]
    if kept is None:
        return lines + ["No `dataset/` table in this output directory: no samples.", ""]
    if kept.num_rows == 0:
        return lines + ["No rows were kept (the dataset is empty): no samples figure.", ""]
    if max_samples == 0:
        return lines + ["`max_samples` is 0: no samples figure.", ""]
    rows = _first_by_id(kept, max_samples)
    save("samples", _samples_figure(rows))
    lines += [f"The first {len(rows)} of {kept.num_rows} kept rows by id.", "",
              f"![samples]({FIGURES['samples']})", ""]
    for i, row in enumerate(rows, 1):
        scores = ", ".join(
            f"{c} {_num(row[c], 4)}" for c in (schema.CLIP_T, schema.DINO, schema.CLIP_I) if row.get(c) is not None
        )
        lines += [
            f"### {i}. `{row[schema.ID]}`", "",
            f"- class: {_inline(row.get(schema.CLASS))}",
            f"- instruction: {_inline(row.get(schema.INSTRUCTION))}",
        ]
        if scores:
            lines.append(f"- scores: {scores}")
        lines += ["", *_quote("User", row.get(schema.USER_TEXT)), ">",
                  *_quote("Assistant", row.get(schema.ASSISTANT_TEXT)), ""]
    return lines


def _timings_section(manifest: dict[str, Any]) -> list[str]:
    timings = manifest.get("timings_s", {})
    if not timings:
        return []
    lines = ["## Timings", "", "| stage | seconds |", "|---|---:|"]
    # no total row: the keys mix per-stage sums (over parallel workers) with wall-clock spans
    lines += [f"| {_cell(stage)} | {float(s):.2f} |" for stage, s in timings.items()]
    return lines + [""]


def _cell(value: Any) -> str:
    """Text safe inside one Markdown table cell."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _inline(value: Any) -> str:
    return "—" if value is None else " ".join(str(value).split())


def _quote(speaker: str, text: Any) -> list[str]:
    """``text`` as Markdown blockquote lines, led by the speaker's name (line breaks kept)."""
    lines = ("—" if text is None else str(text)).splitlines() or [""]
    return [f"> **{speaker}:** {lines[0]}"] + [f"> {line}" for line in lines[1:]]


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _num(value: Any, digits: int | None = None) -> str:
    """A number as text: ``repr`` (shortest exact form) by default, else ``digits`` significant digits."""
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if digits is not None else repr(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------
# Figures (matplotlib object API on the Agg canvas)
# ---------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _funnel_figure(funnel: list[dict[str, Any]]) -> Any:
    fig = _new_figure(max(6.0, 1.3 * len(funnel) + 2.0), 4.0)
    ax = fig.add_subplot()
    x = np.arange(len(funnel))
    width = 0.4
    for offset, key, color in ((-width / 2, "in", "#9bbbd9"), (width / 2, "out", "#2b6ca3")):
        values = [rec[key] for rec in funnel]
        bars = ax.bar(x + offset, values, width, label=key, color=color)
        ax.bar_label(bars, labels=[str(v) for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, [f"{rec['stage']}\n({rec.get('unit', '')})" for rec in funnel], fontsize=8)
    ax.set_ylabel("count")
    ax.set_title("Funnel: in vs. out per stage")
    ax.margins(y=0.15)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.18)
    return fig


def _hist_figure(score: str, values: np.ndarray, threshold: float | None, n_nan: int, mode: Any) -> Any:
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        if threshold is not None:  # keep the threshold line inside the plotted range
            lo, hi = min(lo, threshold), max(hi, threshold)
        ax.hist(values, bins=30, range=(lo, hi) if hi > lo else None, color="#2b6ca3")
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    if threshold is not None:
        ax.axvline(threshold, color="#c0392b", linestyle="--", linewidth=1.5,
                   label=f"applied threshold = {threshold:.4g} ({mode})")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel(_SCORE_LABELS.get(score, score))
    ax.set_ylabel("candidates")
    ax.set_title(f"{score}: {values.size + n_nan} candidates ({values.size} plotted, {n_nan} NaN excluded)",
                 fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.13)
    return fig


def _sweep_figure(sweep: list[dict[str, Any]], applied: dict[str, float | None]) -> Any:
    names = list(dict.fromkeys(r["score"] for r in sweep))
    fig = _new_figure(5.0 * max(1, len(names)), 3.6)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        rs = [r for r in sweep if r["score"] == name]
        x = [r["threshold"] for r in rs]
        for key, color in (("precision", "#2b6ca3"), ("recall", "#e67e22"), ("f1", "#27ae60")):
            ax.plot(x, [r[key] for r in rs], label=key, color=color)
        if applied.get(name) is not None:
            ax.axvline(applied[name], color="#c0392b", linestyle="--", linewidth=1.2, label="applied")
        ax.set_xlabel(_SCORE_LABELS.get(name, name))
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name}: kept vs oracle good", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.16, wspace=0.25)
    return fig


def _verdict_figure(scores: dict[str, np.ndarray], good: np.ndarray, applied: dict[str, float | None]) -> Any:
    fig = _new_figure(5.0 * max(1, len(scores)), 3.6)
    for i, (name, values) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), i + 1)
        ok = np.isfinite(values)
        if ok.any():
            lo, hi = float(values[ok].min()), float(values[ok].max())
            ax.hist([values[ok & good], values[ok & ~good]], bins=25, range=(lo, hi) if hi > lo else None,
                    stacked=True, color=["#27ae60", "#c0392b"], label=["oracle: good", "oracle: not good"])
        if applied.get(name) is not None:
            ax.axvline(applied[name], color="black", linestyle="--", linewidth=1.2, label="applied")
        ax.set_xlabel(_SCORE_LABELS.get(name, name))
        ax.set_ylabel("candidates")
        ax.legend(fontsize=7, loc="upper left")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.16, wspace=0.25)
    return fig


def _samples_figure(rows: list[dict[str, Any]]) -> Any:
    fig = _new_figure(12.0, 2.8 * len(rows))
    # fixed margins (tight_layout would draw the figure twice); 0.35 in. above each row for its titles
    grid = fig.add_gridspec(len(rows), 3, width_ratios=[1.0, 1.0, 2.4], left=0.01, right=0.99, bottom=0.01,
                            top=1.0 - 0.35 / (2.8 * len(rows)), hspace=0.35 / 2.45, wspace=0.05)
    for i, row in enumerate(rows):
        for j, (key, title) in enumerate(((schema.INPUT_IMAGE, "source"), (schema.TARGET_IMAGE, "target"))):
            ax = fig.add_subplot(grid[i, j])
            ax.set_axis_off()
            image = row.get(key)
            if image is None:
                ax.text(0.5, 0.5, f"no {title} image", ha="center", va="center", transform=ax.transAxes)
            else:
                thumb = image.convert("RGB")
                thumb.thumbnail((_THUMB, _THUMB))
                ax.imshow(np.asarray(thumb))
            ax.set_title(f"{title} · {_short_id(row[schema.ID])}" if j == 0 else title, fontsize=8)
        ax = fig.add_subplot(grid[i, 2])
        ax.set_axis_off()
        text = "\n".join([
            f"instruction: {_inline(row.get(schema.INSTRUCTION))}   [{_inline(row.get(schema.CLASS))}]", "",
            *_wrap("User: ", row.get(schema.USER_TEXT)), "",
            *_wrap("Assistant: ", row.get(schema.ASSISTANT_TEXT)),
        ])
        ax.text(0.0, 1.0, text, ha="left", va="top", fontsize=8, family="monospace", transform=ax.transAxes)
    return fig


def _short_id(row_id: Any) -> str:
    """A row id short enough for a figure title (report.md carries the full id)."""
    text = str(row_id)
    return text if len(text) <= 16 else text[:12] + "…"


def _wrap(prefix: str, text: Any) -> list[str]:
    lines = textwrap.wrap(prefix + _inline(text), width=_WRAP, subsequent_indent=" " * len(prefix))
    if len(lines) > _MAX_TEXT_LINES:
        lines = lines[:_MAX_TEXT_LINES]
        lines[-1] = lines[-1][: _WRAP - 1] + "…"
    return lines


def _save_figure(fig: Any, report: Storage, name: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    report.write_bytes(name, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# IO
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Shards:
    """One table of a build output (``OUT/<name>/data/*.parquet``), read lazily through its shards."""

    storage: Storage
    keys: list[str]
    schema: pa.Schema
    num_rows: int

    @classmethod
    def open(cls, storage: Storage, name: str) -> "_Shards | None":
        """The table ``name``, or ``None`` when ``OUT/<name>/`` is absent; zero shards are an empty table.

        Only the footers are read: the schema (of the first shard; the table's schema when there are no
        shards) and the row counts.
        """
        if not storage.exists(name):
            return None
        keys = parquet_shards(storage, name)
        num_rows, arrow_schema = 0, _DEFAULT_SCHEMAS[name]()
        for i, key in enumerate(keys):
            with open_parquet(storage, key) as f:
                num_rows += f.metadata.num_rows
                if i == 0:
                    arrow_schema = f.schema_arrow
        return cls(storage, keys, arrow_schema, num_rows)

    def batches(self, columns: list[str], batch_size: int = _BATCH) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` over every shard in order (a shard lacking a column is an error)."""
        for key in self.keys:
            with open_parquet(self.storage, key) as f:
                yield from f.iter_batches(batch_size=batch_size, columns=columns)


_DEFAULT_SCHEMAS = {
    "candidates": lambda: schema.arrow_schema("candidates"),
    "quarantine": lambda: schema.arrow_schema("quarantine"),
    "dataset": lambda: schema.dataset_features(False).arrow_schema,
}


def _first_by_id(kept: _Shards, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of ``kept`` by id, decoded (PIL images).

    Two passes: the id column, streamed, keeps the ``n`` smallest (id, shard, row); then only those rows are
    read, ``_SAMPLE_BATCH`` rows at a time from the row groups that hold them.
    """
    import pyarrow.compute as pc

    best: list[tuple[str, int, int]] = []
    for shard, key in enumerate(kept.keys):
        offset = 0
        with open_parquet(kept.storage, key) as f:
            for batch in f.iter_batches(batch_size=_BATCH, columns=[schema.ID]):
                k = min(n, batch.num_rows)
                if k:
                    idx = pc.select_k_unstable(batch, k, sort_keys=[(schema.ID, "ascending")]).to_pylist()
                    ids = batch.column(0)
                    best = heapq.nsmallest(n, best + [(ids[j].as_py(), shard, offset + j) for j in idx
                                                      if ids[j].is_valid])
                offset += batch.num_rows
    wanted = [c for c in schema.DATASET_COLUMNS if c in kept.schema.names]
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for shard in sorted({s for _, s, _ in best}):
        rows = sorted(r for _, s, r in best if s == shard)
        found.update({(shard, r): row for r, row in _read_rows(kept.storage, kept.keys[shard], rows, wanted).items()})
    return [_decode_images(found[(shard, row)]) for _, shard, row in best]


def _read_rows(storage: Storage, key: str, rows: list[int], columns: list[str]) -> dict[int, dict[str, Any]]:
    """Rows ``rows`` (sorted indices into the shard) of ``columns``, reading only the row groups holding them."""
    out: dict[int, dict[str, Any]] = {}
    with open_parquet(storage, key) as f:
        start = 0
        for rg in range(f.metadata.num_row_groups):
            stop = start + f.metadata.row_group(rg).num_rows
            here = [r for r in rows if start <= r < stop]
            if here:
                pos = start
                for batch in f.iter_batches(batch_size=_SAMPLE_BATCH, row_groups=[rg], columns=columns):
                    for r in here:
                        if pos <= r < pos + batch.num_rows:
                            out[r] = batch.slice(r - pos, 1).to_pylist()[0]
                    pos += batch.num_rows
                    if pos > here[-1]:
                        break
            start = stop
    return out


def _decode_images(row: dict[str, Any]) -> dict[str, Any]:
    """Replace the HF ``Image`` cells (``{"bytes", "path"}``) of a row with PIL images."""
    from PIL import Image

    for key in (schema.INPUT_IMAGE, schema.TARGET_IMAGE):
        cell = row.get(key)
        if cell is None:
            continue
        if cell.get("bytes") is not None:
            image = Image.open(io.BytesIO(cell["bytes"]))
        elif cell.get("path"):
            image = Image.open(cell["path"])
        else:
            row[key] = None
            continue
        image.load()
        row[key] = image
    return row
