"""``cafe build``: the round-0 CAFE dataset construction as one streaming Ray Data pipeline (SPEC §1, §4.5, D4).

Usage::

    result = run_build(load_config("configs/tiny.yaml"), out_dir="outputs/tiny")   # or "s3://bucket/prefix"
    print(result.summary())

Graph (:data:`STAGE_GRAPH`; rows travel in Ray Data blocks, one block per chunk)::

    plan (driver, streamed into shards) → sources → generate (ProFusion) → score (CLIP-T, DINO, CLIP-I)
        → rules + dialogue → sink (workers write Parquet shards) → publish (driver: card, manifest, report)

A *chunk* is a fixed group of whole sources (``build.rows_per_chunk`` rows): the unit of resume and of the
sink. What determines the data is apart from how it runs: each stage has a **key** = hash of its own
semantic settings + its inputs' keys (:func:`stage_keys`); actor counts, GPUs, batch sizes, the endpoint URL,
timeouts and report settings are in no key, so changing them resumes. A rules change gives new rules and
dialogue keys only: generation and scores are reused, rules and dialogue recomputed.

Exactly once: generation commits per chunk (parts + marker); the sink commits per chunk (shards + marker);
a re-run skips sunk chunks and generated sources, so after any SIGKILL the result equals an uninterrupted
run's (same dataset hash on CPU) and no sample is generated twice. One driver per output: a lease with a
heartbeat (:class:`pipeline.store.Lease`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import CafeConfig
from pipeline.local_ray import looks_secret
from pipeline.stages import (PLAN_PART_CHUNKS, DialogueStage, GenerateStage, ScoreStage, SourcesStage, distill_checkpoint,
                             plan_part, sink_batch)
from pipeline.store import Lease, Storage, is_uri, join
from training.data import schema as S

log = logging.getLogger(__name__)

FUNNEL_ORDER = ("sources", "generate", "score", "rules", "dialogue")

#: fields that decide how a build runs, never what it produces: in no stage key
OPERATIONAL_FIELDS = frozenset({
    "num_actors", "max_actors", "num_gpus_per_actor", "num_cpus_per_actor", "batch_size", "base_url",
    "timeout_s", "max_concurrency", "max_retries", "backoff_s", "api_key_env", "report_samples",
    "max_chunk_attempts", "lease_ttl_s", "lease_wait_s", "device",
})


class BuildConflict(ValueError):
    """The output holds a build of different sources (another plan)."""


class NoUsableSources(ValueError):
    """Planning found no source a build could use; raised before Ray starts or any model loads."""


@dataclass
class BuildResult:
    out: str
    manifest: dict
    pending: int = 0
    pending_reasons: list[str] = field(default_factory=list)
    computed: dict = field(default_factory=dict)
    report: str | None = None  # the report's location, when it was written

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def summary(self) -> str:
        from pipeline.report import funnel_text

        c = self.manifest["counts"]
        lines = [funnel_text(self.manifest),
                 f"kept {c['kept']} rows · candidates {c['candidates']} · quarantined {c['quarantined']}",
                 f"dataset:    {self.out}/dataset   (datasets.load_dataset / ray.data.read_parquet)",
                 f"quarantine: {self.out}/quarantine"]
        if self.report:
            lines.append(f"report:     {self.report}")
        if self.pending:
            lines.append(f"PENDING: {self.pending} record(s) failed for a transient reason and were not published; "
                         "re-run the same command to retry exactly those")
            lines += [f"  {r}" for r in self.pending_reasons[:5]]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ keys


def _semantic(model, extra_exclude: frozenset = frozenset()) -> dict:
    """A config section without its operational fields (recursively)."""
    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in OPERATIONAL_FIELDS | extra_exclude}
        return d
    return strip(model.model_dump(mode="json"))


def _h(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(cfg: CafeConfig, fingerprints: dict[str, str]) -> dict[str, str]:
    """Each stage's key: its semantic slice of the config + model fingerprints + its input's key."""
    b, m = cfg.build, cfg.models
    role = lambda r: {"fingerprint": fingerprints.get(r), "dtype": m.role_spec(r).dtype}  # noqa: E731
    plan = _h("plan", S.SCHEMA_VERSION, cfg.run.seed, b.round, b.rows_per_chunk, _semantic(b.sources),
              _semantic(b.instructions), role("t2i") if b.sources.kind == "generate" else None)
    if b.round == 0:
        generate = _h("generate", plan, _semantic(b.profusion), role("t2i"), role("promptnet"))
    else:  # the round r−1 models by their weights (never their paths), the base t2i for x_ref, λ, mode
        generate = _h("generate", plan, _semantic(b.distill, frozenset({"mllm", "diffusion"})), role("t2i"),
                      role("clip_cond"), role("dino_cond"), fingerprints.get("distill"),
                      role("llm") if b.distill.mode == "mix" else None)
    score = _h("score", generate, role("clip_filter"), role("dino_filter"),
               *([("oracle", fingerprints.get("oracle"))] if b.scoring.oracle else []))
    rules = _h("rules", score, _semantic(b.rules))
    dialogue = _h("dialogue", rules, _semantic(b.dialogue, frozenset({"transformers"} if b.dialogue.backend != "transformers"
                                                                     else set())),
                  role("dialogue_llm") if b.dialogue.backend == "transformers" else None)
    return {"plan": plan, "generate": generate, "score": score, "rules": rules, "dialogue": dialogue}


def used_roles(cfg: CafeConfig) -> list[str]:
    roles = ["t2i", "promptnet", "clip_filter", "dino_filter"]
    if cfg.build.round >= 1:  # the assistant's frozen encoders (and LLM for mode mix), not PromptNet
        roles = ["t2i", "clip_cond", "dino_cond", "clip_filter", "dino_filter"]
        if cfg.build.distill.mode == "mix":
            roles.append("llm")
    if cfg.build.dialogue.backend == "transformers":
        roles.append("dialogue_llm")
    return roles


def code_version() -> str:
    try:
        cwd = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=cwd).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=cwd).stdout.strip()
        if rev:
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cafe-system")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------------ plan


def write_plan(cfg: CafeConfig, out: Storage, plan_key: str, exclude_uris: list[str]) -> list[str]:
    """Stream the sources into Parquet objects of ``PLAN_PART_CHUNKS`` row groups each, one row group per chunk
    (``_work/plan/<key>/plan-<part>.parquet``); the ``_PLAN.json`` marker is written last.

    Few objects, however many chunks: planning 46,875 chunks on S3 is 46 uploads, not 46,875 PUTs; and a part's
    footer (what a reader keeps in memory) stays small. No process ever holds the whole plan: the driver streams
    row groups out, each actor reads only its chunk's row group (:func:`pipeline.stages.plan_sources`).
    """
    from contextlib import ExitStack

    from pipeline.sources import iter_sources

    marker = f"_work/plan/{plan_key}/_PLAN.json"
    existing = out.read_json(marker)
    if existing is not None:
        return existing["chunks"]
    k = cfg.build.instructions.per_source
    per_chunk = max(1, cfg.build.rows_per_chunk // k)
    chunks: list[str] = []
    buf: list[str] = []
    n = 0
    rejected: dict[str, int] = {}
    schema = pa.schema([("source", pa.string())])
    part = ExitStack()
    writer = None

    def flush():
        nonlocal writer
        if len(chunks) % PLAN_PART_CHUNKS == 0:  # a new part: the previous one is closed (uploaded) first
            part.close()
            sink = part.enter_context(out.writer(f"_work/plan/{plan_key}/{plan_part(len(chunks))}"))
            writer = part.enter_context(pq.ParquetWriter(sink, schema))
        writer.write_table(pa.table({"source": pa.array(buf, pa.string())}), row_group_size=len(buf))
        chunks.append(f"{len(chunks):06d}")  # chunk i: row group i % PLAN_PART_CHUNKS of part i // PLAN_PART_CHUNKS
        buf.clear()

    with part:
        # iter_sources gives every listed input its own id (a second listing of one file is a `duplicate` reject),
        # so no set of ids is kept here: the driver's memory does not grow with the number of sources
        for source in iter_sources(cfg, exclude_uris=exclude_uris):
            buf.append(json.dumps(source, sort_keys=True))
            n += 1
            if source.get("reject"):
                rejected[source["reject"][0]] = rejected.get(source["reject"][0], 0) + 1
            if len(buf) == per_chunk:
                flush()
                if len(chunks) % 1000 == 0:
                    log.info("plan: %d sources in %d chunks so far", n, len(chunks))
        if buf:
            flush()
    if n == sum(rejected.values()):  # nothing usable: no marker, so a fixed input is planned afresh
        where = cfg.build.sources.path or cfg.build.sources.kind
        why = ", ".join(f"{reason}: {count}" for reason, count in sorted(rejected.items())) or "nothing listed"
        raise NoUsableSources(
            f"build.sources ({where}): {n} input(s) listed, none usable ({why}); nothing to build. Check "
            "build.sources.path, build.sources.class_from (a folder needs one sub-folder per class) and "
            "build.sources.exclude")
    out.write_json(marker, {"chunks": chunks, "num_sources": n, "part_chunks": PLAN_PART_CHUNKS})
    return chunks


# ------------------------------------------------------------------------------------------------ run


class ChunkProgress:
    """The build's progress on the console: one line at the first chunk, then every ``total/20`` chunks or 60 s,
    and at the last — chunks done, rows kept, rate and ETA (each chunk's own line is at DEBUG)."""

    def __init__(self, total: int, every_s: float = 60.0):
        self.total, self.every_s = total, every_s
        self.step = max(1, total // 20)
        self.done = self.kept = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, kept: int) -> None:
        self.done += 1
        self.kept += kept
        now = time.perf_counter()
        if self.done in (1, self.total) or self.done % self.step == 0 or now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.t0, 1e-9)  # chunks per second
        left = (self.total - self.done) / rate if self.done < self.total else 0.0
        return (f"build: {self.done}/{self.total} chunks ({self.done / self.total:.0%}), {self.kept} rows kept, "
                f"{rate * 60:.1f} chunks/min, {'done' if not left else 'ETA ' + _duration(left)}")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


#: Stage actors restart and their tasks retry without a cap: a preemption or a node loss is an infrastructure fault,
#: never the data's. That is Ray Data's default for actor pools (``max_restarts=-1``, ``max_task_retries=-1``,
#: ``ActorPoolMapOperator``), so the graph passes nothing (Ray 2.60 deprecates both ``**ray_remote_args`` and
#: ``ray_remote_args_fn``). A chunk that keeps killing its worker is stopped by the generation ledger instead
#: (``build.max_chunk_attempts`` attempts of one run on nodes that stayed up, then ``worker_crashed``).


def _pool(section, default_min: int = 1):
    """An autoscaling actor pool from a config section's ``num_actors`` (min) and ``max_actors`` (max)."""
    from ray.data import ActorPoolStrategy

    min_size = getattr(section, "num_actors", default_min)
    max_size = max(min_size, getattr(section, "max_actors", None) or min_size)
    return ActorPoolStrategy(min_size=min_size, max_size=max_size)


def stage_graph(ds, cfg: CafeConfig, kw: dict, env: dict[str, str] | None = None,
                eager: dict[str, bool] | None = None):
    """The build's Ray Data graph, declared once: (stage, callable, pool, resources).

    ``eager``: stages whose actors load their models at start (overlapping upstream work) because some chunk
    to do still needs them; the others load lazily, so a resume with everything generated never loads ProFusion.
    ``env``: the non-secret variables of ``ray.forward_env`` (offline switches, a cache location), given to every
    stage's workers through a per-operator runtime env, so they arrive also when Ray was initialised by the
    caller before the build (a notebook, a test harness). Credentials never travel in a runtime env
    (:mod:`pipeline.local_ray`): the nodes have them.
    """
    b = cfg.build
    env = {k: v for k, v in (env or {}).items() if not looks_secret(k)}
    eager = eager or {}
    ekw = lambda stage: {**kw, "eager": bool(eager.get(stage))}  # noqa: E731
    env_kw = {"runtime_env": {"env_vars": env}} if env else {}
    gen_gpus = b.sources.num_gpus_per_actor if b.sources.kind == "generate" else 0
    llm = b.dialogue.backend == "transformers"
    res = b.resources or {}
    ds = ds.map_batches(SourcesStage, batch_size=1, batch_format="pyarrow",
                        compute=_pool(b.sources),
                        num_cpus=b.sources.num_cpus_per_actor, num_gpus=gen_gpus or None,
                        resources=res.get("sources"), fn_constructor_kwargs=ekw("sources"), **env_kw)
    ds = ds.map_batches(GenerateStage, batch_size=None, batch_format="pyarrow",
                        compute=_pool(b.profusion),
                        num_cpus=b.profusion.num_cpus_per_actor, num_gpus=b.profusion.num_gpus_per_actor or None,
                        resources=res.get("generate"), fn_constructor_kwargs=ekw("generate"), **env_kw)
    ds = ds.map_batches(ScoreStage, batch_size=None, batch_format="pyarrow",
                        compute=_pool(b.scoring),
                        num_cpus=b.scoring.num_cpus_per_actor, num_gpus=b.scoring.num_gpus_per_actor or None,
                        resources=res.get("score"), fn_constructor_kwargs=ekw("score"), **env_kw)
    d = b.dialogue
    ds = ds.map_batches(DialogueStage, batch_size=None, batch_format="pyarrow",
                        compute=_pool(d.transformers if llm else d),
                        num_cpus=d.num_cpus_per_actor,
                        num_gpus=(d.transformers.num_gpus_per_actor or None) if llm else None,
                        resources=res.get("dialogue"), fn_constructor_kwargs=ekw("dialogue"), **env_kw)
    sink_kw = {k: v for k, v in kw.items() if k != "fingerprints"}  # the sink loads no model
    ds = ds.map_batches(sink_batch, batch_size=None, batch_format="pyarrow", num_cpus=b.sink_num_cpus,
                        resources=res.get("sink"), fn_kwargs=sink_kw, **env_kw)
    return ds


#: concurrent reads of the markers a run did not stream back (chunks sunk by an earlier run)
READ_THREADS = 32


def _aggregate(out: Storage, dialogue_key: str, chunks: list[str], known: dict[str, dict] | None = None
               ) -> tuple[list[dict], dict, str]:
    """Fold the chunks' sink markers into the funnel, counts and dataset hash. ``known``: markers the sink
    streamed back during this run; only the others (chunks sunk before) are read, ``READ_THREADS`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    known = dict(known or {})
    missing = [c for c in chunks if c not in known]
    if missing:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for cid, rec in zip(missing, pool.map(lambda c: out.read_json(f"_work/sink/{dialogue_key}/{c}.json"),
                                                  missing)):
                known[cid] = rec
    totals: dict[str, dict] = {}
    counts = {"kept": 0, "candidates": 0, "quarantined": 0, "dataset_bytes": 0}
    h = hashlib.sha256()
    for cid in chunks:
        rec = known[cid]
        for stage in FUNNEL_ORDER:
            r = rec["funnel"][stage]
            t = totals.setdefault(stage, {"stage": stage, "unit": r["unit"], "in": 0, "out": 0, "removed": {}})
            t["in"] += r["in"]
            t["out"] += r["out"]
            for reason, n in r["removed"].items():
                t["removed"][reason] = t["removed"].get(reason, 0) + n
        for c in ("kept", "candidates", "quarantined", "dataset_bytes"):
            counts[c] += rec[c]
        h.update(f"{cid}:{rec['dataset_hash']}\n".encode())
    return [totals[s] for s in FUNNEL_ORDER if s in totals], counts, h.hexdigest()


def _remove_stale_shards(out: Storage, chunks: list[str]) -> None:
    """Delete shards of chunks that are not in the current plan (left by an earlier, larger plan)."""
    for sub, name in (("dataset/data", lambda c: f"train-{c}.parquet"), ("candidates/data", lambda c: f"{c}.parquet"),
                      ("quarantine/data", lambda c: f"{c}.parquet")):
        live = {name(c) for c in chunks}
        for f in out.list(sub):
            if f not in live:
                out.delete(f"{sub}/{f}")


def write_dataset_card(out: Storage, manifest: dict) -> None:
    """``OUT/dataset/README.md``: an HF dataset card (YAML header: features, files, license; provenance)."""
    import yaml

    features = S.dataset_features(False)
    header = {
        "license": manifest.get("license") or "other",
        **({"license_link": manifest["license_link"]} if manifest.get("license_link") else {}),
        "pretty_name": f"CAFE round-{manifest['config']['build']['round']} customization dataset",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
        # datasets' own YAML form of the features (what `push_to_hub` writes into a card)
        "dataset_info": {"features": features._to_yaml_list(),
                         "splits": [{"name": "train", "num_bytes": manifest["counts"].get("dataset_bytes", 0),
                                     "num_examples": manifest["counts"]["kept"]}]},
    }
    funnel = "\n".join(f"| {f['stage']} | {f['in']} | {f['out']} | "
                       f"{', '.join(f'{k}: {v}' for k, v in sorted(f['removed'].items())) or '–'} |"
                       for f in manifest["funnel"])
    rules = manifest.get("rules", {})
    applied = rules.get("thresholds", {})
    rules_text = f"`{rules.get('mode', '?')}` rules: " + (", ".join(f"{k} ≥ {v:.4g}" for k, v in sorted(applied.items()))
                                                          or "no thresholds recorded")
    oracle = manifest.get("oracle")
    oracle_text = ""
    if oracle and oracle.get("kept") and oracle.get("precision") is not None and oracle.get("recall") is not None:
        oracle_text = (f"\nJudged by the synthetic world's oracle: {oracle['precision']:.1%} of the kept rows keep the "
                       f"source's identity and follow the instruction ({1 - oracle['precision']:.1%} do not); "
                       f"{oracle['recall']:.1%} of the candidates that do were kept (report: threshold sweep).")
    columns = "\n".join(f"| `{c}` | {S.DESCRIPTIONS.get(c, '')} |" for c in S.DATASET_COLUMNS)
    body = f"""# {header['pretty_name']}

Built by `cafe build` (CAFE dataset construction: ProFusion generation, CLIP/DINO filtering, LLM dialogue).
Each row pairs a source image (`input_image`) and a user request (`user_text`) with a generated target
(`target_image`) and the assistant's answer (`assistant_text`); `clip_t`, `dino`, `clip_i` are the filter scores.

- rows: {manifest['counts']['kept']} (candidates scored: {manifest['counts']['candidates']}, quarantined: {manifest['counts']['quarantined']})
- schema version: {manifest['schema_version']} · code: {manifest['code_version']} · dataset hash: `{manifest['dataset_hash']}`
- keys: `{json.dumps(manifest['keys'], sort_keys=True)}`
- model fingerprints: `{json.dumps(manifest['model_fingerprints'], sort_keys=True)}`
- license: `{header['license']}` ({header.get('license_link') or 'no link recorded: set `build.license_link`'}) —
  the license of the generated data follows the source images' and the models' licenses; set `build.license` to
  record it.

Filter ({rules_text}); the rows below a threshold are in `candidates/` with their scores, and `cafe refilter`
applies other thresholds without regenerating.{oracle_text}

| stage | in | out | removed |
| --- | --- | --- | --- |
{funnel}

| column | what it holds |
| --- | --- |
{columns}

Read it with `datasets.load_dataset("<this directory>", split="train")` or `ray.data.read_parquet("<this directory>/data")`.
"""
    out.write_bytes("dataset/README.md", ("---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + body).encode())


def check_out_location(cfg: CafeConfig, out_uri: str) -> None:
    """Refuse an output that is a file; refuse an output inside a local source folder (it would ingest itself)."""
    if not is_uri(out_uri):
        p = Path(out_uri)
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"--out {out_uri}: exists and is not a directory")


def run_build(cfg: CafeConfig, out_dir: str | os.PathLike | None = None, address: str | None = None,
              config_path: str | None = None, lease_wait_s: float | None = None) -> BuildResult:
    """Run (or resume) the round-0 build; return the manifest and the pending count. See the module docstring."""
    import ray

    from pipeline.local_ray import forwarded_env, ray_session
    from pipeline.models import ensure_models
    from training.models.fingerprint import fingerprint  # no torch in the driver for this

    t_start = time.perf_counter()
    out_uri = str(out_dir) if out_dir else join(cfg.run.output_dir, cfg.run.name)
    check_out_location(cfg, out_uri)
    ensure_models(cfg)
    for role in used_roles(cfg):
        if not cfg.models.role_dir(role).is_dir():
            raise FileNotFoundError(f"models.{role}: {cfg.models.role_dir(role)} does not exist "
                                    "(run `cafe models make-tiny DIR` or point models.root at real weights)")
    fingerprints = {r: fingerprint(cfg.models.role_dir(r)) for r in used_roles(cfg)}
    if cfg.build.round >= 1:
        fingerprints["distill"] = distill_checkpoint(cfg)
    if cfg.build.scoring.oracle:
        if not Path(cfg.build.scoring.oracle).is_dir():
            raise FileNotFoundError(f"build.scoring.oracle = {cfg.build.scoring.oracle}: not a directory "
                                    "(write the world with `cafe world make`)")
        fingerprints["oracle"] = fingerprint(cfg.build.scoring.oracle)
    keys = stage_keys(cfg, fingerprints)
    owner = uuid.uuid4().hex[:12]
    out = Storage(out_uri, owner=owner)
    lease = Lease(out, ttl_s=cfg.build.lease_ttl_s, heartbeat_s=cfg.build.lease_ttl_s / 6)
    lease.acquire(wait_s=cfg.build.lease_wait if lease_wait_s is None else lease_wait_s)
    try:
        removed = out.clean_dead_tmp(owner)
        if removed:
            log.info("removed %d temporary file(s) left by a dead run", removed)
        identity = out.read_json("_work/identity.json")
        if identity is not None and identity["plan"] != keys["plan"]:
            raise BuildConflict(f"{out_uri} holds a build of other sources or instructions (plan "
                                f"{identity['plan']} ≠ {keys['plan']}); use another --out or delete it")
        if identity is not None:
            log.info("resuming the build in %s", out_uri)
        out.write_json("_work/identity.json", {"plan": keys["plan"]})
        out.delete("_SUCCESS")
        chunks = write_plan(cfg, out, keys["plan"], exclude_uris=[out.uri])
        sunk = set(c.removesuffix(".json") for c in out.list(f"_work/sink/{keys['dialogue']}"))
        todo = [c for c in chunks if c not in sunk]
        log.info("build: %d chunks; %d to do (keys %s)", len(chunks), len(todo), keys)
        t_pipeline = time.perf_counter()
        pending, reasons = 0, []
        markers: dict[str, dict] = {}  # what the sink streamed back: not read again
        if todo:
            with ray_session(cfg, address):
                kw = {"config": cfg.model_dump(mode="json"), "out": out.uri, "keys": keys, "owner": owner,
                      "epoch": lease.epoch, "fingerprints": fingerprints}
                ds = ray.data.from_items([{"chunk": c} for c in todo], override_num_blocks=len(todo))
                done = 0
                env = forwarded_env(cfg)
                eager = _eager_stages(cfg, out, keys, todo)
                graph = stage_graph(ds, cfg, kw, env, eager)
                progress = ChunkProgress(len(todo))
                for batch in graph.iter_batches(batch_size=None, batch_format="pyarrow"):
                    lease.check()
                    for row in batch.to_pylist():
                        done += 1
                        progress.add(row["kept"] if row["committed"] else 0)
                        if row["committed"]:
                            markers[row["chunk"]] = json.loads(row["marker"])
                            log.debug("build: chunk %s committed, %d kept (%d/%d)", row["chunk"], row["kept"], done,
                                      len(todo))
                        else:
                            pending += row["pending"]
                            reasons += json.loads(row["reasons"])
                            log.warning("build: chunk %s has %d pending record(s) (%d/%d)", row["chunk"],
                                        row["pending"], done, len(todo))
        pipeline_seconds = time.perf_counter() - t_pipeline
        lease.check()
        sunk = set(c.removesuffix(".json") for c in out.list(f"_work/sink/{keys['dialogue']}"))
        done_chunks = [c for c in chunks if c in sunk]
        _remove_stale_shards(out, chunks)
        funnel, counts, dataset_hash = _aggregate(out, keys["dialogue"], done_chunks, markers)
        r = cfg.build.rules
        manifest = {
            "schema_version": S.SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "status": "complete" if len(done_chunks) == len(chunks) else "incomplete",
            "config_path": config_path,
            "config": cfg.model_dump(mode="json"),
            "keys": keys,
            "config_hash": keys["dialogue"],
            "model_fingerprints": fingerprints,
            "code_version": code_version(),
            "license": cfg.build.license, "license_link": cfg.build.license_link,
            "funnel": funnel,
            "rules": {"mode": r.mode, "clip_t_min": r.clip_t_min, "dino_min": r.dino_min,
                      "clip_t_quantile": r.clip_t_quantile, "dino_quantile": r.dino_quantile,
                      "thresholds": {"clip_t": r.clip_t_min, "dino": r.dino_min} if r.mode == "absolute" else {}},
            "counts": counts,
            "pending": pending,
            "dataset_hash": dataset_hash,
            "timings_s": {"pipeline_wall": round(pipeline_seconds, 3),
                          "total_wall": round(time.perf_counter() - t_start, 3)},
            "num_chunks": len(chunks),
        }
        from pipeline.redact import redact_obj
        from pipeline.report import oracle_summary

        oracle = oracle_summary(out.uri)  # the world's oracle on these candidates (None for real data)
        if oracle is not None:
            manifest["oracle"] = oracle
        manifest = redact_obj(manifest)
        write_dataset_card(out, manifest)
        out.write_json("manifest.json", manifest)
        report = None
        if len(done_chunks) == len(chunks):
            try:
                from pipeline.report import write_report

                report = str(write_report(out.uri, max_samples=cfg.build.report_samples))
            except Exception as exc:  # noqa: BLE001 - the dataset is valid without its report; say so loudly
                log.error("report failed (the dataset is complete; re-run `cafe report %s`): %s", out_uri, exc)
            out.write_bytes("_SUCCESS", b"")
        return BuildResult(out_uri, manifest, pending=pending, pending_reasons=sorted(set(reasons)),
                           computed={"chunks_run": len(todo)}, report=report)
    finally:
        lease.release()


def _eager_stages(cfg: CafeConfig, out: Storage, keys: dict, todo: list[str]) -> dict[str, bool]:
    """Which stages will certainly run models: generation when a chunk to do has no generation commit, scoring when
    one has no score file (two listings, no per-chunk reads); dialogue always (a missing key fails at start)."""
    generated = {k.split("/")[0] for k in out.list(f"_work/generate/{keys['generate']}", recursive=True)
                 if k.endswith("/commit.json")}
    scored = {k.removesuffix(".parquet") for k in out.list(f"_work/score/{keys['score']}")}
    need_gen = any(c not in generated for c in todo)
    return {"sources": need_gen and cfg.build.sources.kind == "generate", "generate": need_gen,
            "score": any(c not in scored for c in todo), "dialogue": True}


