"""Sources: bad inputs are quarantined with a reason and nothing is lost (folder build on Ray; table stage in-process)."""
from __future__ import annotations

import io
import os
import struct
import zlib

import datasets
import numpy as np
import pytest
from PIL import Image

from pipeline.build import run_build
from tests.buildutil import as_config, read_parquet_dir, tiny_build_config
from training.data import schema as S


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(seed: int, size=(40, 56)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def _bomb_png(width=100_000, height=100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


GOOD = {"person/good1.png", "person/good2.jpg", "cat/gray.png", "cat/cmyk.jpg", "cat/rgba.png", "cat/deep16.png"}
BAD = {  # relative path -> quarantine reason
    "cat/truncated.png": "truncated_image",
    "cat/empty.png": "empty_file",
    "cat/notimage.png": "not_an_image",
    "cat/bomb.png": "decompression_bomb",
    "cat/tiny.png": "too_small",
    "cat/dangling.png": "unreadable_file",
    "orphan.png": "no_class",
}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    (root / "person").mkdir()
    (root / "cat").mkdir()
    _rgb(1).save(root / "person/good1.png")
    _rgb(2).save(root / "person/good2.jpg")
    Image.new("L", (50, 50), 100).save(root / "cat/gray.png")
    Image.new("CMYK", (50, 50), (0, 0, 0, 0)).save(root / "cat/cmyk.jpg")
    Image.new("RGBA", (50, 50), (255, 0, 0, 0)).save(root / "cat/rgba.png")
    Image.fromarray(np.full((50, 50), 65535, dtype=np.uint16)).save(root / "cat/deep16.png")
    full = _png(_rgb(3))
    (root / "cat/truncated.png").write_bytes(full[: len(full) // 2])
    (root / "cat/empty.png").write_bytes(b"")
    (root / "cat/notimage.png").write_text("this is not an image\n")
    (root / "cat/bomb.png").write_bytes(_bomb_png())
    Image.new("RGB", (1, 1)).save(root / "cat/tiny.png")
    os.symlink(root / "cat/missing-target.png", root / "cat/dangling.png")  # unreadable even for root
    _rgb(4).save(root / "orphan.png")
    fd = os.open(os.path.join(os.fsencode(root), b"person", b"bad\xffname.png"), os.O_WRONLY | os.O_CREAT)
    os.write(fd, _png(_rgb(5)))
    os.close(fd)
    return root


def _folder_cfg(tiny_models, root):
    return as_config(tiny_build_config(tiny_models, sources={"kind": "folder", "path": str(root)},
                                       instructions={"per_source": 1}, rows_per_chunk=4))


@pytest.mark.integration
def test_folder_build_quarantines_every_bad_input(tiny_models, bad_folder, tmp_path, ray_local):
    cfg = _folder_cfg(tiny_models, bad_folder)
    result = run_build(cfg, out_dir=tmp_path / "out")
    quarantine = read_parquet_dir(tmp_path / "out" / "quarantine" / "data").to_pylist()
    by_input = {os.path.relpath(r[S.Q_INPUT], str(bad_folder)): r for r in quarantine}
    assert {k: v[S.Q_REASON] for k, v in by_input.items()} == BAD
    assert all(r[S.Q_STAGE] == "sources" and r[S.Q_DETAIL] for r in quarantine)
    ds = datasets.Dataset(read_parquet_dir(tmp_path / "out" / "dataset" / "data"))  # features from the metadata
    n_good = len(GOOD) + 1
    assert len(ds) == n_good and len(set(ds[S.SOURCE_ID])) == n_good
    assert all(r[S.INPUT_IMAGE].size == (64, 64) and r[S.INPUT_IMAGE].mode == "RGB" for r in ds)
    funnel = {f["stage"]: f for f in result.manifest["funnel"]}
    assert funnel["sources"] == {"stage": "sources", "unit": "sources", "in": n_good + len(BAD), "out": n_good,
                                 "removed": {r: 1 for r in BAD.values()}}
    for f in funnel.values():
        assert f["in"] == f["out"] + sum(f["removed"].values())
    assert {k: result.manifest["counts"][k] for k in ("kept", "candidates", "quarantined")} == {
        "kept": n_good, "candidates": n_good, "quarantined": len(BAD)}
    # the grayscale source became RGB grey, the transparent one white (the stated policy)
    grey = [r for r in ds if r[S.SOURCE_URI].endswith("gray.png")][0][S.INPUT_IMAGE]
    assert np.array(grey)[0, 0].tolist() == [100, 100, 100]
    white = [r for r in ds if r[S.SOURCE_URI].endswith("rgba.png")][0][S.INPUT_IMAGE]
    assert np.array(white)[0, 0].tolist() == [255, 255, 255]


def test_no_usable_source_fails_before_ray_starts(tiny_models, tmp_path, capsys):
    """An empty folder, or images without class sub-folders: exit 2 with the reason and the settings to check,
    before Ray starts or a model loads; a fixed input is then planned afresh."""
    import ray
    import yaml

    from pipeline.build import NoUsableSources
    from pipeline.cli import main

    ray_before = ray.is_initialized()  # another test's cluster may be up: no new one may start
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoUsableSources, match=r"0 input\(s\) listed, none usable \(nothing listed\)"):
        run_build(_folder_cfg(tiny_models, empty), out_dir=tmp_path / "out-empty")
    flat = tmp_path / "flat"  # one image, not in a class sub-folder
    flat.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(flat / "a.png")
    data = _folder_cfg(tiny_models, flat).model_dump(mode="json")
    (tmp_path / "flat.yaml").write_text(yaml.safe_dump(data))
    assert main(["build", str(tmp_path / "flat.yaml"), "--out", str(tmp_path / "out-flat")]) == 2
    err = capsys.readouterr().err
    assert "1 input(s) listed, none usable" in err and "build.sources.class_from" in err
    assert ray.is_initialized() == ray_before
    assert not list((tmp_path / "out-flat").rglob("_PLAN.json"))  # no plan recorded for an unusable input
    # the input fixed (a class sub-folder), the same output plans again instead of reusing the empty plan
    (flat / "cat").mkdir()
    (flat / "a.png").rename(flat / "cat" / "a.png")
    from pipeline.build import write_plan, stage_keys
    from pipeline.store import Storage

    cfg = _folder_cfg(tiny_models, flat)
    chunks = write_plan(cfg, Storage(tmp_path / "out-flat"), stage_keys(cfg, {})["plan"], [])
    assert len(chunks) == 1


def test_a_build_that_keeps_no_row_exits_1_with_its_funnel(tmp_path, capsys, monkeypatch):
    """The CLI's end of a build that kept nothing (here a stand-in result: producing one takes a whole build, and
    the build's own counts are tested elsewhere): the funnel is printed, then a one-line error, exit 1."""
    import pipeline.build as build
    from pipeline.cli import EXIT_FAILURE, EXIT_OK, main

    funnel = [{"stage": "filter", "unit": "rows", "in": 6, "out": 0, "removed": {"dino_below_min": 6}}]
    manifest = {"counts": {"kept": 0, "candidates": 6, "quarantined": 0}, "funnel": funnel}
    monkeypatch.setattr(build, "run_build", lambda cfg, **kw: build.BuildResult(kw["out_dir"], manifest))
    import pathlib

    config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert main(["build", config, "--out", str(tmp_path / "out")]) == EXIT_FAILURE
    out, err = capsys.readouterr()
    assert "kept 0 rows · candidates 6" in out and "report:" not in out  # no report was written: none named
    assert "the build kept no row of 6 candidate(s)" in err and "build.rules" in err and len(err.splitlines()) == 1
    manifest["counts"]["kept"] = 2
    assert main(["build", config, "--out", str(tmp_path / "out")]) == EXIT_OK
