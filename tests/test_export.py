"""`cafe export --format messages`: a build output's kept rows as chat conversations + images, written by Ray Data
and read back by `datasets` (images decoded), including an output whose dataset has no shard."""
from __future__ import annotations

import io
import shutil

import pytest

from tests.test_report import make_out, write_kept
from training.data import schema

pytestmark = pytest.mark.integration


def _load(path):
    import datasets

    return datasets.load_dataset(str(path), split="train")


def test_messages_export_loads_in_datasets_with_images(tmp_path, capsys, ray_local):
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.cli import main

    out = make_out(tmp_path)
    assert main(["export", str(out), "--out", str(tmp_path / "msg"), "--address",
                 ray_local.get_runtime_context().gcs_address]) == 0
    assert "exported 3 conversation(s)" in capsys.readouterr().out
    src = {r[schema.ID]: r for r in pq.read_table(out / "dataset" / "data").to_pylist()}
    ds = _load(tmp_path / "msg")
    assert sorted(ds[schema.ID]) == sorted(src)
    for row in ds:
        s = src[row[schema.ID]]
        user, assistant = row["messages"]
        assert user["role"] == "user" and [c["type"] for c in user["content"]] == ["image", "text"]
        assert user["content"][1]["text"] == s[schema.USER_TEXT]
        assert assistant == {"role": "assistant", "content": [{"type": "text", "text": s[schema.ASSISTANT_TEXT]}]}
        (image,) = row["images"]  # decoded by datasets, pixel-equal to the source image
        with Image.open(io.BytesIO(s[schema.INPUT_IMAGE]["bytes"])) as want:
            assert list(image.convert("RGB").getdata()) == list(want.convert("RGB").getdata())
        assert row[schema.TARGET_IMAGE].size == Image.open(io.BytesIO(s[schema.TARGET_IMAGE]["bytes"])).size

    write_kept(out, [], num_shards=0)  # a build that kept nothing: an export with no rows, still loadable
    shutil.rmtree(tmp_path / "msg")
    assert main(["export", str(out), "--out", str(tmp_path / "msg"), "--address",
                 ray_local.get_runtime_context().gcs_address]) == 0
    assert "exported 0 conversation(s)" in capsys.readouterr().out
    assert (tmp_path / "msg" / "README.md").is_file()
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
