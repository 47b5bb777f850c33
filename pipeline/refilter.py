"""``cafe refilter``: re-apply the rules to a built dataset's stored scores — nothing is recomputed.

Usage::

    result = refilter("outputs/tiny", ["build.rules.clip_t_min=0.25"], out_dir="outputs/tiny-ct025")
    print(result.summary())

Reads the scores of ``SRC/candidates`` (every scored row), applies ``build.rules`` from the source build's config
plus the overrides (only ``build.rules.*`` and ``build.report_samples`` may change: anything else would change
the data), and writes a new output directory in the build's layout (:mod:`training.data.schema`):

* ``NEW/candidates/data/<chunk>.parquet`` — SRC's candidate shards with the new ``keep`` / ``filter_reason``;
* ``NEW/dataset/data/train-<chunk>.parquet`` — the rows of SRC's dataset shards that pass the new rules, copied
  (images byte-identical), plus the dataset card (:func:`pipeline.build.write_dataset_card`);
* ``NEW/quarantine/`` — SRC's quarantine shards, copied;
* ``NEW/manifest.json`` (with ``refiltered_from``), ``NEW/report/``, ``NEW/_SUCCESS`` (last).

Quantile thresholds are computed over all candidates. Dialogue and images exist only for rows that passed the
rules at build time, so a *looser* rule can admit rows that have neither: they are counted as
``pending_dialogue`` in the funnel (a row whose dialogue was rejected at build time keeps its quarantine reason
instead) and left out; the summary gives the ``cafe build`` command that completes them on the ORIGINAL output
(a rules change there recomputes only rules + dialogue). A quantile rule is given to that build as the absolute
thresholds it resolved to here, since a build applies quantiles per chunk.

Memory: the two score columns of all candidates (for the quantiles), then one chunk's shards at a time — the
same per-chunk footprint as the build's sink. The dataset hash is computed as the build computes it, so a
refilter without pending rows has the hash of a build with the same rules.

Safety: ``--out`` must lie outside SRC (and not contain it); an existing non-empty ``--out`` is refused unless it
is an earlier refilter of the same SRC (its manifest's ``refiltered_from``), which is then replaced. SRC and OUT
are local directories or URIs (``s3://…``), in any mix. Locally the new output is written to a hidden sibling
directory and renamed into place, so a failed refilter leaves an earlier output as it was. An object store has no
rename: there ``_SUCCESS`` is removed first, the earlier output's tables are deleted, the new ones written, and
``_SUCCESS`` written last — readers that require it never see a half-written output.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import CafeConfig, load_config_dict
from pipeline.stages import write_dataset_shard
from pipeline.store import Storage, open_parquet, parquet_shards, table_hash
from training.data import schema as S

log = logging.getLogger(__name__)

#: ``--set`` keys a refilter accepts (a key equal to one of these or below it)
ALLOWED_OVERRIDES = ("build.rules", "build.report_samples")
#: funnel stages copied from the source build (their inputs are not re-examined)
_UPSTREAM_STAGES = ("sources", "generate", "score")
PENDING_DIALOGUE = "pending_dialogue"


@dataclass
class RefilterResult:
    out_dir: str  # a local directory or a URI
    manifest: dict
    sweep: list[str] | None = None  # the threshold sweep against the world's oracle (Markdown lines), if judged

    def summary(self) -> str:
        from pipeline.report import funnel_text

        m, c = self.manifest, self.manifest["counts"]
        lines = [funnel_text(m),
                 f"kept {c['kept']} of {c['candidates']} candidates ({c[PENDING_DIALOGUE]} pass the rules but have "
                 "no dialogue)",
                 f"dataset: {self.out_dir}/dataset   (datasets.load_dataset / ray.data.read_parquet)",
                 f"report:  {self.out_dir}/report/report.md"]
        if self.sweep:
            lines += ["threshold sweep against the oracle (precision/recall/F1 of kept vs good):", *self.sweep]
        if c[PENDING_DIALOGUE]:
            lines += [f"PENDING DIALOGUE: {c[PENDING_DIALOGUE]} row(s) pass the new rules but were filtered out at "
                      f"build time, so {m['refiltered_from']} has no images or dialogue for them; they are not in "
                      "this dataset. To complete them, re-run the build on the original output with these rules "
                      "(only rules + dialogue are recomputed):",
                      f"  {m['rebuild_command']}"]
        return "\n".join(lines)


def refilter(dataset_dir: str | os.PathLike, overrides: list[str] | None,
             out_dir: str | os.PathLike) -> RefilterResult:
    """Apply (overridden) rules to the stored scores of ``dataset_dir``; write the result to ``out_dir``.

    Usage: ``refilter("outputs/tiny", ["build.rules.mode=quantile"], "outputs/tiny-q")``

    Args:
        dataset_dir: output directory of a complete ``cafe build`` (or of an earlier refilter).
        overrides: ``build.rules.<key>=<value>`` items (YAML values), as ``cafe refilter --set``.
        out_dir: new output directory: absent, empty, or an earlier refilter of ``dataset_dir`` (replaced).

    Returns:
        The output directory and its manifest.

    Raises:
        FileNotFoundError: ``dataset_dir`` is not a build output.
        ValueError: ``out_dir`` is refused (see the module docstring), an override is outside
            :data:`ALLOWED_OVERRIDES`, the source build is incomplete, or a dataset shard has no candidates.
        pipeline.config.ConfigError: the overridden config is invalid.
    """
    from pipeline.report import load_manifest, write_report

    t0 = time.perf_counter()
    src, out = _check_locations(Storage(dataset_dir), Storage(out_dir))
    old = load_manifest(src.uri)
    if old.get("status") == "incomplete":
        raise ValueError(f"refilter: {src.uri} is an incomplete build (manifest status 'incomplete'); re-run its "
                         "`cafe build` until it completes, then refilter (quantiles need every candidate)")
    _check_overrides(overrides)
    cfg = load_config_dict(old["config"], f"{src.uri_of('manifest.json')}#config", overrides)  # before any work

    owner = uuid.uuid4().hex[:12]
    if out.is_local:
        tmp = Path(out.root).parent / f".{Path(out.root).name}.refilter-{owner}"
        try:
            manifest = _write(src, Storage(tmp, owner=owner), old, cfg, list(overrides or []))
            manifest["timings_s"] = {"refilter_wall": round(time.perf_counter() - t0, 3)}
            Storage(tmp, owner=owner).write_json("manifest.json", manifest)
            _move_into_place(tmp, Path(out.root))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only left on failure: the success path renamed it
    else:  # no rename on an object store: unpublish, clear, write, publish (_SUCCESS last)
        out = Storage(out.uri, owner=owner)
        out.delete("_SUCCESS")
        out.delete("manifest.json")
        for table in ("candidates", "dataset", "quarantine", "report"):
            out.delete_dir(table)
        manifest = _write(src, out, old, cfg, list(overrides or []))
        manifest["timings_s"] = {"refilter_wall": round(time.perf_counter() - t0, 3)}
        out.write_json("manifest.json", manifest)
    write_report(out.uri, max_samples=cfg.build.report_samples)
    Storage(out.uri, owner=owner).write_bytes("_SUCCESS", b"")
    log.info("refilter: %s -> %s: kept %d of %d candidates, %d pending dialogue", src, out,
             manifest["counts"]["kept"], manifest["counts"]["candidates"], manifest["counts"][PENDING_DIALOGUE])
    from pipeline.report import oracle_sweep

    return RefilterResult(out.uri, manifest, sweep=oracle_sweep(out.uri))


# ------------------------------------------------------------------------------------------------ checks


def _check_locations(src: Storage, out: Storage) -> tuple[Storage, Storage]:
    """Both locations; refuse an ``out`` that would overwrite SRC or another build."""
    import pyarrow.fs as pafs

    if not src.is_file("manifest.json") or src.fs.get_file_info(src.path("candidates")).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"refilter: {src.uri} is not a build output (needs manifest.json and candidates/)")
    s, o = src.uri.rstrip("/"), out.uri.rstrip("/")
    if o == s or o.startswith(s + "/"):
        raise ValueError(f"refilter --out {out.uri}: is the dataset directory {src.uri} or inside it; choose a "
                         "directory outside it")
    if s.startswith(o + "/"):
        raise ValueError(f"refilter --out {out.uri}: contains the dataset directory {src.uri}; choose another "
                         "directory")
    if out.fs.get_file_info(out.root).type == pafs.FileType.File:
        raise ValueError(f"refilter --out {out.uri}: exists and is not a directory")
    if out.fs.get_file_info(pafs.FileSelector(out.root, allow_not_found=True)):  # anything in it
        origin = _refiltered_from(out)
        if origin is None or Storage(origin).uri.rstrip("/") != s:
            what = (f"a refilter of {origin}" if origin is not None
                    else "not a refilter output (its manifest.json records no refiltered_from)")
            raise ValueError(f"refilter --out {out.uri}: exists, is not empty and is {what}; refusing to overwrite "
                             f"it. Choose another --out, or delete it first (only an earlier refilter of {src.uri} "
                             "is replaced)")
    return src, out


def _refiltered_from(out: Storage) -> str | None:
    try:
        manifest = out.read_json("manifest.json")
    except (OSError, ValueError):
        return None
    origin = manifest.get("refiltered_from") if isinstance(manifest, dict) else None
    return origin if isinstance(origin, str) else None


def _check_overrides(overrides: list[str] | None) -> None:
    for item in overrides or []:
        key = str(item).split("=", 1)[0].strip()
        if not any(key == a or key.startswith(a + ".") for a in ALLOWED_OVERRIDES):
            raise ValueError(f"refilter --set {item!r}: only {', '.join(k + '.*' for k in ALLOWED_OVERRIDES)} can "
                             "change in a refilter (other settings change the data: run `cafe build` for them)")


# ------------------------------------------------------------------------------------------------ work


def _chunk_of(key: str, prefix: str = "") -> str:
    """``dataset/data/train-000003.parquet`` → ``000003`` (``prefix`` = ``train-``)."""
    return key.rsplit("/", 1)[-1].removesuffix(".parquet").removeprefix(prefix)


def _write(src: Storage, new: Storage, old: dict, cfg: CafeConfig, overrides: list[str]) -> dict:
    """Write every table and the dataset card into ``new``; return the manifest (not yet written)."""
    from filtering.rules import apply_rules, count_reasons
    from pipeline.build import write_dataset_card

    cand_keys = parquet_shards(src, "candidates")
    chunks = [_chunk_of(k) for k in cand_keys]
    data_keys = {_chunk_of(k, "train-"): k for k in parquet_shards(src, "dataset")}
    orphans = sorted(set(data_keys) - set(chunks))
    if orphans:
        raise ValueError(f"refilter: {src.uri}/dataset has shards of chunk(s) {orphans[:5]} but candidates/ has none "
                         "(not a complete build output)")

    # pass 1: the two score columns of every candidate, for the rule (quantiles over all candidates)
    sizes, clip_t, dino = [], [], []
    for key in cand_keys:
        t = src.read_parquet(key, columns=[S.CLIP_T, S.DINO])
        sizes.append(t.num_rows)
        clip_t.append(np.asarray(t.column(S.CLIP_T).to_numpy(), dtype=np.float64))  # nulls -> NaN
        dino.append(np.asarray(t.column(S.DINO).to_numpy(), dtype=np.float64))
    empty = np.zeros(0, dtype=np.float64)
    decision = apply_rules({S.CLIP_T: np.concatenate(clip_t) if clip_t else empty,
                            S.DINO: np.concatenate(dino) if dino else empty}, cfg.build.rules)

    # pass 2, chunk by chunk: candidates with the new decision, dataset rows that pass, dialogue outcomes
    for table in ("candidates", "dataset", "quarantine"):
        new.fs.create_dir(new.path(f"{table}/data"), recursive=True)  # zero shards is still a table
    h = hashlib.sha256()
    kept = dataset_bytes = pending = 0
    dialogue_removed: dict[str, int] = {}
    offset = 0
    for chunk, key, n in zip(chunks, cand_keys, sizes):
        keep = np.asarray(decision.keep[offset:offset + n], dtype=bool)
        reason = decision.reason[offset:offset + n]
        offset += n
        cand = src.read_parquet(key)
        cand = cand.set_column(cand.schema.get_field_index(S.KEEP), cand.schema.field(S.KEEP), pa.array(keep))
        cand = cand.set_column(cand.schema.get_field_index(S.FILTER_REASON), cand.schema.field(S.FILTER_REASON),
                               pa.array(list(reason), pa.string()))
        new.write_parquet(f"candidates/data/{chunk}.parquet", cand)
        passing = cand.column(S.ID).filter(pa.array(keep))

        present = pa.array([], pa.string())
        if chunk in data_keys:
            rows = _filtered_rows(src, data_keys[chunk], passing)
            dataset_bytes += write_dataset_shard(new, chunk, rows)
            h.update(f"{chunk}:{table_hash(rows)}\n".encode())  # as pipeline.build._aggregate
            kept += rows.num_rows
            present = rows.column(S.ID)
        missing = pc.filter(passing, pc.invert(pc.is_in(passing, value_set=present))).to_pylist()
        rejected = _dialogue_rejections(src, f"quarantine/data/{chunk}.parquet")
        for row_id in missing:
            if row_id in rejected:  # its dialogue was rejected at build time: keeps that reason
                dialogue_removed[rejected[row_id]] = dialogue_removed.get(rejected[row_id], 0) + 1
            else:
                pending += 1

    quarantined = 0
    for key in parquet_shards(src, "quarantine"):
        data = src.read_bytes(key)
        new.write_bytes(key, data)
        with open_parquet(src, key) as f:
            quarantined += f.metadata.num_rows

    n_pass = int(np.count_nonzero(decision.keep))
    if pending:
        dialogue_removed[PENDING_DIALOGUE] = pending
    upstream = [rec for rec in old.get("funnel", []) if rec["stage"] in _UPSTREAM_STAGES]
    funnel = upstream + [
        {"stage": "rules", "unit": "rows", "in": int(decision.keep.size), "out": n_pass,
         "removed": {r: c for r, c in count_reasons(decision).items() if r != "kept" and c}},
        {"stage": "dialogue", "unit": "rows", "in": n_pass, "out": kept, "removed": dialogue_removed},
    ]
    manifest = _manifest(old, cfg, overrides, src.uri, decision.thresholds, funnel, {
        "kept": kept, "candidates": int(decision.keep.size), "quarantined": quarantined,
        "dataset_bytes": dataset_bytes, PENDING_DIALOGUE: pending}, h.hexdigest(), len(chunks))
    from pipeline.report import oracle_summary

    oracle = oracle_summary(new.uri)  # the new decisions against the world's oracle (None for real data)
    if oracle is not None:
        manifest["oracle"] = oracle
    else:
        manifest.pop("oracle", None)
    write_dataset_card(new, manifest)
    return manifest


def _filtered_rows(src: Storage, key: str, passing: pa.Array) -> pa.Table:
    """The rows of one dataset shard whose id is in ``passing``, as one contiguous table (its schema kept)."""
    ids = src.read_parquet(key, columns=[S.ID]).column(S.ID)
    mask = pc.is_in(ids, value_set=passing)
    if not pc.any(mask).as_py():  # nothing passes: do not read the images at all
        with open_parquet(src, key) as f:
            return f.schema_arrow.empty_table()
    table = src.read_parquet(key)
    if not pc.all(mask).as_py():
        table = table.filter(mask)
    return table.combine_chunks()  # one chunk, as the sink's table: the same table_hash


def _dialogue_rejections(src: Storage, key: str) -> dict[str, str]:
    """``{row id: reason}`` of the rows one quarantine shard records as rejected by the dialogue stage."""
    if not src.is_file(key):
        return {}
    q = src.read_parquet(key, columns=[S.Q_ID, S.Q_STAGE, S.Q_REASON])
    q = q.filter(pc.equal(q.column(S.Q_STAGE), "dialogue"))
    return dict(zip(q.column(S.Q_ID).to_pylist(), q.column(S.Q_REASON).to_pylist()))


def _manifest(old: dict, cfg: CafeConfig, overrides: list[str], src_dir: str, thresholds: dict, funnel: list,
              counts: dict, dataset_hash: str, num_chunks: int) -> dict:
    from pipeline.build import code_version, stage_keys
    from pipeline.redact import redact_obj

    rules = cfg.build.rules
    applied = {S.CLIP_T: _finite(thresholds["clip_t_min"]), S.DINO: _finite(thresholds["dino_min"])}
    fingerprints = old.get("model_fingerprints") or {}
    keys = stage_keys(cfg, fingerprints)  # rules + dialogue keys of a build with these rules
    changed = [k for k in _UPSTREAM_STAGES if k in (old.get("keys") or {}) and old["keys"][k] != keys.get(k)]
    if changed:
        log.warning("refilter: the %s key(s) computed now differ from the source build's (code or schema changed "
                    "since); the manifest records both (keys, source_keys)", changed)
    original = old.get("original_build") or str(src_dir)
    original_rules = old.get("original_rules") or old["config"]["build"]["rules"]
    manifest = {
        "schema_version": S.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": "complete" if counts[PENDING_DIALOGUE] == 0 else PENDING_DIALOGUE,
        "config_path": old.get("config_path"),
        "config": cfg.model_dump(mode="json"),
        "keys": keys,
        "config_hash": keys["dialogue"],
        "model_fingerprints": fingerprints,
        "code_version": old.get("code_version"),
        "refilter_code_version": code_version(),
        "license": old.get("license"), "license_link": old.get("license_link"),
        "funnel": funnel,
        "rules": {"mode": rules.mode, "clip_t_min": rules.clip_t_min, "dino_min": rules.dino_min,
                  "clip_t_quantile": rules.clip_t_quantile, "dino_quantile": rules.dino_quantile,
                  "thresholds": {k: v for k, v in applied.items() if v is not None}},
        "counts": counts,
        "pending": old.get("pending", 0),
        "dataset_hash": dataset_hash,
        "timings_s": {},
        "num_chunks": old.get("num_chunks", num_chunks),
        "refiltered_from": str(src_dir),
        "source_dataset_hash": old.get("dataset_hash"),
        "source_keys": old.get("keys"),
        "overrides": overrides,
        "original_build": original,
        "original_rules": original_rules,
        "rebuild_command": _rebuild_command(old.get("config_path"), original, original_rules, rules, applied),
    }
    return redact_obj(manifest)


def _rebuild_command(config_path: str | None, original: str, original_rules: dict, rules, applied: dict) -> str:
    """The ``cafe build`` that completes pending rows: the original output, these rules as ``--set`` items.

    A quantile rule becomes the absolute thresholds it resolved to over all candidates (a build would apply
    quantiles per chunk).
    """
    if rules.mode == "quantile":
        target = {"mode": "absolute", "clip_t_min": applied[S.CLIP_T], "dino_min": applied[S.DINO]}
    else:
        target = {k: getattr(rules, k) for k in ("mode", "clip_t_min", "dino_min", "clip_t_quantile", "dino_quantile")}
    sets = [f"build.rules.{k}={v!r}" if isinstance(v, float) else f"build.rules.{k}={v}"
            for k, v in target.items() if v is not None and original_rules.get(k) != v]
    config = shlex.quote(config_path) if config_path else "CONFIG.yaml"
    return " ".join(["cafe", "build", config, "--out", shlex.quote(original),
                     *(f"--set {shlex.quote(s)}" for s in sets)])


def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (already checked: empty or ours) is moved aside, then removed."""
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(out, aside)
    os.replace(tmp, out)
    if aside is not None:
        shutil.rmtree(aside)
