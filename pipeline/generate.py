"""``cafe generate``: CAFE assistant inference from the command line, as a Python function, and in batch mode.

Usage::

    result = generate(cfg, image="x.png", text="Can you generate ...?", seed=0, out_dir="outputs/generate")
    summary = generate_batch(cfg, "requests.jsonl", out_dir="outputs/generate")   # Ray Data, one actor pool

Models: the config's roles (t2i's VAE + scheduler, clip_cond, dino_cond, llm) and the trained weights that
``cafe train`` exported to ``<train.output_dir>/mllm`` and ``<train.output_dir>/diffusion``.
Batch requests (Parquet or JSONL): ``image`` (path or URI), ``text``, optional ``clip_image`` (direct mode),
``seed`` and ``id``. Every request ends as a row of ``results/`` (Parquet) with the image path and the response,
or with the error that stopped it; the others go on. Models and outputs may be on storage URIs (``s3://``):
trained weights are copied once into the local cache, images and results are written through ``pyarrow.fs``.
Inference runs on ``train.generate.device`` (``auto``: the GPU when one is visible).
"""
from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.store import Storage, is_uri

log = logging.getLogger(__name__)


class GenerateError(ValueError):
    """A request cannot be served: a missing or unreadable image, empty text, missing trained weights."""


@dataclass
class GenerateResult:
    response: str
    image_path: str
    clip_source: str


def read_image(location: str) -> np.ndarray:
    """uint8 (H, W, 3) from a local path or a storage URI; :class:`GenerateError` when missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not location:
        raise GenerateError("no image given")
    try:
        if is_uri(location):
            parent, _, name = location.rstrip("/").rpartition("/")
            data = Storage(parent).read_bytes(name)
        else:
            p = Path(location)
            if not p.is_file():
                raise GenerateError(f"image not found: {location}")
            data = p.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except GenerateError:
        raise
    except FileNotFoundError:
        raise GenerateError(f"image not found: {location}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise GenerateError(f"image not readable: {location} ({type(exc).__name__}: {exc})") from None


def trained_dirs(cfg, need_mllm: bool) -> tuple[str | None, str]:
    """``train.output_dir``'s ``mllm`` and ``diffusion`` as local directories (a local copy when on a URI)."""
    from pipeline.store import Storage, local_copy

    root = Storage(cfg.train.output_dir)
    has_mllm = root.is_file("mllm/mllm.json")
    if not root.is_file("diffusion/conditioner.json"):
        raise GenerateError(f"no trained diffusion model at {root.uri_of('diffusion')}: run `cafe train diffusion "
                            "CONFIG` first")
    if need_mllm and not has_mllm:
        raise GenerateError(f"no trained MLLM at {root.uri_of('mllm')}: run `cafe train mllm CONFIG` first "
                            "(or use --clip-from-image for the direct mode)")
    return (local_copy(root.uri_of("mllm")) if has_mllm else None), local_copy(root.uri_of("diffusion"))


def inference_device(cfg, in_pool: bool = False) -> str:
    """``train.generate.device``: ``auto`` → in a batch actor, ``cuda`` exactly when the pool asks Ray for GPUs
    (``num_gpus_per_actor`` > 0: Ray gives the actor its GPU; an actor that asked for none must not take one,
    and Ray does not hide the node's GPUs from it); in a plain process, ``cuda`` when it sees a GPU."""
    g = cfg.train.generate
    if g.device != "auto":
        return g.device
    if in_pool:
        return "cuda" if g.num_gpus_per_actor > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_assistant(cfg, need_mllm: bool = True, device: str | None = None):
    """The assistant on ``device`` (default: :func:`inference_device`), every model in its role dtype."""
    from pipeline.train import role_refs
    from training.assistant import Assistant

    mllm_dir, diffusion_dir = trained_dirs(cfg, need_mllm)
    device = device or inference_device(cfg)
    log.info("loading the assistant on %s", device)
    return Assistant.load(role_refs(cfg), mllm_dir, diffusion_dir, device=device,
                          max_new_tokens=cfg.train.mllm.max_new_tokens)


def _check_text(text: str | None, clip_image: str | None) -> str:
    text = (text or "").strip()
    if not text and not clip_image:
        raise GenerateError("the text is empty: say what to generate (or give --clip-from-image)")
    return text


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def generate(cfg, image: str, text: str | None, seed: int = 0, clip_from_image: str | None = None,
             out_dir: str = "outputs/generate", assistant=None, name: str | None = None) -> GenerateResult:
    """One request: writes ``<out_dir>/<name>.png`` and returns the response."""
    text = _check_text(text, clip_from_image)
    x = read_image(image)
    y = read_image(clip_from_image) if clip_from_image else None
    assistant = assistant or load_assistant(cfg, need_mllm=clip_from_image is None)
    g = cfg.train.generate
    out = assistant.generate(x, text, seed=seed, clip_image=y, steps=g.num_inference_steps,
                             guidance=g.guidance_scale, scale_dino=g.scale_dino, guidance_dino=g.guidance_dino)
    name = name or f"{Path(image).stem}-seed{seed}"
    store = Storage(out_dir if is_uri(out_dir) else str(Path(out_dir).absolute()))
    store.write_bytes(f"{name}.png", _png(out.image))
    return GenerateResult(out.response, store.uri_of(f"{name}.png"), out.clip_source)


def generate_cli(args) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.requests:
        summary = generate_batch(cfg, args.requests, args.out, address=args.address)
        print(f"{summary.requests - summary.failed} of {summary.requests} request(s) generated; results: "
              f"{summary.results}")
        return 1 if summary.failed else 0
    if not args.image:
        raise GenerateError("--image is required (or --requests for batch mode)")
    result = generate(cfg, args.image, args.text, seed=args.seed, clip_from_image=args.clip_from_image,
                      out_dir=args.out)
    print(f"response: {result.response}" if result.response else "response: (direct mode: no MLLM response)")
    print(f"image: {result.image_path}")
    return 0


# ---------------------------------------------------------------------------------------------
# batch mode (Ray Data)
# ---------------------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class _GenerateActor:
    def __init__(self, cfg_json: str, out_dir: str):
        from pipeline.config import load_config_dict

        self.cfg = load_config_dict(json.loads(cfg_json))
        self.out_dir = out_dir
        self.assistant = None
        self.load_error = None
        try:
            self.assistant = load_assistant(self.cfg, need_mllm=False, device=inference_device(self.cfg, in_pool=True))
        except GenerateError as exc:
            self.load_error = str(exc)

    def __call__(self, batch: dict) -> dict:
        from training.data.ids import stable_hash

        ids, responses, paths, errors = [], [], [], []
        n = len(batch["image"])
        for i in range(n):
            clip_image = batch.get("clip_image", [None] * n)[i] or None
            seed = int(batch["seed"][i]) if "seed" in batch and batch["seed"][i] is not None else 0
            # a request without an id is named by what it asks (unique across batches and actors)
            rid = str(batch["id"][i]) if "id" in batch and batch["id"][i] is not None else \
                stable_hash(batch["image"][i], batch["text"][i], clip_image, seed)[:16]
            response, path, error = "", "", ""
            try:
                if self.load_error:
                    raise GenerateError(self.load_error)
                if clip_image is None and self.assistant.mllm is None:
                    raise GenerateError("no trained MLLM: this request needs clip_image (direct mode)")
                r = generate(self.cfg, str(batch["image"][i]), batch["text"][i], seed=seed,
                             clip_from_image=clip_image, out_dir=f"{self.out_dir}/images",
                             assistant=self.assistant, name=_SAFE.sub("_", rid))
                response, path = r.response, r.image_path
            except GenerateError as exc:
                error = str(exc)
            ids.append(rid)
            responses.append(response)
            paths.append(path)
            errors.append(error)
        return {"id": np.array(ids, dtype=object), "response": np.array(responses, dtype=object),
                "image_path": np.array(paths, dtype=object), "error": np.array(errors, dtype=object)}


@dataclass
class BatchSummary:
    requests: int
    failed: int
    results: str  # the results' Parquet directory (local path or URI)


def generate_batch(cfg, requests: str, out_dir: str, address: str | None = None) -> BatchSummary:
    """Every request of a Parquet/JSONL file (local or URI) through one actor pool (GPU actors with
    ``train.generate.num_gpus_per_actor``). Results stream out as the actors finish them: images under
    ``<out_dir>/images/``, one row per request in ``<out_dir>/results/`` (Parquet shards: id, response,
    image_path, error), written by Ray Data while later requests are still generating."""
    import ray.data
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    from pipeline.local_ray import ray_session

    out_dir = out_dir if is_uri(out_dir) else str(Path(out_dir).absolute())
    src = requests if is_uri(requests) else str(Path(requests).absolute())
    if not is_uri(requests) and not Path(requests).is_file():
        raise GenerateError(f"requests file not found: {requests}")
    g = cfg.train.generate
    store = Storage(out_dir)
    with ray_session(cfg, address):
        ds = ray.data.read_parquet(src) if src.endswith(".parquet") else ray.data.read_json(src)
        missing = {"image", "text"} - set(ds.columns())
        if missing:
            raise GenerateError(f"{requests}: requests need the columns image and text (missing {sorted(missing)})")
        out = ds.map_batches(_GenerateActor, fn_constructor_args=(json.dumps(cfg.model_dump(mode="json")), out_dir),
                             batch_size=g.batch_size, batch_format="numpy",
                             compute=ActorPoolStrategy(size=g.num_actors), num_gpus=g.num_gpus_per_actor,
                             num_cpus=1)
        if store.exists(RESULTS):
            store.delete_dir(RESULTS)  # a re-run replaces the results (its images are overwritten by name)
        out.write_parquet(store.uri_of(RESULTS))
        results = ray.data.read_parquet(store.uri_of(RESULTS))
        total = results.count()
        failed = results.filter(expr=col("error") != "").count()
    return BatchSummary(total, failed, store.uri_of(RESULTS))


RESULTS = "results"
