"""Per-concept customization on a pool of Ray actors: ICO (+ DCI sampling) and Infusion (SPEC §4.1–§4.3).

Usage::

    cafe concepts run configs/concepts/tiny.yaml [--set concepts.actors.num_actors=2]
    cafe concepts status configs/concepts/tiny.yaml
    cafe concepts generate --config configs/concepts/tiny.yaml --concept red-circle --prompt "a photo of {} on the left" [--dci --lambda 0.5]
    cafe concepts eval --config configs/concepts/tiny.yaml --concept red-circle

    from pipeline.concepts import run_jobs, generate, evaluate
    summary = run_jobs("configs/concepts/tiny.yaml")

**Actors.** Each :class:`ConceptWorker` loads the ``t2i`` base model **once** and runs many jobs. A job's trained
state lives in its own modules (ICO's attention processors and token rows, Infusion's Δ), never in the base
weights, so a result does not depend on what ran before on the same actor. The methods are in
:mod:`training.methods` (``ico``, ``dci``, ``infusion``); this module only schedules, stores and reports.

**Artifacts** ``<output>/<concept>/<method>/<run_id>/``: the method's safetensors + JSON, ``job.json`` (base
fingerprint, parameters, tokens, layer names, seed, images), ``samples/*.png``, ``metrics.json`` (CLIP-T,
CLIP-I, DINO on the samples), and ``_SUCCESS`` written last. Files are written locally and copied to the
output (a path or ``s3://`` URI) by :class:`pipeline.store.Storage`.

**Failures.** A job that cannot run (bad id, unknown method, no or unreadable images, a noun that is not one
token for ICO, bad params) fails alone with its error in the job table. An actor that dies mid-job (killed,
OOM) is replaced and the job retried up to ``concepts.max_attempts``; a transient error inside a job
(:func:`training.errors.is_transient`, storage ``OSError``) is retried too. A driver killed mid-run leaves
``running`` records; the next run counts those attempts and finishes the rest — jobs with a success marker are
never run again (:mod:`pipeline.concept_jobs`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.concept_jobs import SUCCESS_MARKER, ConceptJob, JobTable, format_status, load_jobs, parse_job
from pipeline.concepts_config import build_params, dci_params_class, params_class
from pipeline.config import CafeConfig
from pipeline.store import Lease, Storage

log = logging.getLogger(__name__)


class ConceptError(RuntimeError):
    """A concept request cannot be served (unknown concept, no finished run, bad prompt)."""


# ------------------------------------------------------------------------------------------ model-side helpers


def _method(method: str):
    import importlib

    return importlib.import_module(f"training.methods.{method}")


def _decode_reference(data: bytes, where: str, size: int) -> np.ndarray:
    from filtering.images import ImagePolicy, ImageRejected, decode_image

    try:
        img = decode_image(data, ImagePolicy(size=size, resize="center_crop", min_side=8))
    except ImageRejected as exc:
        raise ValueError(f"image {where}: {exc}") from None
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _decode_mask(data: bytes, where: str, size: int, image_hw: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask image (white = the token) → (size, size) bool, cropped and resized (nearest) as its image.

    Raises ``ValueError`` when the mask's size differs from its image's ``image_hw``.
    """
    from PIL import Image

    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except OSError as exc:
        raise ValueError(f"mask {where}: not a readable image ({exc})") from None
    if (mask.height, mask.width) != tuple(image_hw):
        raise ValueError(f"mask {where}: size {mask.width}x{mask.height} differs from its image's "
                         f"{image_hw[1]}x{image_hw[0]}")
    arr = np.asarray(mask.convert("L")) > 127
    h, w = arr.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(arr[top:top + s, left:left + s].astype(np.uint8) * 255)
    return np.asarray(square.resize((size, size), Image.NEAREST)) > 127


def _image_hw(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width


def read_image_bytes(location: str) -> bytes:
    """Bytes of a local path or storage URI; ``ValueError`` when it does not exist (not worth a retry)."""
    from pipeline.store import is_uri

    if is_uri(location):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ValueError(f"image {location}: not found")
        with fs.open_input_stream(path) as f:
            return f.read()
    p = Path(location)
    if not p.is_file():
        raise ValueError(f"image {location}: not found" if not p.exists() else f"image {location}: not a file")
    return p.read_bytes()


def image_size(t2i) -> int:
    """Pixel size of the base's images (the methods' own definition)."""
    return _method("ico").image_size(t2i)


def concept_phrase(method: str, concept) -> str:
    """What ``{}`` in a prompt stands for: ICO's ``<new1> <new2> <new3> noun``, Infusion's class noun, EM's subject
    tokens (``[v1] and [v2]``)."""
    if method == "em":
        return concept.phrase()
    return _method("ico").concept_phrase(concept) if method == "ico" else concept.noun


def _to_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _pil(images: Sequence[np.ndarray]):
    from PIL import Image

    return [Image.fromarray(i) for i in images]


class Embedders:
    """The ``clip_filter`` and ``dino_filter`` embedders, loaded on first use (shared with the build's scorers)."""

    def __init__(self, cfg: CafeConfig, device: str):
        self.cfg, self.device = cfg, device
        self._clip = self._dino = None

    @property
    def clip(self):
        if self._clip is None:
            from training.embedders import ClipEmbedder

            spec = self.cfg.models.clip_filter
            self._clip = ClipEmbedder(str(self.cfg.models.role_dir("clip_filter")), dtype=spec.dtype, device=self.device)
        return self._clip

    @property
    def dino(self):
        if self._dino is None:
            from training.embedders import DinoEmbedder

            spec = self.cfg.models.dino_filter
            self._dino = DinoEmbedder(str(self.cfg.models.role_dir("dino_filter")), dtype=spec.dtype, device=self.device)
        return self._dino


SAMPLE_CHUNK = 16
#: W2's pooled latent size (SPEC §3): 4×8×8 = 256 dimensions
W2_POOL = (4, 8, 8)


def _sample_kwargs(cfg: CafeConfig) -> dict:
    """``concepts.sample`` values that are set (the rest stay the method's defaults)."""
    s = cfg.concepts.sample
    return {k: v for k, v in (("steps", s.steps), ("guidance", s.guidance), ("eta", s.eta)) if v is not None}


def sample_concepts(t2i, method: str, concepts: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int],
                    cfg: CafeConfig, device: str, dci: bool = False, lam: float | None = None,
                    aux_noun: str | None = None) -> list[np.ndarray]:
    """Images of ``concepts`` (one for ICO; one or more for Infusion) for each prompt/seed, in chunks of
    :data:`SAMPLE_CHUNK` rows per UNet batch."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), SAMPLE_CHUNK):
        out += _sample_chunk(t2i, method, concepts, prompts[i:i + SAMPLE_CHUNK], seeds[i:i + SAMPLE_CHUNK], cfg,
                             device, dci, lam, aux_noun)
    return out


def _sample_chunk(t2i, method, concepts, prompts, seeds, cfg, device, dci, lam, aux_noun) -> list[np.ndarray]:
    kw = _sample_kwargs(cfg)
    if method == "ico":
        if len(concepts) != 1:
            raise ConceptError("ICO generates one concept per prompt (compose concepts with Infusion)")
        if dci:
            dci_mod = _method("dci")
            values = dict(cfg.concepts.dci)
            if lam is not None:
                values["lam"] = lam
            params = build_params(dci_params_class(), values, "concepts.dci")
            images: list = [None] * len(prompts)
            by_prompt: dict[str, list[int]] = {}
            for i, p in enumerate(prompts):  # one two-branch run per prompt, its seeds batched
                by_prompt.setdefault(p, []).append(i)
            for p, idx in by_prompt.items():
                batch = dci_mod.sample_dci_batch(t2i, concepts[0], p, [seeds[i] for i in idx], params,
                                                 aux_noun=aux_noun, device=device)
                for i, image in zip(idx, batch):
                    images[i] = image
            return images
        return _method("ico").sample(t2i, concepts[0], list(prompts), list(seeds), device=device, **kw)
    if dci:
        raise ConceptError("DCI sampling applies to ICO concepts")
    if method == "em":
        if len(concepts) != 1:
            raise ConceptError("EM composes the tokens of one concept (one job); name one EM concept per prompt")
        em_kw = {k: v for k, v in kw.items() if k in ("steps", "guidance", "eta")}
        return _method("em").sample(t2i, concepts[0], list(prompts), list(seeds), device=device, **em_kw)
    custom, _ = _method("infusion").sample(t2i, list(concepts), list(prompts), list(seeds), device=device, **kw)
    return custom


def concept_metrics(embedders: Embedders, method: str, concept, images: Sequence[np.ndarray], prompts: Sequence[str],
                    references: Sequence[np.ndarray]) -> dict:
    """CLIP-T (identifier removed), CLIP-I and DINO of generated images against the references (SPEC §3)."""
    from training import metrics

    identifier = tuple(getattr(concept, "tokens", ()))
    gen, refs = _pil(images), _pil(references)
    return {
        "clip_t": metrics.clip_t(embedders.clip, gen, list(prompts), identifier),
        "clip_i": metrics.clip_i(embedders.clip, gen, refs),
        "dino": metrics.dino_score(embedders.dino, gen, refs),
        "num_images": len(images),
    }


# ------------------------------------------------------------------------------------------ the actor


class ConceptWorker:
    """A Ray actor (``ray.remote(ConceptWorker)``): the base model loaded once, many jobs run on it.

    ``run`` executes one job; ``progress`` (answered concurrently: the actor has two threads) reports the
    running job's step for the job table's heartbeat.
    """

    def __init__(self, cfg_json: dict, device: str = "cpu", base_fingerprint: str | None = None):
        from pipeline.config import load_config_dict
        from training.models.kit import fingerprint, load_role, resolve_device

        self.cfg = load_config_dict(cfg_json, "<concepts actor>")
        self.device = str(resolve_device(device))      # "auto": cuda when this actor sees one
        spec = self.cfg.models.t2i
        self.t2i_dir = self.cfg.models.role_dir("t2i")
        self.t2i = load_role("t2i", self.t2i_dir, dtype=spec.dtype, device=device).components
        self.fingerprint = fingerprint(self.t2i_dir)
        self.expected_fingerprint = base_fingerprint  # the driver's: what the jobs' run ids were keyed by
        self.size = image_size(self.t2i)
        self.embedders = Embedders(self.cfg, device)
        self.storage = Storage(self.cfg.concepts.output)
        self._progress: dict = {}

    def info(self) -> dict:
        return {"pid": os.getpid(), "fingerprint": self.fingerprint, "device": self.device}

    def progress(self) -> dict:
        return dict(self._progress, pid=os.getpid())

    # -- one job ---------------------------------------------------------------------------------------------

    def _references(self, job: ConceptJob) -> list[np.ndarray]:
        return [_decode_reference(read_image_bytes(loc), loc, self.size) for loc in job.images]

    def _prior(self, job: ConceptJob, n: int) -> list[tuple[np.ndarray, str]]:
        """ICO's class images: real images with their own captions from ``concepts.prior_images`` (a folder of
        images, each with an optional same-named ``.txt`` caption, default ``"a photo of a {noun}"``), else ``n``
        images generated by the base from ``"a photo of a {noun}"``."""
        from pipeline.concept_jobs import _list_images

        folder = self.cfg.concepts.prior_images
        if folder:
            folder = folder.format(noun=job.noun)
            out = []
            for loc in _list_images(folder):
                image = _decode_reference(read_image_bytes(loc), loc, self.size)
                caption_loc = loc.rsplit(".", 1)[0] + ".txt"
                try:
                    caption = read_image_bytes(caption_loc).decode("utf-8").strip()
                except ValueError:
                    caption = ""
                out.append((image, caption or f"a photo of a {job.noun}"))
            if not out:
                raise ValueError(f"concepts.prior_images = {folder}: no images")
            return out
        ico = _method("ico")
        steps = self.cfg.concepts.sample.steps or 50
        return ico.class_prior_images(self.t2i, job.noun, n, seed=job.seed + 7919, steps=steps, device=self.device)

    def _check_noun(self, job: ConceptJob) -> None:
        ids = self.t2i.tokenizer(job.noun, add_special_tokens=False).input_ids
        if job.method == "em":
            return
        if job.method == "ico" and len(ids) != 1:
            raise ValueError(f"noun {job.noun!r} is {len(ids)} tokens for this tokenizer; ICO needs a class noun of "
                             f"exactly one token (its frozen embedding follows the new tokens)")
        if not ids:
            raise ValueError(f"noun {job.noun!r} has no tokens")

    def train(self, job: ConceptJob):
        """Train ``job`` on the loaded base; return the method's concept object."""
        self._check_noun(job)
        refs = self._references(job)
        params = build_params(params_class(job.method), job.params, f"{job.concept_id}: params")

        def on_step(step: int, loss: float) -> None:
            self._progress.update(step=int(step), loss=float(loss), time=time.time())

        if job.method == "ico":
            n_prior = len(refs) if params.prior_weight > 0 else 0
            prior = self._prior(job, n_prior) if n_prior else []
            return _method("ico").train_ico(self.t2i, refs, job.noun, params, job.seed, prior=prior,
                                            device=self.device, on_step=on_step), refs
        if job.method == "em":
            image_of = dict(zip(params.tokens, params.images_of_tokens))
            gt = {token: _decode_mask(read_image_bytes(loc), loc, self.size,
                                      _image_hw(read_image_bytes(job.images[image_of[token]])))
                  for token, loc in job.masks.items()}
            return _method("em").train_em(self.t2i, refs, params, job.seed, gt_masks=gt, device=self.device,
                                          on_step=on_step), refs
        return _method("infusion").train_infusion(self.t2i, refs, job.noun, params, job.seed,
                                                  device=self.device, on_step=on_step), refs

    def run(self, job_json: dict) -> dict:
        """Run one job end to end; never raises for a job's own failure (returns ``ok: False`` + error)."""
        from training.errors import is_transient

        job = ConceptJob(**job_json)
        t0 = time.time()
        self._progress = {"key": job.key, "step": 0, "time": t0}
        try:
            return self._run(job, t0)
        except Exception as exc:  # noqa: BLE001 — classified and reported in the job table
            transient = is_transient(exc) or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError))
            log.warning("concept job %s failed: %s", job.key, exc)
            return {"ok": False, "transient": transient, "error": f"{type(exc).__name__}: {exc}",
                    "duration_s": time.time() - t0}
        finally:
            self._progress = {}

    def check_base(self) -> None:
        """This node's base model is the driver's (else its artifacts would be recorded under another base)."""
        from pipeline.models import mismatch

        if self.expected_fingerprint is not None and self.fingerprint != self.expected_fingerprint:
            raise mismatch("concept worker", "t2i", self.t2i_dir, self.fingerprint, self.expected_fingerprint)

    def _run(self, job: ConceptJob, t0: float) -> dict:
        self.check_base()
        concept, refs = self.train(job)
        train_s = time.time() - t0
        cfg = self.cfg.concepts
        phrase = concept_phrase(job.method, concept)
        prompts = [cfg.eval.prompts[i % len(cfg.eval.prompts)].format(phrase) for i in range(cfg.samples_per_job)]
        seeds = [job.seed + i for i in range(len(prompts))]
        samples = sample_concepts(self.t2i, job.method, [concept], prompts, seeds, self.cfg, self.device) if prompts else []
        metrics = concept_metrics(self.embedders, job.method, concept, samples, prompts, refs) if samples else {}
        if hasattr(concept, "base_fingerprint"):
            concept.base_fingerprint = self.fingerprint
        with tempfile.TemporaryDirectory(prefix="cafe-concept-") as tmp:
            local = Path(tmp)
            files = concept.save(local)
            for i, img in enumerate(samples):
                (local / "samples").mkdir(exist_ok=True)
                (local / "samples" / f"{i:03d}.png").write_bytes(_to_png(img))
            weights = sum((local / f).stat().st_size for f in files if str(f).endswith(".safetensors"))
            files = [str(Path(f).relative_to(local)) if Path(f).is_absolute() else str(f) for f in files]
            meta = {"concept_id": job.concept_id, "method": job.method, "run_id": job.run_id, "noun": job.noun,
                    "images": job.images, "seed": job.seed, "params": job.params, "base_fingerprint": self.fingerprint,
                    "base_path": str(self.t2i_dir), "tokens": list(getattr(concept, "tokens", ())),
                    "layer_names": list(getattr(concept, "layer_names", [])), "weights_bytes": weights,
                    "train_s": train_s, "final_loss": (concept.losses[-1] if getattr(concept, "losses", None) else None),
                    "sample_prompts": prompts, "sample_seeds": seeds}
            (local / "job.json").write_text(json.dumps(meta, indent=2))
            (local / "metrics.json").write_text(json.dumps(metrics, indent=2))
            out = self.storage.sub(job.artifact)
            for p in sorted(q for q in local.rglob("*") if q.is_file()):
                out.write_bytes(str(p.relative_to(local)), p.read_bytes())
            out.write_bytes(SUCCESS_MARKER, json.dumps({"finished_at": time.time()}).encode())
        return {"ok": True, "duration_s": time.time() - t0, "metrics": metrics, "weights_bytes": weights}

    # -- generation on the pool ------------------------------------------------------------------------------

    def generate(self, requests: list[dict], out_uri: str) -> list[dict]:
        """Serve generate requests (see :func:`generate_batch`); one result row per request."""
        out = Storage(out_uri)
        rows = []
        for req in requests:
            row = {"index": req["index"], "concepts": ",".join(req["concepts"]), "prompt": req["prompt"],
                   "seed": req.get("seed", 0), "dci": bool(req.get("dci", False)), "image": None, "error": None}
            try:
                self.check_base()
                method, concepts, prompt = resolve_request(self.storage, req["concepts"], req["prompt"],
                                                           req.get("method"), self.fingerprint,
                                                           int(self.cfg.concepts.cache_mb * 2**20))
                img = sample_concepts(self.t2i, method, concepts, [prompt], [row["seed"]], self.cfg, self.device,
                                      dci=row["dci"], lam=req.get("lam"), aux_noun=req.get("aux_noun"))[0]
                name = f"{req['index']:06d}.png"
                out.write_bytes(name, _to_png(img))
                row["image"] = out.uri_of(name)
            except (ConceptError, ValueError, KeyError) as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
        return rows


# ------------------------------------------------------------------------------------------ finding concepts


#: loaded concepts, least recently used first: (location, method) → (concept, bytes)
_CONCEPT_CACHE: "OrderedDict[tuple[str, str], tuple[Any, int]]" = OrderedDict()
DEFAULT_CACHE_BYTES = 2048 << 20


def concept_bytes(concept) -> int:
    """Bytes of every tensor a loaded concept holds (its attributes, dicts of tensors, modules' parameters)."""
    import torch

    total, seen = 0, set()

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for value in vars(concept).values():
        for v in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(v, torch.nn.Module):
                for t in list(v.parameters()) + list(v.buffers()):
                    add(t)
            else:
                add(v)
    return total


def latest_run(storage: Storage, concept_id: str, method: str | None = None,
               base_fingerprint: str | None = None) -> tuple[str, str]:
    """``(method, artifact path)`` of the most recently finished run of ``concept_id`` trained on the base whose
    fingerprint is ``base_fingerprint`` (any base when None)."""
    table = JobTable(storage)
    done = [r for r in table.records() if r["concept_id"] == concept_id and r["state"] == "done"
            and (method is None or r["method"] == method)]
    done = [r for r in done if storage.exists(f"{r['artifact']}/{SUCCESS_MARKER}")]
    if base_fingerprint is not None and done:
        bases = {r["key"]: storage.sub(r["artifact"]).read_json("job.json", {}).get("base_fingerprint") for r in done}
        matching = [r for r in done if bases[r["key"]] == base_fingerprint]
        if not matching:
            raise ConceptError(f"concept {concept_id!r} was trained on another base model "
                               f"({', '.join(sorted(set(map(str, bases.values()))))}), not on models.t2i "
                               f"({base_fingerprint}): retrain it on this base")
        done = matching
    if not done:
        known = sorted({r["concept_id"] for r in table.records() if r["state"] == "done"})
        raise ConceptError(f"no finished run of concept {concept_id!r}" + (f" ({method})" if method else "")
                           + f" under {storage.root}; finished concepts: {', '.join(known) or 'none'}")
    rec = max(done, key=lambda r: r.get("finished_at") or 0)
    return rec["method"], rec["artifact"]


def load_concept(storage: Storage, method: str, artifact: str, cache_bytes: int = DEFAULT_CACHE_BYTES):
    """Load a finished artifact (copied to a local temp dir when the output is remote); kept in a per-process
    LRU cache of at most ``cache_bytes`` (``concepts.cache_mb``) of host memory."""
    key = (storage.uri_of(artifact), method)
    if key in _CONCEPT_CACHE:
        _CONCEPT_CACHE.move_to_end(key)
        return _CONCEPT_CACHE[key][0]
    mod = _method(method)
    cls = {"ico": "IcoConcept", "infusion": "InfusionConcept", "em": "EmConcept"}[method]
    cls = getattr(mod, cls)
    with tempfile.TemporaryDirectory(prefix="cafe-concept-load-") as tmp:
        sub = storage.sub(artifact)
        for rel in sub.list("", recursive=True):
            if rel.startswith("samples/") or ".tmp-" in rel:
                continue
            dest = Path(tmp) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(sub.read_bytes(rel))
        concept = cls.load(tmp)
    remember(key, concept, cache_bytes)
    return concept


def remember(key: tuple[str, str], concept, cache_bytes: int) -> None:
    """Cache ``concept`` (most recently used last), evicting the least recently used until the cache holds at
    most ``cache_bytes``; a concept larger than the whole budget is not cached."""
    size = concept_bytes(concept)
    if size > cache_bytes:
        return
    _CONCEPT_CACHE[key] = (concept, size)
    _CONCEPT_CACHE.move_to_end(key)
    while sum(b for _, b in _CONCEPT_CACHE.values()) > cache_bytes:
        _CONCEPT_CACHE.popitem(last=False)


def resolve_request(storage: Storage, concept_ids: Sequence[str], prompt: str, method: str | None = None,
                    base_fingerprint: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
    """``(method, concepts, prompt with '{}' filled)`` for a generate request (concepts of this base only)."""
    if not concept_ids:
        raise ConceptError("name at least one concept")
    found = [latest_run(storage, cid, method, base_fingerprint) for cid in concept_ids]
    methods = {m for m, _ in found}
    if len(methods) != 1:
        raise ConceptError(f"concepts {', '.join(concept_ids)} mix methods {sorted(methods)}; compose Infusion concepts")
    m = methods.pop()
    concepts = [load_concept(storage, m, a, cache_bytes) for _, a in found]
    if "{}" in prompt:
        if len(concepts) != 1:
            raise ConceptError("'{}' is ambiguous with several concepts: write each class noun in the prompt")
        prompt = prompt.replace("{}", concept_phrase(m, concepts[0]))
    if m == "infusion":
        words = re.findall(r"[\w'-]+", prompt)
        missing = [c.noun for c in concepts if c.noun not in words]
        if missing:
            raise ConceptError(f"prompt {prompt!r} does not contain the class noun(s) {missing}: Infusion puts each "
                               f"concept at its noun")
    elif m == "em":
        if len(concepts) != 1:
            raise ConceptError("EM composes the tokens of one concept: name one EM concept (its job's tokens)")
        if not any(t in prompt for t in concepts[0].tokens):
            raise ConceptError(f"prompt {prompt!r} names none of the concept's tokens {concepts[0].tokens} (or '{{}}')")
    elif m == "ico":
        phrase = concept_phrase(m, concepts[0])
        if phrase not in prompt:
            raise ConceptError(f"prompt {prompt!r} does not contain the concept phrase {phrase!r} (or '{{}}')")
    return m, concepts, prompt


# ------------------------------------------------------------------------------------------ the driver


def _actor_options(cfg: CafeConfig) -> tuple[dict, str]:
    a = cfg.concepts.actors
    device = "cuda" if a.num_gpus > 0 else cfg.models.t2i.device
    return {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus, "max_concurrency": 2}, device


def run_jobs(source: str | os.PathLike, config: str | os.PathLike | None = None, overrides: list[str] | None = None,
             address: str | None = None, echo=print, retry_failed: bool = False) -> dict:
    """Run every job of ``source`` on an actor pool; return ``{"done", "failed", "skipped", "records"}``.

    Re-running the same source resumes: finished jobs are skipped, a dead driver's running jobs are retried.
    Raises :class:`pipeline.store.OutputBusy` when another live driver holds the output.
    """
    from pipeline.local_ray import ray_session
    from training.models.fingerprint import fingerprint

    cfg, raw_jobs = load_jobs(source, config, overrides)
    t2i_dir = cfg.models.role_dir("t2i")
    if not t2i_dir.is_dir():
        raise ConceptError(f"models.t2i -> {t2i_dir}: directory does not exist")
    base_fp = fingerprint(t2i_dir)
    jobs = [parse_job(raw, cfg, base_fp, i) for i, raw in enumerate(raw_jobs)]
    keys = [j.key for j in jobs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConceptError(f"the job source lists the same job twice: {', '.join(dupes)}")
    storage = Storage(cfg.concepts.output)
    lease = Lease(storage.sub("_jobs"), ttl_s=cfg.concepts.lease_ttl_s, heartbeat_s=min(10.0, cfg.concepts.lease_ttl_s / 4))
    with lease.held():
        table = JobTable(storage)
        records = {j.key: table.record(j, cfg.concepts.max_attempts, retry_failed) for j in jobs}
        todo = [j for j in jobs if records[j.key]["state"] == "queued"]
        skipped = sum(1 for j in jobs if records[j.key]["state"] == "done")
        echo(f"concepts: {len(jobs)} job(s): {len(todo)} to run, {skipped} already done, "
             f"{sum(1 for r in records.values() if r['state'] == 'failed')} failed")
        if todo:
            with ray_session(cfg, address):
                _schedule(cfg, todo, table, records, lease, echo, base_fp)
        final = [table.get(j.key) for j in jobs]
    done = sum(1 for r in final if r["state"] == "done")
    failed = [r for r in final if r["state"] == "failed"]
    echo(format_status(final))
    return {"done": done, "failed": len(failed), "skipped": skipped, "records": final}


def _schedule(cfg: CafeConfig, todo: list[ConceptJob], table: JobTable, records: dict, lease: Lease, echo,
              base_fingerprint: str | None = None) -> None:
    import ray

    opts, device = _actor_options(cfg)
    worker_cls = ray.remote(ConceptWorker)
    cfg_json = cfg.model_dump(mode="json")
    n_actors = min(cfg.concepts.actors.num_actors, len(todo))
    counter = iter(range(10**9))

    def new_actor():
        name = f"concept-worker-{next(counter)}"
        return name, worker_cls.options(**opts).remote(cfg_json, device, base_fingerprint)

    actors = dict(new_actor() for _ in range(n_actors))
    idle = list(actors)
    queue = list(todo)
    running: dict[Any, tuple[str, ConceptJob, float]] = {}   # ref -> (actor name, job, start)
    pids: dict[str, int] = {}

    def put(job: ConceptJob, **fields) -> dict:
        rec = records[job.key]
        rec.update(fields)
        table.put(rec)
        return rec

    while queue or running:
        lease.check()
        while queue and idle:
            name = idle.pop(0)
            job = queue.pop(0)
            rec = records[job.key]
            ref = actors[name].run.remote(job.to_json())
            running[ref] = (name, job, time.time())
            put(job, state="running", attempts=rec["attempts"] + 1, owner=name, heartbeat=time.time(),
                started_at=time.time(), step=0, owner_pid=pids.get(name))
            echo(f"concepts: {job.key} → {name} (attempt {rec['attempts']})")
        ready, _ = ray.wait(list(running), num_returns=1, timeout=cfg.concepts.heartbeat_s)
        for ref in ready:
            name, job, start = running.pop(ref)
            rec = records[job.key]
            durations = list(rec.get("durations_s") or [])
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                result = {"ok": False, "transient": True, "error": f"actor {name} died: {type(exc).__name__}",
                          "duration_s": time.time() - start}
                actors.pop(name, None)
                pids.pop(name, None)
                fresh, handle = new_actor()
                actors[fresh] = handle
                name = fresh
            durations.append(round(float(result.get("duration_s", time.time() - start)), 3))
            idle.append(name)
            if result["ok"]:
                put(job, state="done", finished_at=time.time(), durations_s=durations, error=None, owner=None,
                    metrics=result.get("metrics"), weights_bytes=result.get("weights_bytes"))
                echo(f"concepts: {job.key} done in {durations[-1]:.1f}s {result.get('metrics') or ''}")
            elif result["transient"] and rec["attempts"] < cfg.concepts.max_attempts:
                put(job, state="queued", durations_s=durations, error=result["error"], owner=None)
                queue.append(job)
                echo(f"concepts: {job.key} attempt {rec['attempts']} failed ({result['error']}); retrying")
            else:
                put(job, state="failed", finished_at=time.time(), durations_s=durations, error=result["error"],
                    owner=None)
                echo(f"concepts: {job.key} FAILED: {result['error']}")
        # heartbeats: ask each busy actor where its job is (answered by the actor's second thread)
        for ref, (name, job, _) in list(running.items()):
            try:
                prog = ray.get(actors[name].progress.remote(), timeout=max(1.0, cfg.concepts.heartbeat_s))
            except Exception:  # noqa: BLE001 — a dying actor shows up on its run() ref
                continue
            pids[name] = prog.get("pid")
            put(job, heartbeat=time.time(), step=prog.get("step"), owner_pid=prog.get("pid"))
    for handle in actors.values():
        ray.kill(handle)


def job_status(source: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
               overrides: list[str] | None = None) -> str:
    """The job table of the concepts output that ``source``/``config`` names, as text."""
    if source is not None:
        cfg, _ = load_jobs(source, config, overrides)
    else:
        cfg, _ = load_jobs(config or "configs/concepts/tiny.yaml", None, overrides)
    return format_status(JobTable(Storage(cfg.concepts.output)).records())


# ------------------------------------------------------------------------------------------ generate / eval


class _Local:
    """The base model and embedders in this process (``generate``/``eval`` without a pool)."""

    def __init__(self, cfg: CafeConfig, fingerprint: str | None = None):
        from training.models.kit import fingerprint as fingerprint_of
        from training.models.kit import load_role, resolve_device

        spec = cfg.models.t2i
        self.device = str(resolve_device(spec.device))
        self.t2i = load_role("t2i", cfg.models.role_dir("t2i"), dtype=spec.dtype, device=self.device).components
        self.fingerprint = fingerprint or fingerprint_of(cfg.models.role_dir("t2i"))
        self.embedders = Embedders(cfg, self.device)


def generate(config: str | os.PathLike, concepts: Sequence[str], prompt: str, seed: int = 0, out: str | None = None,
             dci: bool = False, lam: float | None = None, aux_noun: str | None = None, method: str | None = None,
             overrides: list[str] | None = None, num_images: int = 1) -> list[str]:
    """Generate ``num_images`` images of finished concept(s) for ``prompt``; return the written paths.

    ``'{}'`` in the prompt stands for the concept phrase. Several concepts compose (Infusion: each Δ at its own
    class noun). ``dci`` samples an ICO concept with DCI (λ = ``lam``, auxiliary noun automatic unless given).
    """
    from training.data.ids import stable_hash
    from training.models.fingerprint import fingerprint

    cfg, _ = load_jobs(config, None, overrides)
    storage = Storage(cfg.concepts.output)
    # the request is resolved (concepts found, prompt checked) before any model loads: a typo answers at once
    base = fingerprint(cfg.models.role_dir("t2i"))
    m, loaded, text = resolve_request(storage, concepts, prompt, method, base, int(cfg.concepts.cache_mb * 2**20))
    local = _Local(cfg, fingerprint=base)  # the base's weights hashed once
    seeds = [seed + i for i in range(num_images)]
    images = sample_concepts(local.t2i, m, loaded, [text] * num_images, seeds, cfg, local.device, dci=dci, lam=lam,
                             aux_noun=aux_noun)
    out_dir = Path(out or Path(cfg.run.output_dir) / "concepts-generate")
    out_dir.mkdir(parents=True, exist_ok=True)
    # named by concepts, method, sampler and prompt: another prompt or method never overwrites an image
    tag = "-".join(concepts) + f"-{m}" + ("-dci" if dci else "") + f"-{stable_hash(text, lam, aux_noun)[:8]}"
    paths = []
    for s, img in zip(seeds, images):
        p = out_dir / f"{tag}-seed{s}.png"
        p.write_bytes(_to_png(img))
        paths.append(str(p))
    return paths


def masks(config: str | os.PathLike, concept_id: str, image: str | None = None, out: str | None = None,
          tokens: Sequence[str] | None = None, overrides: list[str] | None = None, seed: int = 0) -> list[str]:
    """Write an EM concept's token masks as PNGs and an overlay; return the written paths.

    Without ``image``: the masks the job ended with (on its own images). With ``image`` (a path or URI): the
    trained tokens' masks estimated on that image (the concept's UNet, the job's mask settings and CRF).
    """
    from training.models.fingerprint import fingerprint

    cfg, _ = load_jobs(config, None, overrides)
    storage = Storage(cfg.concepts.output)
    base = fingerprint(cfg.models.role_dir("t2i"))
    _, artifact = latest_run(storage, concept_id, "em", base)
    concept = load_concept(storage, "em", artifact, int(cfg.concepts.cache_mb * 2**20))
    em = _method("em")
    out_dir = Path(out or Path(cfg.run.output_dir) / "concepts-masks" / concept_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image is None:
        if concept.masks is None:
            raise ConceptError(f"concept {concept_id!r}: its artifact holds no masks")
        job = storage.sub(artifact).read_json("job.json", {})
        pictures = [_decode_reference(read_image_bytes(loc), loc, concept.masks.shape[-1]) for loc in job["images"]]
        found = {t: concept.masks[k] for k, t in enumerate(concept.tokens) if not tokens or t in tokens}
        per_image = {t: concept.token_images[k] for k, t in enumerate(concept.tokens)}
    else:
        local = _Local(cfg, fingerprint=base)
        size = image_size(local.t2i)
        pictures = [_decode_reference(read_image_bytes(image), image, size)]
        try:
            _, found = em.concept_masks(local.t2i, concept, pictures[0], tokens=tokens, seed=seed, device=local.device)
        except ValueError as exc:
            raise ConceptError(str(exc)) from None
        per_image = {t: 0 for t in found}
    paths = []
    for k, (token, mask) in enumerate(found.items()):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", token).strip("_.") or f"token{k}"
        p = out_dir / f"{k:02d}-{name}.png"
        p.write_bytes(_to_png(mask.astype(np.uint8) * 255))
        paths.append(str(p))
        picture = pictures[per_image[token]].astype(np.float32)
        over = picture.copy()
        over[mask] = 0.45 * picture[mask] + 0.55 * np.array([255.0, 0.0, 0.0])
        p = out_dir / f"{k:02d}-{name}-overlay.png"
        p.write_bytes(_to_png(over.round().astype(np.uint8)))
        paths.append(str(p))
    return paths


def generate_batch(config: str | os.PathLike, requests: list[dict], out: str, overrides: list[str] | None = None,
                   address: str | None = None) -> list[dict]:
    """Many (concepts, prompt) requests on the actor pool; images under ``out`` plus ``out/results.parquet``.

    A request: ``{"concepts": [ids], "prompt": str, "seed"?: int, "dci"?: bool, "lam"?: float, "aux_noun"?: str,
    "method"?: str}``; a request that cannot be served gets its ``error`` and the others are served.
    """
    import pyarrow as pa
    import ray

    from pipeline.local_ray import ray_session

    cfg, _ = load_jobs(config, None, overrides)
    reqs = [dict(r, index=i, concepts=[r["concepts"]] if isinstance(r.get("concepts"), str) else list(r.get("concepts") or []))
            for i, r in enumerate(requests)]
    opts, device = _actor_options(cfg)
    with ray_session(cfg, address):
        worker_cls = ray.remote(ConceptWorker)
        n = max(1, min(cfg.concepts.actors.num_actors, len(reqs)))
        from training.models.fingerprint import fingerprint

        base = fingerprint(cfg.models.role_dir("t2i"))
        actors = [worker_cls.options(**opts).remote(cfg.model_dump(mode="json"), device, base) for _ in range(n)]
        parts = [reqs[i::n] for i in range(n)]
        rows = [r for part in ray.get([a.generate.remote(p, out) for a, p in zip(actors, parts) if p]) for r in part]
        for a in actors:
            ray.kill(a)
    rows.sort(key=lambda r: r["index"])
    Storage(out).write_parquet("results.parquet", pa.Table.from_pylist(rows))
    return rows


def evaluate(config: str | os.PathLike, concept_id: str, method: str | None = None,
             overrides: list[str] | None = None) -> dict:
    """CLIP-T / CLIP-I / DINO of a finished concept over ``concepts.eval`` prompts (and LFD/W2 when
    ``concepts.eval.divergence``); written to the artifact's ``eval.json`` and returned."""
    cfg, _ = load_jobs(config, None, overrides)
    storage = Storage(cfg.concepts.output)
    local = _Local(cfg)
    m, artifact = latest_run(storage, concept_id, method, local.fingerprint)
    concept = load_concept(storage, m, artifact, int(cfg.concepts.cache_mb * 2**20))
    meta = storage.sub(artifact).read_json("job.json")
    size = image_size(local.t2i)
    refs = [_decode_reference(read_image_bytes(loc), loc, size) for loc in meta["images"]]
    ev = cfg.concepts.eval
    phrase = concept_phrase(m, concept)
    prompts = [p.format(phrase) for p in ev.prompts for _ in range(ev.samples_per_prompt)]
    seeds = [meta["seed"] + 1000 + i for i in range(len(prompts))]
    images = sample_concepts(local.t2i, m, [concept], prompts, seeds, cfg, local.device)
    result = {"concept_id": concept_id, "method": m, "run_id": meta["run_id"], "prompts": ev.prompts,
              "samples_per_prompt": ev.samples_per_prompt,
              **concept_metrics(local.embedders, m, concept, images, prompts, refs)}
    if ev.divergence:
        result.update(_divergence(cfg, local, m, concept, meta, refs))
    storage.sub(artifact).write_json("eval.json", result)
    return result


def _divergence(cfg: CafeConfig, local: _Local, method: str, concept, meta: dict, refs: list[np.ndarray]) -> dict:
    """W2 and LFD of the customized model against its base (SPEC §3, D5).

    * ``w2``: Gaussians fitted to VAE latents (posterior mean × the VAE scaling factor, pooled to 4×8×8) of
      ``w2_samples`` base samples of the super-class prompts ``eval.w2_prompts`` and as many customized samples of
      the same prompts **naming the concept** (the noun replaced by the concept phrase: ICO's identifier tokens;
      Infusion's concept is its class noun), same seeds: the concept's own diversity, as the papers measure it.
    * ``w2_class_drift``: the customized model on the bare super-class prompts (for Infusion the same samples).
    * ``w2_baseline``: two independent draws of the base (other seeds): what W2 is at this sample count when
      nothing changed. With fewer samples than the 256 pooled dimensions the estimator's bias dominates (two draws
      of one distribution: W2 ≈ 18 at n = 32, 4.5 at n = 1,000 on SD latents); a warning is logged and the result
      says so (``w2_note``).
    * LFD: over the non-customized prompts ``eval.lfd_prompts``, data latents from the reference images, t uniform,
      ``lfd_samples`` draws; reported as the mean over latent elements.
    """
    import torch

    from training import metrics
    from training.methods.infusion import foundational_eps
    from training.sampling import ddim_scheduler

    ev = cfg.concepts.eval
    t2i = local.t2i
    kw = _sample_kwargs(cfg)
    n = ev.w2_samples
    prompts = [ev.w2_prompts[i % len(ev.w2_prompts)].format(noun=concept.noun) for i in range(n)]
    phrase = concept_phrase(method, concept)
    named = [ev.w2_prompts[i % len(ev.w2_prompts)].format(noun=phrase) for i in range(n)]
    seeds = [meta["seed"] + 5000 + i for i in range(n)]
    other = [meta["seed"] + 5000 + n + i for i in range(n)]  # the baseline's second draw of the base
    mod = _method(method)
    base, custom, drift, base2 = [], [], [], []
    for i in range(0, n, SAMPLE_CHUNK):
        p, q, sd, so = prompts[i:i + SAMPLE_CHUNK], named[i:i + SAMPLE_CHUNK], seeds[i:i + SAMPLE_CHUNK], \
            other[i:i + SAMPLE_CHUNK]
        if method == "ico":
            base += mod.sample(t2i, None, p, sd, device=local.device, **kw)
            base2 += mod.sample(t2i, None, p, so, device=local.device, **kw)
            custom += mod.sample(t2i, concept, q, sd, device=local.device, **kw)
            drift += mod.sample(t2i, concept, p, sd, device=local.device, **kw)
        else:  # Infusion names its concept by the class noun: the named prompts are the class prompts
            c, b = mod.sample(t2i, [concept], p, sd, device=local.device, **kw)
            custom += c
            base += b
            base2 += mod.sample(t2i, [concept], p, so, device=local.device, **kw)[1]
    drift = drift or custom
    scale = float(getattr(t2i.vae.config, "scaling_factor", 1.0))

    def latents(images):  # re-encoded from the uint8 images: both sides of W2 alike (documented)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        parts = []
        with torch.no_grad():
            for i in range(0, len(x), SAMPLE_CHUNK):
                chunk = x[i:i + SAMPLE_CHUNK].to(t2i.vae.device, t2i.vae.dtype)
                parts.append(t2i.vae.encode(chunk).latent_dist.mean.float().cpu() * scale)
        return torch.cat(parts)

    lfd_prompts = [p for p in ev.lfd_prompts if concept.noun not in re.findall(r"[\w'-]+", p)]
    if not lfd_prompts:
        raise ConceptError(f"concepts.eval.lfd_prompts all contain the concept's noun {concept.noun!r}: LFD needs "
                           f"non-customized prompts")
    custom_eps = (mod.customized_eps(t2i, concept, local.device, output="raw") if method == "ico"
                  else mod.customized_eps(t2i, [concept], local.device, output="raw"))
    lfd = metrics.latent_fisher_divergence(foundational_eps(t2i, local.device, output="raw"), custom_eps,
                                           latents(refs), lfd_prompts, ddim_scheduler(t2i.scheduler.config),
                                           ev.lfd_samples, torch.Generator().manual_seed(int(meta["seed"])))
    base_latents = latents(base)
    out = {"w2": metrics.gaussian_w2(base_latents, latents(custom), pool=W2_POOL),
           "w2_class_drift": metrics.gaussian_w2(base_latents, latents(drift), pool=W2_POOL),
           "w2_baseline": metrics.gaussian_w2(base_latents, latents(base2), pool=W2_POOL), "w2_samples": n,
           "w2_prompts": sorted(set(named)), "lfd": lfd["lfd"], "lfd_se": lfd["lfd_se"],
           "lfd_samples": lfd["num_samples"], "lfd_prompts": lfd_prompts}
    dims = metrics.pool_latents(base_latents[:1], W2_POOL).shape[1]
    if n < dims:
        out["w2_note"] = (f"{n} samples < {dims} pooled dimensions: W2 is dominated by estimator bias here "
                          f"(compare with w2_baseline {out['w2_baseline']:.3f}); the papers use 1,000")
        log.warning("W2: %s", out["w2_note"])
    return out


def read_requests(path: str) -> list[dict]:
    """Generate requests from a JSONL file or a Parquet table."""
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def format_metrics(result: dict) -> str:
    """``cafe concepts eval`` output: one metric per line."""
    lines = [f"concept {result['concept_id']} ({result['method']}, run {result['run_id']}): "
             f"{result['num_images']} images over {len(result['prompts'])} prompt(s)"]
    for key in ("clip_t", "clip_i", "dino", "lfd", "w2", "w2_baseline", "w2_class_drift"):
        if key in result:
            lines.append(f"  {key:<14} {result[key]:.4f}")
    if "w2_note" in result:
        lines.append(f"  note: {result['w2_note']}")
    return "\n".join(lines)
