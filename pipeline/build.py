"""``cafe build``: the round-0 CAFE dataset construction as one streaming Ray Data pipeline (SPEC §1, §4.5, D4).

Usage::

    result = run_build(load_config("configs/tiny.yaml"), out_dir="outputs/tiny")
    print(result.summary())

Graph (every arrow a Ray Data ``map_batches`` over chunk ids, each stage its own actor pool)::

    plan (driver) → sources → generate (ProFusion) → score_clip_t → score_dino → score_clip_i
                  → rules + dialogue → publish (driver: HF datasets, manifest, report)

The unit of streaming and of resume is a *chunk*: a fixed group of whole sources (all k rows of a source
stay together, so ProFusion fine-tunes once per source) of about ``build.rows_per_chunk`` rows. Chunk
composition, row ids and seeds are fixed by the plan, so a re-run after a kill recomputes exactly the
uncommitted chunk/stages and produces the same bytes (see :mod:`pipeline.store`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import schema as S
from pipeline.config import ROLE_NAMES, CafeConfig
from pipeline.stages import DialogueStage, GenerateStage, ScoreStage, SourcesStage, stable_int
from pipeline.store import ChunkStore, atomic_write_bytes, atomic_write_json, publish

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
PIPELINE_STAGES = ("sources", "generate", "score_clip_t", "score_dino", "score_clip_i", "dialogue")
FUNNEL_ORDER = ("sources", "generate", "score_clip_t", "score_dino", "score_clip_i", "rules", "dialogue")


class BuildConflict(ValueError):
    """The output directory holds a build of a different config."""


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict

    def summary(self) -> str:
        from pipeline.report import funnel_text

        c = self.manifest["counts"]
        return "\n".join([
            funnel_text(self.manifest),
            f"kept {c['kept']} rows · candidates {c['candidates']} · quarantined {c['quarantined']}",
            f"dataset:    {self.out_dir / 'dataset'}   (datasets.load_from_disk)",
            f"quarantine: {self.out_dir / 'quarantine'}",
            f"report:     {self.out_dir / 'report' / 'report.md'}",
        ])


# ------------------------------------------------------------------------------------------------ plan


def _sid(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def enumerate_sources(cfg: CafeConfig) -> list[dict]:
    """Every source as a dict with a deterministic ``source_id``; sorted by id. Nothing is decoded here."""
    from filtering.images import safe_path_text

    src = cfg.build.sources
    sources: list[dict] = []
    if src.kind == "generate":
        for cls in src.classes:
            for i in range(src.num_per_class):
                sid = _sid("generate", cls, i, cfg.run.seed)
                sources.append({"source_id": sid, "kind": "generate", "class_name": cls,
                                "uri": f"generate://{cls}/{i}"})
    elif src.kind == "folder":
        root = Path(src.path)
        if not root.is_dir():
            raise FileNotFoundError(f"build.sources.path = {src.path}: not a directory")
        entries = _manifest_entries(root, src.manifest) if src.manifest else _folder_entries(root)
        for rel, cls in entries:
            path = os.path.join(os.fsdecode(root), rel)
            source = {"source_id": _sid("file", rel), "kind": "file", "class_name": cls or "",
                      "path": path, "uri": safe_path_text(path)}
            if not cls:
                source["reject"] = ("no_class", "file is not in a class sub-folder and not in a manifest")
            sources.append(source)
    else:  # table
        sources = _table_entries(Path(src.path), src.class_column, src.image_column)
    ids = [s["source_id"] for s in sources]
    if len(set(ids)) != len(ids):
        raise ValueError("build.sources: duplicate source ids (the same file or row listed twice)")
    return sorted(sources, key=lambda s: s["source_id"])


def _folder_entries(root: Path) -> list[tuple[str, str | None]]:
    out = []
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), broot)
            parts = rel.split(b"/")
            if name.startswith(b"."):
                continue
            cls = os.fsdecode(parts[0]) if len(parts) > 1 else None
            out.append((os.fsdecode(rel), cls))
    return out


def _manifest_entries(root: Path, manifest: str) -> list[tuple[str, str | None]]:
    import csv

    mpath = Path(manifest) if Path(manifest).is_absolute() else root / manifest
    if mpath.suffix == ".json":
        items = json.loads(mpath.read_text())
    else:
        with open(mpath, newline="", encoding="utf-8") as f:
            items = list(csv.DictReader(f))
    out = []
    for i, item in enumerate(items):
        if "file" not in item or "class" not in item:
            raise ValueError(f"build.sources.manifest {mpath}: entry {i} needs 'file' and 'class' fields")
        out.append((item["file"], item["class"] or None))
    return out


def _table_entries(path: Path, class_column: str, image_column: str) -> list[dict]:
    import pyarrow.parquet as pq

    from pipeline.store import read_arrow

    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.suffix in (".parquet", ".arrow"))
    if not files:
        raise FileNotFoundError(f"build.sources.path = {path}: no .parquet or .arrow files")
    out = []
    for f in files:
        table = pq.read_table(f, columns=[class_column]) if f.suffix == ".parquet" else read_arrow(f)
        if class_column not in table.column_names:
            raise ValueError(f"build.sources: {f} has no column {class_column!r}")
        for row, cls in enumerate(table[class_column].to_pylist()):
            out.append({"source_id": _sid("table", f.name, row), "kind": "table", "class_name": cls or "",
                        "path": str(f), "row": row, "uri": f"{f}#{row}"})
            if not cls:
                out[-1]["reject"] = ("no_class", f"empty {class_column!r}")
    return out


def make_plan(cfg: CafeConfig, fingerprints: dict[str, str]) -> dict:
    """Chunks of whole sources (≈ ``rows_per_chunk`` rows each) + the hash that identifies this build."""
    sources = enumerate_sources(cfg)
    k = cfg.build.instructions.per_source
    per_chunk = max(1, cfg.build.rows_per_chunk // k)
    chunks = {}
    for i in range(0, len(sources), per_chunk):
        members = sources[i : i + per_chunk]
        cid = f"{i // per_chunk:06d}-{_sid(*[s['source_id'] for s in members])[:8]}"
        chunks[cid] = {"chunk_id": cid, "sources": members}
    identity = {"build": cfg.build.model_dump(mode="json"), "seed": cfg.run.seed, "models": fingerprints}
    build_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"build_hash": build_hash, "num_sources": len(sources), "chunks": chunks}


def used_roles(cfg: CafeConfig) -> list[str]:
    roles = ["t2i", "promptnet", "clip_filter", "dino_filter"]
    if cfg.build.dialogue.backend == "transformers":
        roles.append("dialogue_llm")
    return roles


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        if rev:
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cafe-system")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------------ run


def _stage_graph(ds, cfg: CafeConfig, kw: dict):
    from ray.data import ActorPoolStrategy

    b = cfg.build
    gen_gpus = b.sources.num_gpus_per_actor if b.sources.kind == "generate" else 0
    ds = ds.map_batches(SourcesStage, batch_size=1, compute=ActorPoolStrategy(size=1),
                        num_cpus=b.sources.num_cpus_per_actor, num_gpus=gen_gpus or None, fn_constructor_kwargs=kw)
    ds = ds.map_batches(GenerateStage, batch_size=1, compute=ActorPoolStrategy(size=b.profusion.num_actors),
                        num_cpus=b.profusion.num_cpus_per_actor, num_gpus=b.profusion.num_gpus_per_actor or None,
                        fn_constructor_kwargs=kw)
    for score in ("clip_t", "dino", "clip_i"):
        ds = ds.map_batches(ScoreStage, batch_size=1, compute=ActorPoolStrategy(size=b.scoring.num_actors),
                            num_cpus=b.scoring.num_cpus_per_actor, num_gpus=b.scoring.num_gpus_per_actor or None,
                            fn_constructor_kwargs={**kw, "score": score})
    d = b.dialogue
    llm = d.backend == "transformers"
    ds = ds.map_batches(DialogueStage, batch_size=1,
                        compute=ActorPoolStrategy(size=d.transformers.num_actors if llm else 1),
                        num_cpus=d.num_cpus_per_actor,
                        num_gpus=(d.transformers.num_gpus_per_actor or None) if llm else None,
                        fn_constructor_kwargs=kw)
    return ds


def _aggregate_funnel(store: ChunkStore, chunk_ids: list[str]) -> tuple[list[dict], dict[str, float]]:
    totals: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    stage_of = {"rules": "dialogue"}
    for stage in FUNNEL_ORDER:
        source_stage = stage_of.get(stage, stage)
        for cid in chunk_ids:
            rec = store.counts(source_stage, cid)[stage]
            t = totals.setdefault(stage, {"stage": stage, "unit": rec["unit"], "in": 0, "out": 0, "removed": {}})
            t["in"] += rec["in"]
            t["out"] += rec["out"]
            for reason, n in rec["removed"].items():
                t["removed"][reason] = t["removed"].get(reason, 0) + n
            if stage == source_stage:
                seconds[stage] = seconds.get(stage, 0.0) + rec.get("seconds", 0.0)
    return [totals[s] for s in FUNNEL_ORDER if s in totals], seconds


def run_build(cfg: CafeConfig, out_dir: str | os.PathLike | None = None, address: str | None = None,
              config_path: str | None = None) -> BuildResult:
    """Run (or resume) the round-0 build; return the manifest. See the module docstring."""
    import ray

    from pipeline.local_ray import ray_session
    from pipeline.models import ensure_models
    from training.models.kit import fingerprint

    t_start = time.perf_counter()
    out = Path(out_dir) if out_dir else Path(cfg.run.output_dir) / cfg.run.name
    ensure_models(cfg)
    for role in used_roles(cfg):
        if not cfg.models.role_dir(role).is_dir():
            raise FileNotFoundError(f"models.{role}: {cfg.models.role_dir(role)} does not exist "
                                    "(run `cafe models make-tiny DIR` or point models.root at real weights)")
    fingerprints = {r: fingerprint(cfg.models.role_dir(r)) for r in used_roles(cfg)}
    plan = make_plan(cfg, fingerprints)
    work = out / "_work"
    plan_path = work / "plan.json"
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        if previous["build_hash"] != plan["build_hash"]:
            raise BuildConflict(f"{out} holds a build of another config or other weights "
                                f"(hash {previous['build_hash'][:12]} ≠ {plan['build_hash'][:12]}); "
                                "use another --out or delete it")
        log.info("resuming the build in %s", out)
    atomic_write_json(plan_path, plan)
    (out / "_SUCCESS").unlink(missing_ok=True)
    store = ChunkStore(work)
    store.clean_tmp()
    chunk_ids = sorted(plan["chunks"])
    todo = [c for c in chunk_ids if not store.done("dialogue", c)]
    log.info("build: %d sources in %d chunks; %d chunks to do", plan["num_sources"], len(chunk_ids), len(todo))
    t_pipeline = time.perf_counter()
    if todo:
        with ray_session(cfg.ray, address):
            kw = {"config": cfg.model_dump(mode="json"), "work_dir": str(work.resolve())}
            ds = ray.data.from_items([{"chunk_id": c} for c in todo], override_num_blocks=len(todo))
            done = 0
            for batch in _stage_graph(ds, cfg, kw).iter_batches(batch_size=1, batch_format="numpy"):
                done += len(batch["chunk_id"])
                log.info("build: chunk %s committed (%d/%d)", batch["chunk_id"][0], done, len(todo))
    pipeline_seconds = time.perf_counter() - t_pipeline
    missing = [c for c in chunk_ids if not store.done("dialogue", c)]
    if missing:
        raise RuntimeError(f"build incomplete: {len(missing)} chunk(s) not committed, e.g. {missing[0]}; re-run")

    published = publish(out, store, "dialogue", PIPELINE_STAGES, chunk_ids)
    funnel, stage_seconds = _aggregate_funnel(store, chunk_ids)
    r = cfg.build.rules
    manifest = {
        "schema_version": S.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_path": config_path,
        "config": cfg.model_dump(mode="json"),
        "config_hash": plan["build_hash"],
        "model_fingerprints": fingerprints,
        "code_version": code_version(),
        "funnel": funnel,
        "rules": {"mode": r.mode, "clip_t_min": r.clip_t_min, "dino_min": r.dino_min,
                  "clip_t_quantile": r.clip_t_quantile, "dino_quantile": r.dino_quantile,
                  # quantile thresholds are computed per chunk during a build; `cafe refilter` records global ones
                  "thresholds": {"clip_t": r.clip_t_min, "dino": r.dino_min} if r.mode == "absolute" else {}},
        "counts": published["counts"],
        "dataset_hash": published["dataset_hash"],
        "timings_s": {**{f"stage_{k}": round(v, 3) for k, v in stage_seconds.items()},
                      "pipeline_wall": round(pipeline_seconds, 3),
                      "total_wall": round(time.perf_counter() - t_start, 3)},
        "num_chunks": len(chunk_ids),
    }
    atomic_write_json(out / "manifest.json", manifest)
    try:
        from pipeline.report import write_report

        write_report(out, max_samples=cfg.build.report_samples)
    except Exception as exc:  # noqa: BLE001 - the dataset is valid without its report; say so loudly
        log.error("report failed (the dataset is complete; re-run `cafe report %s`): %s", out, exc)
    atomic_write_bytes(out / "_SUCCESS", b"")
    return BuildResult(out, manifest)
