"""Concept jobs: the job file, per-job validation, run ids and the durable job table.

Usage::

    cfg, jobs = load_jobs("configs/concepts/tiny.yaml", overrides=["concepts.ico.steps=50"])
    table = JobTable(Storage(cfg.concepts.output))
    for job in jobs: table.record(job)          # queued (or failed, with the validation error)
    print(format_status(table.records()))

**Job sources.** A YAML job file is a config file (any section of the tree) with a ``jobs:`` list and an
optional ``base:`` config file it extends (relative to the job file); a JSONL file (one job per line) or a
Parquet table (one job per row) holds jobs only, and the config comes from ``--config``. A job is
``{id, method, noun, images, params?, seed?, masks?}``: ``id`` is the concept id (a single path segment), ``images``
a list of local paths / storage URIs (or one folder). An EM job (``method: em``) needs no noun; its optional
``masks`` maps a token to a ground-truth mask image (evaluation only: the IoU history). Each job is validated on its own — a bad job becomes a
*failed* record with its error and the other jobs run.

**Run ids.** ``run_id`` = sha256 over what determines the result: method, noun, images (as given), the resolved
parameters, the seed and the base model's fingerprint. Re-running the same job file finds the same run ids,
so a finished job is never run twice; changing a parameter makes a new run beside the old one.

**Job table.** One JSON object per job at ``<output>/_jobs/<concept>.<method>.<run_id>.json`` (atomic writes
through :class:`pipeline.store.Storage`, local or ``s3://``). Only the driver that holds the output's
:class:`~pipeline.store.Lease` writes it, so two drivers cannot both run jobs (the second is refused while the
first is alive, and takes over after its lease expires). States: ``queued`` → ``running`` → ``done`` |
``failed``; ``attempts``, ``owner`` (actor), ``heartbeat`` (unix time, refreshed from the actor's progress),
``durations_s`` (per attempt), ``error``. A ``running`` record found at start-up belongs to a dead driver: the
attempt counts and the job is queued again (or failed after ``max_attempts``). A job whose artifact holds its
success marker is ``done`` whatever the table said.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.concepts_config import build_params, params_class
from pipeline.build_config import _deep_merge
from pipeline.config import CafeConfig, ConfigError, load_config_dict, read_config_data
from pipeline.store import Storage

JOB_KEYS = ("id", "method", "noun", "images", "params", "seed", "masks")
METHODS = ("ico", "infusion", "em")
STATES = ("queued", "running", "done", "failed")
SUCCESS_MARKER = "_SUCCESS"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------ job file


def _config_data(path: Path) -> dict:
    data = read_config_data(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["<root>: the file must hold a mapping"])
    return data


def load_jobs(source: str | os.PathLike, config: str | os.PathLike | None = None,
              overrides: list[str] | None = None) -> tuple[CafeConfig, list[dict]]:
    """Load a job source and the config it runs under; return ``(cfg, raw job dicts)``.

    Args:
        source: a YAML job file (config + ``jobs``), a ``.jsonl`` file or a ``.parquet`` table of jobs.
        config: the config file for JSONL/Parquet sources (default ``configs/tiny.yaml``); for a YAML job file it
            is merged *under* the file (the job file's keys win).
        overrides: ``--set`` overrides, applied last.

    Raises:
        ConfigError: the config is invalid or the source cannot be read (every problem listed).
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        data = _config_data(path)
        if config is not None:
            data = _deep_merge(_config_data(Path(config)), data)
        jobs = data.pop("jobs", [])
        if not isinstance(jobs, list):
            raise ConfigError(str(path), [f"jobs = {type(jobs).__name__}: expected a list of jobs"])
    elif suffix == ".jsonl":
        data = _config_data(Path(config or "configs/tiny.yaml"))
        data.pop("jobs", None)
        jobs = []
        if not path.is_file():
            raise ConfigError(str(path), ["file not found"])
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                jobs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                jobs.append({"_error": f"line {n}: not valid JSON ({exc.msg})", "id": f"line-{n}"})
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        data = _config_data(Path(config or "configs/tiny.yaml"))
        data.pop("jobs", None)
        if not path.is_file():
            raise ConfigError(str(path), ["file not found"])
        jobs = pq.read_table(path).to_pylist()
        for job in jobs:  # Parquet has no "missing": a null column value means "not given"
            for key in [k for k, v in job.items() if v is None]:
                del job[key]
            if isinstance(job.get("params"), str):
                try:
                    job["params"] = json.loads(job["params"])
                except json.JSONDecodeError:
                    pass
    else:
        raise ConfigError(str(path), [f"unknown job source kind {suffix or '(none)'}; allowed: .yaml, .jsonl, .parquet"])
    cfg = load_config_dict(data, str(path), overrides)
    return cfg, jobs


# ------------------------------------------------------------------------------------------ one job


@dataclass
class ConceptJob:
    """One validated job (``error`` set when it cannot run; it is then recorded as failed)."""

    concept_id: str
    method: str
    noun: str = ""
    images: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)   # resolved: config defaults + job params
    seed: int = 0
    image_hashes: list[str] = field(default_factory=list)   # sha256 of each reference file ("unreadable" if none)
    masks: dict[str, str] = field(default_factory=dict)      # EM: token -> ground-truth mask image (evaluation only)
    mask_hashes: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # config values outside params that change the result
    run_id: str = ""
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.concept_id}.{self.method}.{self.run_id}"

    @property
    def artifact(self) -> str:
        """Artifact folder relative to the concepts output."""
        return f"{self.concept_id}/{self.method}/{self.run_id}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _list_images(location: str) -> list[str]:
    """A folder (local or URI) → its image files, sorted; a file → itself."""
    from pipeline.store import is_uri

    if is_uri(location):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(location)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
            scheme = location.split("://", 1)[0]
            return sorted(f"{scheme}://{i.path}" for i in infos
                          if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_SUFFIXES))
        return [location]
    p = Path(location)
    if p.is_dir():
        return sorted(str(q) for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
    return [location]


def parse_job(raw: Any, cfg: CafeConfig, base_fingerprint: str, index: int = 0) -> ConceptJob:
    """Validate one raw job; never raises: problems go to ``job.error``.

    Checked here (cheap, before any actor): the id is one safe path segment, the method is known, the noun is a
    non-empty word, images is a non-empty list (a folder is expanded), params are the method's fields with the
    right types, seed is an int. Checked on the actor (needs the model/files): images readable and decodable,
    the noun's tokenisation where the method needs one token.
    """
    if not isinstance(raw, dict):
        return ConceptJob(concept_id=f"job-{index}", method="?", error=f"job {index}: expected a mapping, got "
                                                                          f"{type(raw).__name__}")
    cid = raw.get("id")
    cid_text = str(cid) if cid is not None else f"job-{index}"
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", cid_text).strip(".") or f"job-{index}"
    method = str(raw.get("method", "?"))
    safe_method = re.sub(r"[^A-Za-z0-9_-]", "_", method) or "unknown"
    job = ConceptJob(concept_id=safe_id, method=safe_method, seed=cfg.concepts.seed)

    def fail(msg: str) -> ConceptJob:
        job.error = msg
        job.run_id = "invalid-" + hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return job

    if "_error" in raw:
        return fail(raw["_error"])
    unknown = sorted(set(raw) - set(JOB_KEYS))
    if unknown:
        return fail(f"unknown job key(s) {', '.join(unknown)}; allowed: {', '.join(JOB_KEYS)}")
    if not isinstance(cid, str) or not _ID_RE.match(cid) or cid in (".", ".."):
        return fail(f"id = {cid!r}: a concept id must be one path segment of letters, digits, '_', '-', '.' "
                    f"(no '/', '\\\\' or leading '.'), at most 128 characters")
    if method not in METHODS:
        return fail(f"method = {method!r}: unknown method; allowed: {', '.join(METHODS)}")
    noun = raw.get("noun", "" if method == "em" else None)
    if not (method == "em" and noun == "") and (not isinstance(noun, str) or not noun.strip()
                                               or len(noun.split()) != 1):
        return fail(f"noun = {noun!r}: the class noun must be one word (e.g. 'dog')")
    job.noun = noun.strip()
    images = raw.get("images")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        return fail(f"images = {images!r}: expected a list of image paths or URIs (or one folder)")
    expanded: list[str] = []
    for loc in images:
        try:
            expanded.extend(_list_images(loc))
        except OSError as exc:
            return fail(f"images: {loc}: {exc}")
    if not expanded:
        return fail(f"images = {images!r}: no reference images (a concept needs at least one)")
    job.images = expanded
    seed = raw.get("seed", cfg.concepts.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        return fail(f"seed = {seed!r}: expected an integer >= 0")
    job.seed = seed
    params = dict(getattr(cfg.concepts, method))
    given = raw.get("params") or {}
    if not isinstance(given, dict):
        return fail(f"params = {given!r}: expected a mapping")
    params.update(given)
    try:
        resolved = build_params(params_class(method), params, f"{cid}: params")
    except ValueError as exc:
        return fail(str(exc))
    job.params = _jsonable(dataclasses.asdict(resolved))
    masks = raw.get("masks") or {}
    if masks and method != "em":
        return fail("masks: ground-truth masks are taken by EM jobs only (method: em)")
    if not isinstance(masks, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in masks.items()):
        return fail(f"masks = {masks!r}: expected a mapping token -> mask image path or URI")
    unknown_tokens = sorted(set(masks) - set(resolved.tokens)) if method == "em" else []
    if unknown_tokens:
        return fail(f"masks: {unknown_tokens} are not tokens of this job; tokens: {list(resolved.tokens)}")
    if method == "em" and max(resolved.images_of_tokens) >= len(expanded):
        return fail(f"params.token_images {list(resolved.images_of_tokens)}: more images named than the "
                    f"{len(expanded)} given")
    untied = sorted(set(range(len(expanded))) - set(resolved.images_of_tokens)) if method == "em" else []
    if untied:
        return fail(f"images {untied} have no token: params.token_images ties each token to one image "
                    f"({list(resolved.images_of_tokens)})")
    job.masks = dict(masks)
    job.mask_hashes = {k: _content_hash(v) for k, v in masks.items()}
    job.image_hashes = [_content_hash(loc) for loc in job.images]
    c = cfg.concepts
    job.settings = {"t2i_dtype": cfg.models.t2i.dtype, "sample": c.sample.model_dump(mode="json"),
                    "samples_per_job": c.samples_per_job, "eval_prompts": list(c.eval.prompts),
                    "prior_images": c.prior_images}
    job.run_id = run_id(job, base_fingerprint)
    return job


def _content_hash(location: str) -> str:
    """sha256 of a reference file, so an edited image makes a new run; ``unreadable`` when it cannot be read
    here (the actor then reports why, as the job's error)."""
    from pipeline.store import is_uri

    h = hashlib.sha256()
    try:
        if is_uri(location):
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(location)
            with fs.open_input_stream(path) as f:
                h.update(f.read())
        else:
            with open(location, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    except (OSError, ValueError):
        return "unreadable"
    return h.hexdigest()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=list))


def run_id(job: ConceptJob, base_fingerprint: str) -> str:
    """sha256 (16 hex) over what determines a job's result, not how it runs: method, noun, images (paths and
    contents), resolved params, seed, the base model (fingerprint, dtype) and the sampling/eval settings that shape
    the artifact (ICO's prior images are sampled with ``concepts.sample``)."""
    what = {"method": job.method, "noun": job.noun, "images": job.images, "image_hashes": job.image_hashes,
            "params": job.params, "seed": job.seed, "base": base_fingerprint, "settings": job.settings}
    if job.masks:  # EM's ground truth shapes the artifact's IoU history
        what["masks"] = job.mask_hashes
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ job table


class JobTable:
    """The durable job table under ``<output>/_jobs/`` (see the module docstring)."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.dir = storage.sub("_jobs")

    def _name(self, key: str) -> str:
        return f"{key}.json"

    def get(self, key: str) -> dict | None:
        return self.dir.read_json(self._name(key), default=None)

    def put(self, rec: dict) -> None:
        self.dir.write_json(self._name(rec["key"]), rec)

    def records(self) -> list[dict]:
        if not self.dir.exists(""):
            return []
        out = []
        for name in sorted(self.dir.list("")):
            if name.endswith(".json") and ".tmp-" not in name:
                rec = self.dir.read_json(name, default=None)
                if rec is not None:
                    out.append(rec)
        return out

    def done(self, job: ConceptJob) -> bool:
        return self.storage.exists(f"{job.artifact}/{SUCCESS_MARKER}")

    def record(self, job: ConceptJob, max_attempts: int, retry_failed: bool = False) -> dict:
        """Insert or reconcile ``job``'s record at start-up; return it (``state`` tells what to do).

        ``retry_failed`` queues a failed job again with a fresh attempt count (after fixing its cause, or when its
        transient failures used up ``max_attempts``); a job that is invalid as written fails again at once.
        """
        now = time.time()
        rec = self.get(job.key)
        if rec is not None and retry_failed and rec["state"] == "failed" and job.error is None:
            rec.update(state="queued", attempts=0, error=None, finished_at=None, durations_s=[])
        if rec is None:
            rec = {"key": job.key, "concept_id": job.concept_id, "method": job.method, "run_id": job.run_id,
                   "artifact": job.artifact, "state": "queued", "attempts": 0, "owner": None, "heartbeat": None,
                   "queued_at": now, "started_at": None, "finished_at": None, "durations_s": [], "error": None,
                   "job": job.to_json()}
        if job.error is not None:
            rec.update(state="failed", error=job.error, finished_at=rec.get("finished_at") or now)
        elif self.done(job):
            if rec["state"] != "done":
                rec.update(state="done", error=None, finished_at=rec.get("finished_at") or now)
        elif rec["state"] == "running":
            # its driver died (we hold the lease now): that attempt is spent
            rec["error"] = f"attempt {rec['attempts']}: owner {rec.get('owner')} died (driver gone)"
            rec["state"] = "queued" if rec["attempts"] < max_attempts else "failed"
            rec["owner"] = None
        elif rec["state"] == "done":  # marker gone: the artifact was deleted, run again
            rec.update(state="queued", attempts=0, error=None)
        self.put(rec)
        return rec


def format_status(records: list[dict]) -> str:
    """The job table as text: one line per job and a count per state."""
    if not records:
        return "no concept jobs recorded"
    lines = [f"{'concept':<20} {'method':<9} {'run':<16} {'state':<8} {'tries':>5} {'time_s':>7}  error / artifact"]
    counts = {s: 0 for s in STATES}
    for r in sorted(records, key=lambda r: (r["concept_id"], r["method"], r.get("queued_at") or 0)):
        counts[r["state"]] = counts.get(r["state"], 0) + 1
        took = sum(r.get("durations_s") or [])
        tail = r.get("error") if r["state"] == "failed" else (r.get("artifact") if r["state"] == "done" else
                                                              (r.get("owner") or ""))
        if r["state"] == "running" and r.get("heartbeat"):
            tail = f"{tail} (heartbeat {time.time() - r['heartbeat']:.0f}s ago, step {r.get('step')})"
        lines.append(f"{r['concept_id'][:20]:<20} {r['method']:<9} {r['run_id'][:16]:<16} {r['state']:<8} "
                     f"{r['attempts']:>5} {took:>7.1f}  {tail or ''}")
    lines.append("  ".join(f"{s}: {n}" for s, n in counts.items()))
    return "\n".join(lines)
