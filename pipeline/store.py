"""Storage for builds: atomic writes, the per-chunk stage ledger, and publishing in the HF ``datasets`` layout.

Usage::

    store = ChunkStore(out_dir / "_work")
    if not store.done("generate", chunk_id):
        store.commit("generate", chunk_id, rows_table, quarantine_table, counts)
    publish(out_dir, store, chunk_ids)                    # → OUT/dataset, OUT/candidates, OUT/quarantine

Exactly-once: a stage's output for a chunk is written to a temporary directory and renamed into place in one
``os.rename`` — a chunk/stage is either absent or complete, never half-written. Re-running skips every
committed chunk/stage and recomputes the rest with the same chunk composition and seeds, so a killed run
resumes without duplicates or gaps. Work files are Arrow IPC streams (what HF ``.arrow`` files are), read
back memory-mapped by :func:`datasets.Dataset.from_file` when publishing, so memory stays bounded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from pipeline import schema as S


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all()


def empty_table(kind: str) -> pa.Table:
    return S.arrow_schema(kind).empty_table()


class ChunkStore:
    """``<work>/<stage>/<chunk_id>/{rows.arrow, quarantine.arrow, counts.json}``, committed by rename."""

    def __init__(self, work_dir: str | os.PathLike):
        self.work = Path(work_dir)

    def chunk_dir(self, stage: str, chunk_id: str) -> Path:
        return self.work / stage / chunk_id

    def done(self, stage: str, chunk_id: str) -> bool:
        return (self.chunk_dir(stage, chunk_id) / "counts.json").is_file()

    def commit(self, stage: str, chunk_id: str, rows: pa.Table, quarantine: pa.Table, counts: dict) -> None:
        final = self.chunk_dir(stage, chunk_id)
        if self.done(stage, chunk_id):
            return  # another attempt committed it first: outputs are deterministic, keep the first
        tmp = final.parent / f".{chunk_id}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        write_arrow(tmp / "rows.arrow", rows.cast(S.arrow_schema("pairs")))
        write_arrow(tmp / "quarantine.arrow", quarantine.cast(S.arrow_schema("quarantine")))
        (tmp / "counts.json").write_text(json.dumps(counts, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:  # lost a race with a retried attempt of the same chunk: identical content
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.done(stage, chunk_id):
                raise

    def rows(self, stage: str, chunk_id: str) -> pa.Table:
        return read_arrow(self.chunk_dir(stage, chunk_id) / "rows.arrow")

    def quarantine(self, stage: str, chunk_id: str) -> pa.Table:
        return read_arrow(self.chunk_dir(stage, chunk_id) / "quarantine.arrow")

    def counts(self, stage: str, chunk_id: str) -> dict:
        return json.loads((self.chunk_dir(stage, chunk_id) / "counts.json").read_text())

    def clean_tmp(self) -> None:
        """Remove temporary directories left by killed attempts."""
        if self.work.is_dir():
            for stage_dir in self.work.iterdir():
                if stage_dir.is_dir():
                    for tmp in stage_dir.glob(".*.tmp-*"):
                        shutil.rmtree(tmp, ignore_errors=True)


def quarantine_table(records: Iterable[dict]) -> pa.Table:
    records = list(records)
    cols = {c: [None if r.get(c) is None else str(r.get(c)) for r in records] for c in S.QUARANTINE_COLUMNS}
    return pa.table(cols, schema=S.arrow_schema("quarantine"))


def _image_cell(png: bytes | None) -> dict | None:
    return None if png is None else {"bytes": png, "path": None}


def _published_rows(store: "ChunkStore", stage: str, chunk_ids: list[str], with_decision: bool):
    """Yield published rows chunk by chunk (chunk order, then id order): memory holds one chunk at a time."""
    cols = S.CANDIDATE_COLUMNS if with_decision else S.DATASET_COLUMNS
    for cid in chunk_ids:
        table = store.rows(stage, cid).sort_by(S.ID)
        for r in table.to_pylist():
            if not with_decision and not (r[S.KEEP] and r[S.USER_TEXT] is not None):
                continue
            r[S.INPUT_IMAGE], r[S.TARGET_IMAGE] = _image_cell(r[S.SOURCE_PNG]), _image_cell(r[S.TARGET_PNG])
            yield {c: r[c] for c in cols}


def _build_dataset(rows, features, kind: str, cache_dir: Path):
    """Stream rows into a ``datasets.Dataset`` (written to an Arrow cache in batches, then memory-mapped)."""
    import datasets

    from datasets.arrow_writer import ArrowWriter

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{kind}.arrow"
    with ArrowWriter(features=features, path=str(path), writer_batch_size=256) as writer:
        for row in rows:
            writer.write(row)
        writer.finalize()
    info = datasets.DatasetInfo(features=features,
                                description=json.dumps({"schema_version": S.SCHEMA_VERSION, "kind": kind}))
    return datasets.Dataset.from_file(str(path), info=info)


def save_dataset(ds, path: Path) -> None:
    """``save_to_disk`` into a temporary sibling, then swap it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    # an empty dataset saved with the default sharding has zero shards, which load_from_disk cannot read
    ds.save_to_disk(str(tmp), num_shards=1 if len(ds) == 0 else None)
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)


def content_hash(table: pa.Table) -> str:
    """sha256 of a table's content in its stored order (batch by batch, so a memory-mapped table stays mapped)."""
    h = hashlib.sha256()
    for batch in table.to_batches(max_chunksize=256):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def publish(out_dir: Path, store: ChunkStore, final_stage: str, stages: Iterable[str], chunk_ids: list[str]) -> dict:
    """Assemble the committed chunks into ``OUT/dataset``, ``OUT/candidates`` and ``OUT/quarantine``.

    Rows are published in chunk order, then id order, streamed one chunk at a time. Returns counts and the
    dataset content hash.
    """
    import datasets

    tmp = out_dir / f".publish-{uuid.uuid4().hex[:8]}"
    try:
        dataset = _build_dataset(_published_rows(store, final_stage, chunk_ids, False),
                                 S.dataset_features(False), "dataset", tmp)
        candidates = _build_dataset(_published_rows(store, final_stage, chunk_ids, True),
                                    S.dataset_features(True), "candidates", tmp)
        save_dataset(dataset, out_dir / "dataset")
        save_dataset(candidates, out_dir / "candidates")
        quarantine = [store.quarantine(stage, c) for stage in stages for c in chunk_ids if store.done(stage, c)]
        quarantine = pa.concat_tables(quarantine) if quarantine else empty_table("quarantine")
        save_dataset(datasets.Dataset(quarantine), out_dir / "quarantine")
        return {
            "counts": {"kept": len(dataset), "candidates": len(candidates), "quarantined": quarantine.num_rows},
            "dataset_hash": content_hash(dataset.data.table),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
