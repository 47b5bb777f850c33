"""``cafe export``: a built dataset in the shapes other training stacks read.

Usage::

    export_messages("outputs/tiny", "outputs/tiny-messages")            # local path or s3:// URI, both sides
    datasets.load_dataset("outputs/tiny-messages", split="train")       # messages + images, decoded

``messages`` format (LLaVA-style conversations, the layout TRL's ``SFTTrainer`` and transformers' chat templates
take for vision-language models): one row per kept pair with

* ``messages``: ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
  {"role": "assistant", "content": [{"type": "text", "text": assistant_text}]}]`` — the image placeholder is the
  source image, the assistant's turn its answer;
* ``images``: ``[input_image]`` (the ``Image`` feature, as the placeholders order them);
* ``target_image``: the generated target (what CAFE's diffusion model is trained to produce; kept beside the
  conversation because CAFE's MLLM also regresses its CLIP embedding), ``id``, ``round``.

The rows travel in Ray Data blocks (read Parquet → map → write Parquet): no driver loop over rows. The card
(``README.md``) declares the features, so ``datasets`` decodes the images.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.store import Storage, is_uri
from training.data import schema

log = logging.getLogger(__name__)

FORMATS = ("messages",)
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_CONTENT = pa.struct([("type", pa.string()), ("text", pa.string())])
_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(_CONTENT))])
MESSAGES_SCHEMA = pa.schema([(schema.ID, pa.string()), (schema.ROUND, pa.int64()), ("messages", pa.list_(_MESSAGE)),
                             ("images", pa.list_(_IMAGE)), (schema.TARGET_IMAGE, _IMAGE)])


@dataclass
class ExportResult:
    out: str
    rows: int


def to_messages(batch: pa.Table) -> pa.Table:
    """A block of dataset rows → the ``messages`` layout (see the module docstring)."""
    d = batch.to_pydict()
    messages = [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": u}]},
                 {"role": "assistant", "content": [{"type": "text", "text": a}]}]
                for u, a in zip(d[schema.USER_TEXT], d[schema.ASSISTANT_TEXT])]
    return pa.Table.from_pydict({
        schema.ID: d[schema.ID], schema.ROUND: d[schema.ROUND], "messages": messages,
        "images": [[img] for img in d[schema.INPUT_IMAGE]], schema.TARGET_IMAGE: d[schema.TARGET_IMAGE],
    }, schema=MESSAGES_SCHEMA)


def _card(rows: int, num_bytes: int, source: str) -> str:
    import datasets
    import yaml

    features = datasets.Features({
        schema.ID: datasets.Value("string"), schema.ROUND: datasets.Value("int64"),
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()), schema.TARGET_IMAGE: datasets.Image(),
    })
    header = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
              "dataset_info": {"features": features._to_yaml_list(),
                               "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": rows}]}}
    return ("---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n"
            f"# CAFE dataset as chat messages\n\nExported by `cafe export --format messages` from `{source}`: "
            f"{rows} conversations (user: the source image + request; assistant: the answer), the source image in "
            "`images`, the generated target in `target_image`.\n")


def export_messages(dataset_dir: str, out_dir: str, address: str | None = None, cfg=None) -> ExportResult:
    """Write ``out_dir/data/*.parquet`` + ``out_dir/README.md`` from the kept rows of ``dataset_dir`` (a
    ``cafe build`` output); an existing export there is replaced."""
    import ray.data

    from pipeline.config import load_config_dict
    from pipeline.local_ray import ray_session

    src = Storage(dataset_dir if is_uri(dataset_dir) else str(Path(dataset_dir).absolute()))
    if not src.exists("dataset/data"):
        raise FileNotFoundError(f"{dataset_dir}: no dataset/data (a `cafe build` output directory is expected)")
    out = Storage(out_dir if is_uri(out_dir) else str(Path(out_dir).absolute()))
    if out.uri.rstrip("/") == src.uri.rstrip("/"):
        raise ValueError("--out must differ from the dataset directory")
    cfg = cfg or load_config_dict({})
    columns = [schema.ID, schema.ROUND, schema.INPUT_IMAGE, schema.USER_TEXT, schema.ASSISTANT_TEXT,
               schema.TARGET_IMAGE]
    with ray_session(cfg, address):
        if out.exists("data"):
            out.delete_dir("data")
        shards = [k for k in src.list("dataset/data") if k.endswith(".parquet")]
        rows = num_bytes = 0
        if shards:
            ds = ray.data.read_parquet(src.uri_of("dataset/data"), columns=columns)
            ds.map_batches(to_messages, batch_format="pyarrow", batch_size=256).write_parquet(out.uri_of("data"))
            if out.exists("data"):
                written = ray.data.read_parquet(out.uri_of("data"))
                rows, num_bytes = written.count(), int(written.size_bytes())
    out.write_bytes("README.md", _card(rows, num_bytes, src.uri).encode())
    log.info("export: %d conversations → %s", rows, out.uri)
    return ExportResult(out.uri, rows)
