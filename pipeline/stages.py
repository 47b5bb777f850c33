"""The build's Ray Data stages: callable classes over blocks of rows, wrapping filtering/training code.

Rows travel in Ray Data blocks with the ``flight`` schema (:func:`training.data.schema.arrow_schema`): a
pair row, or a quarantined or pending record, each tagged with its chunk (``_chunk``) and status
(``_status``). The sources stage emits one block per chunk; later stages take whole blocks
(``batch_size=None``), group them by chunk and batch their models internally (``profusion.batch_size``,
``scoring.batch_size``), so a chunk's rows stay together: ProFusion fine-tunes once per source, and the sink
commits a chunk all at once.

Durable writes only where they pay (all through :class:`pipeline.store.Storage`, so ``s3://`` works):

- ``_work/generate/<generate key>/<chunk>/part-N.parquet`` + ``commit.json``: generated rows and
  every quarantine record so far (a sample costs ~12 GPU-s at paper scale; never generated twice);
- ``_work/score/<score key>/<chunk>.parquet``: ids and three scores (a few bytes per row; lets a rules
  change skip re-scoring);
- the sink: dataset / candidates / quarantine shards, then ``_work/sink/<dialogue key>/<chunk>.json``.

Everything else (decoding, rules, dialogue) is recomputed for a chunk that was not sunk. Failures are
split in two: input-caused ones are quarantined with a reason; transient ones (device out of memory, a
storage or LLM endpoint that is down) leave the record *pending*: its chunk is not sunk, the build exits
non-zero saying how many, and the next run retries exactly those. Stages never import Ray (the one fact they
need from it, which nodes are alive, comes through :func:`pipeline.local_ray.node_facts`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import CafeConfig
from pipeline.models import check_fingerprints, mismatch
from pipeline.store import Lease, Storage, is_uri, local_copy, table_hash
from training.data import schema as S
from training.data.ids import row_id, stable_int

log = logging.getLogger(__name__)

FLIGHT = S.arrow_schema("flight")
NEW = "_new"  # not a schema column: set on records the generation ledger has not committed yet
Q_COLS = {S.Q_STAGE: "q_stage", S.Q_REASON: "q_reason", S.Q_DETAIL: "q_detail", S.Q_INPUT: "q_input"}


def choose_phrases(source_id: str, phrases: list[str], k: int, seed: int) -> list[str]:
    """k distinct instruction phrases for a source, drawn with a seed derived from (seed, source id)."""
    rng = np.random.default_rng(stable_int("instructions", seed, source_id))
    return [phrases[i] for i in sorted(rng.choice(len(phrases), size=k, replace=False))]


def flight_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{f: r.get(f) for f in FLIGHT.names} for r in records], schema=FLIGHT)


def quarantine_record(chunk: str, ident: str, source: dict | None, stage: str, reason: str, detail: str | None,
                      source_uri: str, status: str = S.STATUS_QUARANTINED, row: dict | None = None) -> dict:
    from pipeline.redact import redact, stable_detail

    rec = dict(row or {})
    rec.update({S.CHUNK: chunk, S.STATUS: status, S.ID: ident, S.SOURCE_URI: source_uri,
                "q_stage": stage, "q_reason": reason,
                "q_detail": None if detail is None else stable_detail(redact(str(detail)))[:500],
                "q_input": source_uri})
    if source is not None:
        rec.setdefault(S.SOURCE_ID, source["source_id"])
        rec.setdefault(S.CLASS, source.get("class_name"))
    return rec


def split_chunks(table: pa.Table) -> "OrderedDict[str, list[dict]]":
    """Group a block's records by chunk (input order kept)."""
    out: OrderedDict[str, list[dict]] = OrderedDict()
    for r in table.to_pylist():
        out.setdefault(r[S.CHUNK], []).append(r)
    return out


class _Stage:
    """Base: parse the config once per actor; ``__call__`` splits a block into chunks for ``process``."""

    name = ""

    def __init__(self, config: dict, out: str, keys: dict, owner: str, eager: bool = False,
                 epoch: int | None = None, fingerprints: dict[str, str] | None = None):
        self.cfg = CafeConfig.model_validate(config)
        self.out = Storage(out, owner=owner)
        self.keys = keys
        self.epoch = epoch  # the driver's lease epoch: a worker that outlived its driver does not commit
        self.fingerprints = fingerprints or {}  # what the driver keyed the stages by: this node must load the same
        self._ready = False
        if eager:  # load now, while upstream stages work, rather than when the first block arrives
            self._setup_once()

    def model_dirs(self) -> dict[str, Path]:
        """The model directories this stage loads, by the name the driver fingerprinted them under."""
        return {}

    def check_models(self) -> None:
        """Every model this actor is about to load has the fingerprint the driver keyed the build by."""
        check_fingerprints(self.model_dirs(), self.fingerprints, self.name)

    def _setup_once(self) -> None:
        if not self._ready:
            t0 = time.perf_counter()
            self.check_models()
            self.setup()
            self._ready = True
            log.info("%s: setup took %.1f s", self.name, time.perf_counter() - t0)

    def setup(self) -> None:
        """Load models (once per actor, on the first chunk that needs them)."""

    def process(self, chunk: str, records: list[dict]) -> list[dict]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        extra = [NEW] if NEW in batch.column_names else []
        outs = []
        for chunk, records in split_chunks(batch).items():
            outs.extend(self.process(chunk, records))
        table = flight_table(outs)
        if extra or any(NEW in r for r in outs):
            table = table.append_column(NEW, pa.array([bool(r.get(NEW)) for r in outs], pa.bool_()))
        return table


#: the plan: Parquet objects of this many row groups, one row group per chunk (chunk i = row group
#: i % PLAN_PART_CHUNKS of part i // PLAN_PART_CHUNKS): few objects to write, and a reader keeps one small footer
PLAN_PART_CHUNKS = 1024
_PLAN_FILES: "OrderedDict[tuple[str, str], pq.ParquetFile]" = OrderedDict()


def plan_part(index: int) -> str:
    """The plan object holding chunk ``index``."""
    return f"plan-{index // PLAN_PART_CHUNKS:05d}.parquet"


def plan_sources(out: Storage, plan_key: str, chunk: str) -> list[dict]:
    """The sources of one chunk: its row group of its plan part (a part's footer is read once per process; the
    last four parts stay open). Plans written before the parts layout (one ``<chunk>.parquet`` each) read as they
    are."""
    index = int(chunk)
    rel = f"_work/plan/{plan_key}/{plan_part(index)}"
    key = (out.uri, rel)
    plan = _PLAN_FILES.get(key)
    if plan is None:
        if not out.is_file(rel):
            table = out.read_parquet(f"_work/plan/{plan_key}/{chunk}.parquet")
            return [json.loads(s) for s in table["source"].to_pylist()]
        plan = pq.ParquetFile(out.fs.open_input_file(out.path(rel)))
        _PLAN_FILES[key] = plan
        while len(_PLAN_FILES) > 4:
            _PLAN_FILES.popitem(last=False)
    table = plan.read_row_group(index % PLAN_PART_CHUNKS, columns=["source"])
    return [json.loads(s) for s in table["source"].to_pylist()]


def plan_table(out: Storage, plan_key: str) -> pa.Table:
    """The whole plan (its ``source`` column), either layout, in chunk order: for tools that need every planned
    source (the parts' or the shards' names sort in chunk order)."""
    shards = [f"_work/plan/{plan_key}/{n}" for n in out.list(f"_work/plan/{plan_key}")
              if n.endswith(".parquet") and not n.startswith(".")]
    return pa.concat_tables([out.read_parquet(s, columns=["source"]) for s in shards]) if shards else \
        pa.table({"source": pa.array([], pa.string())})


# ------------------------------------------------------------------------------------------------ ledger


class GenerationLedger:
    """``_work/generate/<key>/<chunk>/``: parts + ``commit.json`` (parts, pending sources), marker last."""

    def __init__(self, out: Storage, key: str, chunk: str):
        self.out, self.dir = out, f"_work/generate/{key}/{chunk}"

    def commit_info(self) -> dict | None:
        return self.out.read_json(f"{self.dir}/commit.json")

    def records(self, info: dict | None = None) -> list[dict]:
        """The committed records, each row id once (the first part that holds it wins): two overlapping commits
        of the same sources — a zombie actor beside its retry — can never duplicate a row."""
        info = info if info is not None else self.commit_info()
        recs: list[dict] = []
        seen: set[str] = set()
        for part in (info or {}).get("parts", []):
            for r in self.out.read_parquet(f"{self.dir}/{part}").to_pylist():
                if r[S.ID] not in seen:
                    seen.add(r[S.ID])
                    recs.append(r)
        return recs

    def commit(self, records: list[dict], pending_sources: list[str]) -> None:
        info = self.commit_info() or {"parts": []}
        if records:
            # named by the sources it holds: a retry of the same sources (after a kill before the marker, or a
            # zombie beside its successor) writes the same object and adds no second part
            sources = "\n".join(sorted({str(r[S.SOURCE_ID]) for r in records}))
            part = f"part-{hashlib.sha256(sources.encode()).hexdigest()[:16]}.parquet"
            self.out.write_parquet(f"{self.dir}/{part}", flight_table(records))
            if part not in info["parts"]:
                info["parts"].append(part)
        info["pending_sources"] = sorted(pending_sources)
        self.out.write_json(f"{self.dir}/commit.json", info)  # the marker: written last
        self.out.delete_dir(f"{self.dir}/attempts")  # finished normally: only deaths mid-chunk accumulate

    def attempt(self, run: str, node: str | None = None, alive: set[str] | None = None) -> int:
        """Record one more attempt at this chunk by ``run`` (the driver's id) on ``node``; return how many attempts
        *count* against the chunk: earlier ones of the same run whose node is still alive (``alive``: the alive
        node ids, None when unknown). An attempt of another run ended with its driver or job (killed, preempted,
        aborted), and one on a node that is gone ended with its node: neither says anything about the chunk, so
        infrastructure faults never turn into ``worker_crashed`` quarantine."""
        counted = 0
        for name in self.out.list(f"{self.dir}/attempts"):
            try:
                rec = self.out.read_json(f"{self.dir}/attempts/{name}", default={})
            except ValueError:  # an empty marker of an earlier version: it names no run
                continue
            if rec.get("run") != run:
                continue
            if alive is not None and rec.get("node") is not None and rec["node"] not in alive:
                continue
            counted += 1
        self.out.write_json(f"{self.dir}/attempts/{uuid.uuid4().hex}.json",
                            {"run": run, "node": node, "pid": os.getpid(), "time": time.time()})
        return counted


# ----------------------------------------------------------------------------------------------- sources


class SourcesStage(_Stage):
    """Chunk id → the chunk's records: committed generation output, plus decoded sources still to generate."""

    name = "sources"

    def model_dirs(self) -> dict[str, Path]:
        return {"t2i": self.cfg.models.role_dir("t2i")} if self.cfg.build.sources.kind == "generate" else {}

    def setup(self) -> None:
        from filtering.images import ImagePolicy
        from pipeline.sources import SourceReader

        self.policy = ImagePolicy.from_sources_config(self.cfg.build.sources)
        self.reader = SourceReader()
        self.pipe = None
        if self.cfg.build.sources.kind == "generate":
            from diffusers import StableDiffusionPipeline

            from training.models.kit import load_from_config

            t2i = load_from_config(self.cfg.models, "t2i").components
            self.pipe = StableDiffusionPipeline(
                vae=t2i.vae, text_encoder=t2i.text_encoder, tokenizer=t2i.tokenizer, unet=t2i.unet,
                scheduler=t2i.scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False)
            self.pipe.set_progress_bar_config(disable=True)

    def _load(self, source: dict) -> bytes:
        from filtering.images import decode_image, encode_png
        from pipeline.sources import read_source

        src_cfg = self.cfg.build.sources
        if source["kind"] == "generate":
            import torch

            prompt = src_cfg.prompt_template.replace("{class}", source["class_name"])
            gen = torch.Generator().manual_seed(stable_int("source", self.cfg.run.seed, source["source_id"]))
            image = self.pipe(prompt, height=src_cfg.image_size, width=src_cfg.image_size,
                              num_inference_steps=src_cfg.generation_steps, guidance_scale=src_cfg.guidance_scale,
                              generator=gen, output_type="pil").images[0]
            return encode_png(image)
        return encode_png(decode_image(read_source(source, self.cfg, self.policy, self.reader), self.policy))

    def __call__(self, batch: pa.Table) -> pa.Table:
        outs: list[dict] = []
        for chunk in batch["chunk"].to_pylist():
            outs.extend(self.process(chunk, []))
        table = flight_table(outs)
        return table.append_column(NEW, pa.array([bool(r.get(NEW)) for r in outs], pa.bool_()))

    def process(self, chunk: str, records: list[dict]) -> list[dict]:
        from filtering.images import ImageRejected
        from training.errors import is_transient

        ledger = GenerationLedger(self.out, self.keys["generate"], chunk)
        info = ledger.commit_info()
        committed = ledger.records(info)
        done = {r[S.SOURCE_ID] for r in committed}
        out = [{**r, NEW: False} for r in committed]
        todo = [s for s in plan_sources(self.out, self.keys["plan"], chunk) if s["source_id"] not in done]
        if todo:
            self._setup_once()
        b = self.cfg.build
        for source in todo:
            if source.get("reject"):  # planning already found it unusable (e.g. no class, outside the root)
                reason, detail = source["reject"]
                out.append({**quarantine_record(chunk, source["source_id"], source, self.name, reason, detail,
                                                source["uri"]), NEW: True})
                continue
            try:
                png = self._load(source)
            except ImageRejected as exc:
                out.append({**quarantine_record(chunk, source["source_id"], source, self.name, exc.reason.value,
                                                exc.detail, source["uri"]), NEW: True})
                continue
            except Exception as exc:  # noqa: BLE001 - not the input's fault: keep it pending, retry next run
                if isinstance(exc, (ValueError, TypeError)) and not is_transient(exc):
                    out.append({**quarantine_record(chunk, source["source_id"], source, self.name, "unreadable",
                                                    f"{type(exc).__name__}: {exc}", source["uri"]), NEW: True})
                    continue
                log.warning("source %s pending (transient): %s: %s", source["uri"], type(exc).__name__, exc)
                out.append({**quarantine_record(chunk, source["source_id"], source, self.name, "transient",
                                                f"{type(exc).__name__}: {exc}", source["uri"],
                                                status=S.STATUS_PENDING), NEW: True})
                continue
            for phrase in choose_phrases(source["source_id"], b.instructions.phrases, b.instructions.per_source,
                                         self.cfg.run.seed):
                rid = row_id(b.round, source["source_id"], phrase)
                out.append({
                    S.CHUNK: chunk, S.STATUS: S.STATUS_ROW, NEW: True,
                    S.ID: rid, S.ROUND: b.round, S.SOURCE_ID: source["source_id"], S.SOURCE_URI: source["uri"],
                    S.CLASS: source["class_name"], S.INSTRUCTION: phrase,
                    S.FILLED_PROMPT: b.instructions.filled_prompt.format(**{"class": source["class_name"],
                                                                          "phrase": phrase}),
                    S.SEED: stable_int("row", self.cfg.run.seed, rid), S.SOURCE_PNG: png,
                })
        return out


# ----------------------------------------------------------------------------------------------- generate


def distill_checkpoint(cfg: CafeConfig) -> str:
    """The id of the models a round r ≥ 1 generates with: the fingerprint of their weights (the rows' lineage)."""
    from training.models.fingerprint import fingerprint

    d = cfg.build.distill
    parts = []
    for name, location in (("diffusion", d.diffusion), ("mllm", d.mllm if d.mode == "mix" else None)):
        if location is None:
            continue
        if not (is_uri(location) or Path(location).is_dir()):
            raise FileNotFoundError(f"build.distill.{name} = {location}: not a directory (train the round "
                                    f"{cfg.build.round - 1} models first, or run `cafe pipeline run`)")
        parts.append(f"{name}:{fingerprint(local_copy(location))}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]



def generator_params(p) -> str:
    return json.dumps({k: getattr(p, k) for k in (
        "num_inference_steps", "s1", "s2", "refine_step", "gamma", "w_r", "refine_eta", "finetune",
        "finetune_steps", "finetune_precision", "context_padding")}, sort_keys=True)


def parent_id(round_: int, record: dict) -> str | None:
    """Round r ≥ 1: the id the round r−1 row of the same (source, instruction) has (whether it was kept or not)."""
    return None if round_ == 0 else row_id(round_ - 1, record[S.SOURCE_ID], record[S.INSTRUCTION])


class GenerateStage(_Stage):
    """ProFusion (SPEC §4.5): fine-tune once per source (if configured), sample its rows, commit the chunk."""

    name = "generate"

    def model_dirs(self) -> dict[str, Path]:
        b, m = self.cfg.build, self.cfg.models
        roles = ["t2i", "promptnet"] if b.round == 0 else ["t2i", "clip_cond", "dino_cond"] + (
            ["llm"] if b.distill.mode == "mix" else [])
        return {r: m.role_dir(r) for r in roles}

    def check_models(self) -> None:
        super().check_models()
        want = self.fingerprints.get("distill")
        if self.cfg.build.round >= 1 and want is not None:
            got = distill_checkpoint(self.cfg)
            if got != want:
                raise mismatch(self.name, f"the round {self.cfg.build.round - 1} models", self.cfg.build.distill.diffusion,
                               got, want)

    def setup(self) -> None:
        from training.models.kit import load_from_config, resolve_device

        b = self.cfg.build
        t2i = load_from_config(self.cfg.models, "t2i")
        device = resolve_device(self.cfg.models.t2i.device)
        if b.round == 0:
            from training.methods.profusion import ProFusionGenerator

            promptnet = load_from_config(self.cfg.models, "promptnet")
            self.generator = ProFusionGenerator(t2i.components, promptnet.components, b.profusion, device=device)
            self.lineage = {"name": "profusion", "params": generator_params(b.profusion), "checkpoint": None}
            return
        from training.assistant import Assistant
        from training.methods.self_distill import SelfDistillGenerator
        from training.trainers.base import RoleRef

        d = b.distill
        roles = {r: RoleRef(str(self.cfg.models.role_dir(r).absolute()), self.cfg.models.role_spec(r).dtype)
                 for r in ("t2i", "clip_cond", "dino_cond", "llm")}
        mllm = local_copy(d.mllm) if d.mode == "mix" and d.mllm else None  # weights on a URI: a local copy
        assistant = Assistant.load(roles, mllm, local_copy(d.diffusion), device=str(device))
        checkpoint = distill_checkpoint(self.cfg)
        self.generator = SelfDistillGenerator(assistant, t2i.components, d.mode, d.scale_dino, d.alpha,
                                              d.num_inference_steps, d.guidance_scale, d.reference_guidance_scale,
                                              checkpoint=checkpoint)
        params = {k: v for k, v in d.model_dump(mode="json").items() if k not in ("mllm", "diffusion")}
        self.lineage = {"name": f"self_distill_{d.mode}", "params": json.dumps(params, sort_keys=True),
                        "checkpoint": checkpoint}

    def _generate_source(self, source_id: str, group: list[dict]) -> list[np.ndarray]:
        from filtering.images import decode_png_rgb

        p, ins = self.cfg.build.profusion, self.cfg.build.instructions
        source = decode_png_rgb(group[0][S.SOURCE_PNG])
        fill = lambda tpl, r: tpl.format(**{"class": r[S.CLASS], "phrase": r[S.INSTRUCTION]})  # noqa: E731
        images: list[np.ndarray] = []
        extra = lambda part: {}  # noqa: E731
        if self.cfg.build.round >= 1:
            extra = lambda part: {"requests": [fill(self.cfg.build.distill.request, r) for r in part]}  # noqa: E731
        with self.generator.finetuned(source, seed=stable_int("finetune", self.cfg.run.seed, source_id)):
            for i in range(0, len(group), p.batch_size):
                part = group[i : i + p.batch_size]
                images += self.generator.sample([source] * len(part), [fill(ins.sstar_prompt, r) for r in part],
                                                [fill(ins.reference_prompt, r) for r in part],
                                                [r[S.SEED] for r in part], **extra(part))
        return images

    def _generate_across_sources(self, by_source: "OrderedDict[str, list[dict]]") -> dict[str, list[np.ndarray]]:
        """Rounds r ≥ 1 (no per-source fine-tuning): every row of the chunk in batches of ``profusion.batch_size``
        whatever its source, each row with its own source image — full batches on the device instead of one
        short batch per source. Returns the images by source id; raises on any failure (the caller then
        generates source by source, so a bad input is still quarantined alone)."""
        from filtering.images import decode_png_rgb

        p, ins, d = self.cfg.build.profusion, self.cfg.build.instructions, self.cfg.build.distill
        fill = lambda tpl, r: tpl.format(**{"class": r[S.CLASS], "phrase": r[S.INSTRUCTION]})  # noqa: E731
        sources = {sid: decode_png_rgb(group[0][S.SOURCE_PNG]) for sid, group in by_source.items()}
        rows = [r for group in by_source.values() for r in group]
        images: list[np.ndarray] = []
        for i in range(0, len(rows), p.batch_size):
            part = rows[i : i + p.batch_size]
            images += self.generator.sample([sources[r[S.SOURCE_ID]] for r in part],
                                            [fill(ins.sstar_prompt, r) for r in part],
                                            [fill(ins.reference_prompt, r) for r in part], [r[S.SEED] for r in part],
                                            requests=[fill(d.request, r) for r in part])
        out: dict[str, list[np.ndarray]] = {}
        for r, image in zip(rows, images):
            out.setdefault(r[S.SOURCE_ID], []).append(image)
        return out

    def process(self, chunk: str, records: list[dict]) -> list[dict]:
        from PIL import Image

        from filtering.images import encode_png
        from training.errors import is_transient

        if any(r.get(NEW) for r in records):
            # a retried task (its actor died after committing, before returning) must not generate again:
            # take what the ledger holds now and keep only the records of sources it does not hold
            ledger = GenerationLedger(self.out, self.keys["generate"], chunk)
            committed = ledger.records()
            done = {r[S.SOURCE_ID] for r in committed}
            records = [{**r, NEW: False} for r in committed] + [
                r for r in records if r.get(NEW) and r[S.SOURCE_ID] not in done]
        need = [r for r in records if r[S.STATUS] == S.STATUS_ROW and r.get(NEW)]
        new_other = [r for r in records if r.get(NEW) and r[S.STATUS] == S.STATUS_QUARANTINED]
        pending_src = sorted({r[S.SOURCE_ID] for r in records if r[S.STATUS] == S.STATUS_PENDING})
        if not need and not new_other and not any(r.get(NEW) for r in records):
            return records  # the chunk's generation is committed: pass through
        ledger = GenerationLedger(self.out, self.keys["generate"], chunk)
        by_source: OrderedDict[str, list[dict]] = OrderedDict()
        for r in need:
            by_source.setdefault(r[S.SOURCE_ID], []).append(r)
        decided: list[dict] = list(new_other)
        pending: list[dict] = []
        if by_source:
            from pipeline.local_ray import node_facts

            node, alive = node_facts()
            before = ledger.attempt(self.out.owner, node, alive)
            crashed = before >= self.cfg.build.max_chunk_attempts
            batched: dict[str, list[np.ndarray]] = {}
            if not crashed:
                self._setup_once()
                if self.cfg.build.round >= 1 and len(by_source) > 1:
                    try:
                        batched = self._generate_across_sources(by_source)
                    except Exception as exc:  # noqa: BLE001 - retried source by source, classified there
                        log.warning("chunk %s: batched generation failed (%s); generating source by source",
                                    chunk, exc)
                        _free_device_memory()
            for source_id, group in by_source.items():
                if crashed:  # this chunk killed its worker max_chunk_attempts times: stop retrying it
                    decided += [quarantine_record(chunk, r[S.ID], None, self.name, "worker_crashed",
                                                  f"the chunk's generation was attempted {before} times in this run "
                                                  "without finishing (its worker died each time, on a node that "
                                                  "stayed up)", r[S.SOURCE_URI], row=r)
                                for r in group]
                    continue
                images, error = batched.get(source_id), None
                for attempt in range(0 if images is not None else 2):  # one retry for transient device errors
                    try:
                        images = self._generate_source(source_id, group)
                        break
                    except Exception as exc:  # noqa: BLE001 - classified below
                        error = exc
                        if not is_transient(exc):
                            break
                        _free_device_memory()
                if images is not None:
                    for r, img in zip(group, images):
                        decided.append({**r, S.TARGET_PNG: encode_png(Image.fromarray(img)),
                                        S.GENERATOR: self.lineage["name"], S.GENERATOR_PARAMS: self.lineage["params"],
                                        S.CHECKPOINT: self.lineage["checkpoint"],
                                        S.PARENT_ID: parent_id(self.cfg.build.round, r)})
                elif is_transient(error):
                    log.warning("source %s pending (transient): %s", source_id, error)
                    pending += [quarantine_record(chunk, r[S.ID], None, self.name, "transient",
                                                  f"{type(error).__name__}: {error}", r[S.SOURCE_URI],
                                                  status=S.STATUS_PENDING, row=r) for r in group]
                    pending_src.append(source_id)
                else:  # the input's fault (e.g. latent-size guard): the whole source goes, with why
                    decided += [quarantine_record(chunk, r[S.ID], None, self.name, "generation_failed",
                                                  f"{type(error).__name__}: {error}", r[S.SOURCE_URI], row=r)
                                for r in group]
        fence(self.out, self.epoch)
        ledger.commit([{**r, NEW: False} for r in decided], sorted(set(pending_src)))
        committed = [r for r in records if not r.get(NEW)]
        old_pending = [r for r in records if r[S.STATUS] == S.STATUS_PENDING]
        return [{**r, NEW: False} for r in committed + decided + pending + old_pending]


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- scoring


SCORE_COLUMNS = (S.CLIP_T, S.DINO, S.CLIP_I)


class ScoreStage(_Stage):
    """CLIP-T, DINO and CLIP-I in one pass (each PNG decoded once); scores kept in a small file per chunk."""

    name = "score"

    def model_dirs(self) -> dict[str, Path]:
        m, oracle = self.cfg.models, self.cfg.build.scoring.oracle
        return {"clip_filter": m.role_dir("clip_filter"), "dino_filter": m.role_dir("dino_filter"),
                **({"oracle": Path(oracle)} if oracle else {})}

    def setup(self) -> None:
        from filtering.scorers import FusedScorer

        m = self.cfg.models
        self.scorer = FusedScorer(str(m.role_dir("clip_filter")), str(m.role_dir("dino_filter")),
                                  m.clip_filter.dtype, m.dino_filter.dtype, m.clip_filter.device, m.dino_filter.device)
        self.judge = None
        if self.cfg.build.scoring.oracle:
            from filtering.oracle_judge import OracleJudge

            self.judge = OracleJudge(self.cfg.build.scoring.oracle)

    def _columns(self) -> dict[str, object]:
        """Stored column → Arrow type: the three scores, plus the oracle's verdicts when it is configured."""
        cols: dict[str, object] = {c: pa.float32() for c in SCORE_COLUMNS}
        if self.cfg.build.scoring.oracle:
            cols.update({S.ORACLE_IDENTITY: pa.bool_(), S.ORACLE_INSTRUCTION: pa.bool_(), S.ORACLE_READING: pa.string()})
        return cols

    def process(self, chunk: str, records: list[dict]) -> list[dict]:
        rows = [r for r in records if r[S.STATUS] == S.STATUS_ROW]
        complete = not any(r[S.STATUS] == S.STATUS_PENDING for r in records)
        key = f"_work/score/{self.keys['score']}/{chunk}.parquet"
        columns = self._columns()
        stored = self.out.read_parquet(key).to_pylist() if complete and self.out.is_file(key) else None
        if stored is not None and {s[S.ID] for s in stored} == {r[S.ID] for r in rows}:
            by_id = {s[S.ID]: s for s in stored}
        else:
            self._setup_once()
            bs = self.cfg.build.scoring.batch_size
            by_id = {}
            for i in range(0, len(rows), bs):
                part = rows[i : i + bs]
                batch = {c: np.array([r[c] for r in part], dtype=object)
                         for c in (S.SOURCE_PNG, S.TARGET_PNG, S.FILLED_PROMPT, S.INSTRUCTION)}
                scores = self.scorer(batch)
                verdicts = self.judge(batch) if self.judge is not None else {}
                for j, r in enumerate(part):
                    by_id[r[S.ID]] = {**{c: float(scores[c][j]) for c in SCORE_COLUMNS},
                                      **{c: verdicts[c][j] for c in verdicts}}
            if complete:
                ids = sorted(by_id)
                self.out.write_parquet(key, pa.table({
                    S.ID: pa.array(ids, pa.string()),
                    **{c: pa.array([by_id[i].get(c) for i in ids], t) for c, t in columns.items()}}))
        for r in rows:
            r.update({c: by_id[r[S.ID]].get(c) for c in columns})
        return records


# ----------------------------------------------------------------------------------------------- rules + dialogue


class DialogueStage(_Stage):
    """Apply the rules to the stored scores, then write dialogue for the kept rows (D4)."""

    name = "dialogue"

    def model_dirs(self) -> dict[str, Path]:
        d = self.cfg.build.dialogue
        return {"dialogue_llm": self.cfg.models.role_dir("dialogue_llm")} if d.backend == "transformers" else {}

    def setup(self) -> None:
        from pipeline.dialogue import make_backend

        d = self.cfg.build.dialogue
        components = None
        if d.backend == "transformers":
            from training.models.kit import load_from_config

            components = load_from_config(self.cfg.models, "dialogue_llm").components
        self.backend = make_backend(d, components)

    def process(self, chunk: str, records: list[dict]) -> list[dict]:
        from filtering.rules import apply_rules
        from pipeline.dialogue import DialogueRequest, choose_style

        rows = [r for r in records if r[S.STATUS] == S.STATUS_ROW]
        if not rows:
            return records
        decision = apply_rules({S.CLIP_T: np.array([r[S.CLIP_T] for r in rows], np.float32),
                                S.DINO: np.array([r[S.DINO] for r in rows], np.float32)}, self.cfg.build.rules)
        kept = []
        for r, keep, reason in zip(rows, decision.keep, decision.reason):
            r[S.KEEP], r[S.FILTER_REASON] = bool(keep), reason
            if keep:
                kept.append(r)
        if not kept:
            return records
        self._setup_once()
        styles = list(self.cfg.build.dialogue.styles)
        requests = [DialogueRequest(r[S.ID], r[S.CLASS], r[S.INSTRUCTION], choose_style(r[S.ID], styles))
                    for r in kept]
        for r, req, res in zip(kept, requests, self.backend.generate(requests)):
            r[S.DIALOGUE_STYLE] = req.style
            if getattr(res, "pending", False):
                r.update(quarantine_record(chunk, r[S.ID], None, self.name, "transient", res.raw or res.reason,
                                           r[S.SOURCE_URI], status=S.STATUS_PENDING, row=r))
            elif res.reason is None:
                r[S.USER_TEXT], r[S.ASSISTANT_TEXT] = res.user, res.assistant
            else:
                r.update(quarantine_record(chunk, r[S.ID], None, self.name, res.reason, res.raw, r[S.SOURCE_URI],
                                           row=r))
        return records


# ----------------------------------------------------------------------------------------------- sink


def _image_cell(png: bytes | None) -> dict | None:
    return None if png is None else {"bytes": png, "path": None}


def dataset_table(rows: list[dict]) -> pa.Table:
    """Kept rows → an Arrow table with the HF features (``Image`` columns, schema metadata for ``datasets``)."""
    features = S.dataset_features(False)
    data = []
    for r in rows:
        r = dict(r)
        r[S.INPUT_IMAGE], r[S.TARGET_IMAGE] = _image_cell(r[S.SOURCE_PNG]), _image_cell(r[S.TARGET_PNG])
        data.append({c: r.get(c) for c in S.DATASET_COLUMNS})
    return pa.Table.from_pylist(data, schema=features.arrow_schema)


def chunk_funnel(n_sources: int, records: list[dict]) -> dict:
    """Per-stage in/out/removed counts of one chunk, from its final records (every record says where it left)."""
    def removed(stage: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in records:
            if r[S.STATUS] == S.STATUS_QUARANTINED and r["q_stage"] == stage:
                out[r["q_reason"]] = out.get(r["q_reason"], 0) + 1
        return out

    src_removed = removed("sources")
    rows_in = sum(1 for r in records if not (r[S.STATUS] == S.STATUS_QUARANTINED and r["q_stage"] == "sources"))
    gen_removed = removed("generate")
    rows = [r for r in records if r[S.STATUS] == S.STATUS_ROW or r["q_stage"] == "dialogue"]
    kept = [r for r in rows if r.get(S.KEEP)]
    rule_removed: dict[str, int] = {}
    for r in rows:
        if not r.get(S.KEEP):
            rule_removed[r[S.FILTER_REASON]] = rule_removed.get(r[S.FILTER_REASON], 0) + 1
    dia_removed = removed("dialogue")
    f = lambda stage, unit, i, o, rm: {"stage": stage, "unit": unit, "in": i, "out": o, "removed": rm}  # noqa: E731
    return {
        "sources": f("sources", "sources", n_sources, n_sources - sum(src_removed.values()), src_removed),
        "generate": f("generate", "rows", rows_in, len(rows), gen_removed),
        "score": f("score", "rows", len(rows), len(rows), {}),
        "rules": f("rules", "rows", len(rows), len(kept), rule_removed),
        "dialogue": f("dialogue", "rows", len(kept), len(kept) - sum(dia_removed.values()), dia_removed),
    }


def write_dataset_shard(storage: Storage, chunk: str, rows: pa.Table) -> int:
    """Write ``dataset/data/train-<chunk>.parquet``; a chunk that kept no row has no shard (bytes written).

    ``datasets`` refuses a zero-row Parquet file (``ArrowInvalid: BatchSize must be greater than 0``), so an
    empty chunk's shard is removed instead (a re-run with other rules may have emptied a chunk that had rows).
    """
    rel = f"dataset/data/train-{chunk}.parquet"
    if rows.num_rows == 0:
        storage.delete(rel)
        return 0
    return storage.write_parquet(rel, rows)


def fence(out: Storage, epoch: int | None) -> None:
    """Before a commit marker: refuse if a newer driver took the output's lease (a zombie worker of a driver that
    was judged dead must not commit beside its successor's workers). One existence check."""
    if epoch is not None:
        Lease.fence(out, epoch)


def sink_batch(batch: pa.Table, config: dict, out: str, keys: dict, owner: str,
               epoch: int | None = None) -> pa.Table:
    """Commit every complete chunk of a block: dataset, candidates and quarantine shards, then the marker.

    Returns one summary row per chunk (committed or not, pending count, kept rows).
    """
    storage = Storage(out, owner=owner)
    summary = []
    for chunk, records in split_chunks(batch).items():
        sources = plan_sources(storage, keys["plan"], chunk)
        covered = {r[S.SOURCE_ID] for r in records}
        missing = [s["source_id"] for s in sources if s["source_id"] not in covered]
        if missing:
            raise RuntimeError(f"chunk {chunk}: {len(missing)} source(s) have no record (e.g. {missing[0]}); a "
                               "chunk was split across blocks — raise DataContext.target_max_block_size or lower "
                               "build.rows_per_chunk")
        pending = [r for r in records if r[S.STATUS] == S.STATUS_PENDING]
        if pending:
            summary.append({"chunk": chunk, "committed": False, "pending": len(pending), "kept": 0,
                            "reasons": json.dumps(sorted({f"{r['q_stage']}: {r['q_detail']}"[:200] for r in pending})),
                            "marker": None})
            continue
        rows = sorted((r for r in records if r[S.STATUS] == S.STATUS_ROW or r["q_stage"] == "dialogue"),
                      key=lambda r: r[S.ID])
        kept = [r for r in rows if r.get(S.KEEP) and r[S.STATUS] == S.STATUS_ROW and r.get(S.USER_TEXT) is not None]
        quarantined = sorted((r for r in records if r[S.STATUS] == S.STATUS_QUARANTINED),
                             key=lambda r: (r["q_stage"], r[S.ID]))
        data = dataset_table(kept)
        cand_schema = S.arrow_schema("candidates")
        candidates = pa.Table.from_pylist([{c: r.get(c) for c in cand_schema.names} for r in rows], schema=cand_schema)
        qt = pa.Table.from_pylist([{c: r.get(Q_COLS.get(c, c)) for c in S.QUARANTINE_COLUMNS} for r in quarantined],
                                  schema=S.arrow_schema("quarantine"))
        nbytes = write_dataset_shard(storage, chunk, data)
        storage.write_parquet(f"candidates/data/{chunk}.parquet", candidates)
        storage.write_parquet(f"quarantine/data/{chunk}.parquet", qt)
        fence(storage, epoch)
        marker = {"funnel": chunk_funnel(len(sources), records), "kept": data.num_rows,
                  "candidates": candidates.num_rows, "quarantined": qt.num_rows, "dataset_hash": table_hash(data),
                  "dataset_bytes": nbytes}
        storage.write_json(f"_work/sink/{keys['dialogue']}/{chunk}.json", marker)
        # the marker travels back too: the driver folds the funnel from these rows instead of reading markers
        summary.append({"chunk": chunk, "committed": True, "pending": 0, "kept": data.num_rows, "reasons": "[]",
                        "marker": json.dumps(marker, sort_keys=True)})
    return pa.Table.from_pylist(summary, schema=pa.schema([("chunk", pa.string()), ("committed", pa.bool_()),
                                                           ("pending", pa.int64()), ("kept", pa.int64()),
                                                           ("reasons", pa.string()), ("marker", pa.string())]))
