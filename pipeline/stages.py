"""The build's Ray Data stages: callable classes over batches of chunk ids, wrapping filtering/training code.

Each stage reads its input chunk from the previous stage's committed output in the :class:`ChunkStore`,
computes, and commits its own output — or skips a chunk it already committed (resume). Models are loaded
once per actor, lazily, on the first chunk that needs them. Stages never import Ray: Ray Data wraps them
(``map_batches(Stage, compute=ActorPoolStrategy(...), fn_constructor_kwargs=...)``) in :mod:`pipeline.build`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.config import CafeConfig
from pipeline.store import ChunkStore, quarantine_table

log = logging.getLogger(__name__)


def stable_int(*parts: object, bits: int = 31) -> int:
    """Deterministic non-negative int from ``parts`` (sha256, never Python's ``hash``)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << bits) - 1)


def row_id(round_: int, source_id: str, phrase: str) -> str:
    return hashlib.sha256(f"{round_}|{source_id}|{phrase}".encode()).hexdigest()[:16]


def choose_phrases(source_id: str, phrases: list[str], k: int, seed: int) -> list[str]:
    """k distinct instruction phrases for a source, drawn with a seed derived from (seed, source id)."""
    rng = np.random.default_rng(stable_int("instructions", seed, source_id))
    return [phrases[i] for i in sorted(rng.choice(len(phrases), size=k, replace=False))]


class ChunkStage:
    """Base of every stage: skip committed chunks, otherwise ``process`` and commit."""

    name = ""
    input_stage: str | None = None

    def __init__(self, config: dict, work_dir: str):
        self.cfg = CafeConfig.model_validate(config)
        self.store = ChunkStore(work_dir)
        self.plan = json.loads((Path(work_dir) / "plan.json").read_text())
        self._ready = False
        if self.name and any(not self.store.done(self.name, c) for c in self.plan["chunks"]):
            # load now, while the upstream stages are busy, rather than when the first chunk arrives;
            # a stage whose chunks are all committed (resume) never loads its models
            self._setup_once()

    def _setup_once(self) -> None:
        if not self._ready:
            t0 = time.perf_counter()
            self.setup()
            self._ready = True
            log.info("%s: setup took %.1f s", self.name, time.perf_counter() - t0)

    def setup(self) -> None:
        """Load models (called once, on the first chunk that is not committed yet)."""

    def process(self, chunk: dict, rows: pa.Table | None) -> tuple[pa.Table, list[dict], dict]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for chunk_id in batch["chunk_id"]:
            chunk_id = str(chunk_id)
            if self.store.done(self.name, chunk_id):
                continue
            self._setup_once()
            t0 = time.perf_counter()
            rows = self.store.rows(self.input_stage, chunk_id) if self.input_stage else None
            out, quarantined, counts = self.process(self.plan["chunks"][chunk_id], rows)
            for record in counts.values():
                record["seconds"] = time.perf_counter() - t0
            self.store.commit(self.name, chunk_id, out, quarantine_table(quarantined), counts)
        return {"chunk_id": batch["chunk_id"]}


def _funnel(unit: str, n_in: int, n_out: int, removed: dict[str, int]) -> dict:
    return {"unit": unit, "in": n_in, "out": n_out, "removed": {k: v for k, v in removed.items() if v}}


def _pairs_table(rows: list[dict]) -> pa.Table:
    schema = S.arrow_schema("pairs")
    return pa.table({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema)


# ----------------------------------------------------------------------------------------------- sources


class SourcesStage(ChunkStage):
    """Decode (or generate) each source once, then expand it into k (source, instruction) rows."""

    name = "sources"

    def setup(self) -> None:
        from filtering.images import ImagePolicy

        self.policy = ImagePolicy.from_sources_config(self.cfg.build.sources)
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
        from filtering.images import ImageRejected, QuarantineReason, decode_image, encode_png, read_file_bytes

        src_cfg = self.cfg.build.sources
        kind = source["kind"]
        if kind == "generate":
            import torch

            prompt = src_cfg.prompt_template.replace("{class}", source["class_name"])
            gen = torch.Generator().manual_seed(stable_int("source", self.cfg.run.seed, source["source_id"]))
            image = self.pipe(prompt, height=src_cfg.image_size, width=src_cfg.image_size,
                              num_inference_steps=src_cfg.generation_steps, guidance_scale=src_cfg.guidance_scale,
                              generator=gen, output_type="pil").images[0]
            return encode_png(image)
        if kind == "file":
            data = read_file_bytes(source["path"], self.policy)
        elif kind == "table":
            data = _read_table_image(source["path"], source["row"], src_cfg.image_column)
            if data is None:
                raise ImageRejected(QuarantineReason.EMPTY_FILE, "image cell is null or empty")
        else:
            raise ImageRejected(QuarantineReason.UNREADABLE, f"unknown source kind {kind!r}")
        return encode_png(decode_image(data, self.policy))

    def process(self, chunk: dict, rows: pa.Table | None):
        from filtering.images import ImageRejected

        b = self.cfg.build
        out, quarantined, removed = [], [], {}
        for source in chunk["sources"]:
            if source.get("reject"):  # planning already found it unusable (e.g. no class)
                reason, detail = source["reject"]
                png = None
            else:
                try:
                    png, reason, detail = self._load(source), None, None
                except ImageRejected as exc:
                    png, reason, detail = None, exc.reason.value, exc.detail
            if png is None:
                quarantined.append({S.Q_ID: source["source_id"], S.Q_STAGE: self.name, S.Q_REASON: reason,
                                    S.Q_DETAIL: detail, S.Q_INPUT: source["uri"]})
                removed[reason] = removed.get(reason, 0) + 1
                continue
            for phrase in choose_phrases(source["source_id"], b.instructions.phrases,
                                         b.instructions.per_source, self.cfg.run.seed):
                rid = row_id(b.round, source["source_id"], phrase)
                out.append({
                    S.ID: rid, S.ROUND: b.round, S.SOURCE_ID: source["source_id"], S.SOURCE_URI: source["uri"],
                    S.CLASS: source["class_name"], S.INSTRUCTION: phrase,
                    S.FILLED_PROMPT: b.instructions.filled_prompt.format(**{"class": source["class_name"],
                                                                          "phrase": phrase}),
                    S.SEED: stable_int("row", self.cfg.run.seed, rid), S.SOURCE_PNG: png,
                })
        n = len(chunk["sources"])
        return _pairs_table(out), quarantined, {"sources": _funnel("sources", n, n - len(quarantined), removed)}


def _read_table_image(path: str, row: int, column: str) -> bytes | None:
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        table = pq.read_table(path, columns=[column])
    else:
        from pipeline.store import read_arrow

        table = read_arrow(Path(path)).select([column])
    value = table[column][row].as_py()
    if isinstance(value, dict):  # HF Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value or None


# ----------------------------------------------------------------------------------------------- generate


class GenerateStage(ChunkStage):
    """ProFusion (SPEC §4.5): fine-tune once per source (if configured), then sample each of its rows."""

    name = "generate"
    input_stage = "sources"

    def setup(self) -> None:
        from training.methods.profusion import ProFusionGenerator
        from training.models.kit import load_from_config, resolve_device

        t2i = load_from_config(self.cfg.models, "t2i")
        promptnet = load_from_config(self.cfg.models, "promptnet")
        self.generator = ProFusionGenerator(t2i.components, promptnet.components, self.cfg.build.profusion,
                                            device=resolve_device(self.cfg.models.t2i.device))

    def process(self, chunk: dict, rows: pa.Table):
        from filtering.images import decode_png_rgb, encode_png
        from PIL import Image

        p = self.cfg.build.profusion
        ins = self.cfg.build.instructions
        params = json.dumps({k: getattr(p, k) for k in (
            "num_inference_steps", "s1", "s2", "refine_step", "gamma", "w_r", "refine_eta", "finetune",
            "finetune_steps")}, sort_keys=True)
        records = rows.to_pylist()
        by_source: dict[str, list[dict]] = {}
        for r in records:
            by_source.setdefault(r[S.SOURCE_ID], []).append(r)
        out, quarantined, removed = [], [], {}
        for source_id, group in by_source.items():
            source = decode_png_rgb(group[0][S.SOURCE_PNG])
            try:
                with self.generator.finetuned(source, seed=stable_int("finetune", self.cfg.run.seed, source_id)):
                    for i in range(0, len(group), p.batch_size):
                        part = group[i : i + p.batch_size]
                        fill = lambda tpl, r: tpl.format(**{"class": r[S.CLASS], "phrase": r[S.INSTRUCTION]})  # noqa: E731
                        images = self.generator.sample(
                            [source] * len(part), [fill(ins.sstar_prompt, r) for r in part],
                            [fill(ins.reference_prompt, r) for r in part], [r[S.SEED] for r in part])
                        for r, img in zip(part, images):
                            r.update({S.TARGET_PNG: encode_png(Image.fromarray(img)), S.GENERATOR: "profusion",
                                      S.GENERATOR_PARAMS: params})
                            out.append(r)
            except (RuntimeError, ValueError) as exc:  # a failing source loses its rows to quarantine, with why
                for r in group:  # the whole source goes: its rows share one fine-tuned model
                    quarantined.append({S.Q_ID: r[S.ID], S.Q_STAGE: self.name, S.Q_REASON: "generation_failed",
                                        S.Q_DETAIL: f"{type(exc).__name__}: {exc}"[:500], S.Q_INPUT: r[S.SOURCE_URI]})
                removed["generation_failed"] = removed.get("generation_failed", 0) + len(group)
                out = [r for r in out if r[S.SOURCE_ID] != source_id]
        return _pairs_table(out), quarantined, {"generate": _funnel("rows", len(records), len(out), removed)}


# ----------------------------------------------------------------------------------------------- scoring


class ScoreStage(ChunkStage):
    """One scorer (``clip_t`` | ``dino`` | ``clip_i``) as its own actor pool; the score is stored on every row."""

    SCORERS = {"clip_t": ("ClipTScorer", "clip_filter", "generate"),
               "dino": ("DinoScorer", "dino_filter", "score_clip_t"),
               "clip_i": ("ClipIScorer", "clip_filter", "score_dino")}

    def __init__(self, config: dict, work_dir: str, score: str):
        if score not in self.SCORERS:
            raise ValueError(f"unknown score {score!r}; allowed: {', '.join(self.SCORERS)}")
        self.score = score
        self.name = f"score_{score}"
        self.input_stage = self.SCORERS[score][2]
        super().__init__(config, work_dir)

    def setup(self) -> None:
        import filtering.scorers as scorers

        cls_name, role, _ = self.SCORERS[self.score]
        spec = self.cfg.models.role_spec(role)
        self.scorer = getattr(scorers, cls_name)(str(self.cfg.models.role_dir(role)), spec.dtype, spec.device)

    def process(self, chunk: dict, rows: pa.Table):
        bs = self.cfg.build.scoring.batch_size
        scores = []
        for start in range(0, rows.num_rows, bs):
            part = rows.slice(start, bs)
            batch = {c: np.array(part[c].to_pylist(), dtype=object)
                     for c in (S.SOURCE_PNG, S.TARGET_PNG, S.FILLED_PROMPT)}
            scores.append(np.asarray(self.scorer(batch)[self.score], dtype=np.float32))
        values = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        rows = rows.set_column(rows.schema.get_field_index(self.score), self.score, pa.array(values, pa.float32()))
        return rows, [], {self.name: _funnel("rows", rows.num_rows, rows.num_rows, {})}


# ----------------------------------------------------------------------------------------------- rules + dialogue


class DialogueStage(ChunkStage):
    """Apply the rules to the stored scores, then write dialogue for the kept rows (D4)."""

    name = "dialogue"
    input_stage = "score_clip_i"

    def setup(self) -> None:
        from pipeline.dialogue import make_backend

        d = self.cfg.build.dialogue
        components = None
        if d.backend == "transformers":
            from training.models.kit import load_from_config

            components = load_from_config(self.cfg.models, "dialogue_llm").components
        self.backend = make_backend(d, components)

    def process(self, chunk: dict, rows: pa.Table):
        from filtering.rules import apply_rules, count_reasons
        from pipeline.dialogue import DialogueRequest, choose_style

        d = self.cfg.build.dialogue
        decision = apply_rules({S.CLIP_T: rows[S.CLIP_T].to_numpy(zero_copy_only=False).astype(np.float32),
                                S.DINO: rows[S.DINO].to_numpy(zero_copy_only=False).astype(np.float32)},
                               self.cfg.build.rules)
        records = rows.to_pylist()
        kept = []
        for r, keep, reason in zip(records, decision.keep, decision.reason):
            r[S.KEEP], r[S.FILTER_REASON] = bool(keep), reason
            if keep:
                kept.append(r)
        requests = [DialogueRequest(r[S.ID], r[S.CLASS], r[S.INSTRUCTION], choose_style(r[S.ID], list(d.styles)))
                    for r in kept]
        results = self.backend.generate(requests) if requests else []
        quarantined, removed = [], {}
        for r, req, res in zip(kept, requests, results):
            r[S.DIALOGUE_STYLE] = req.style
            if res.reason is None:
                r[S.USER_TEXT], r[S.ASSISTANT_TEXT] = res.user, res.assistant
            else:
                quarantined.append({S.Q_ID: r[S.ID], S.Q_STAGE: self.name, S.Q_REASON: res.reason,
                                    S.Q_DETAIL: (res.raw or "")[:500], S.Q_INPUT: r[S.SOURCE_URI]})
                removed[res.reason] = removed.get(res.reason, 0) + 1
        n_kept = len(kept)
        counts = {
            "rules": _funnel("rows", len(records), n_kept, {k: v for k, v in count_reasons(decision).items()
                                                             if k not in (None, "kept")}),
            "dialogue": _funnel("rows", n_kept, n_kept - len(quarantined), removed),
        }
        return _pairs_table(records), quarantined, counts
