"""pipeline.sources: listing and reading sources — real files, Parquet and Arrow on disk, no Ray.

Every policy of the module docstring has a test here: containment, one id per file, declared and numeric
classes, hidden entries, non-files, the build's output inside the root, bad table cells and manifest entries.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from filtering.images import ImagePolicy, ImageRejected, decode_image
from pipeline.config import ConfigError, load_config_dict
from pipeline.sources import SourceReader, iter_sources, read_source
from tests.s3util import s3_bucket, s3_server  # noqa: F401  (fixtures)
from training.data.ids import row_id, source_id, stable_hash, stable_int


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


def _old_sid(*parts: object) -> str:
    """The id formula of the first release (pipeline/build.py ``_sid``): ids must not change."""
    return hashlib.sha256("|".join(map(str, parts)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _cfg(tmp_path, **sources):
    return load_config_dict({"run": {"seed": 0}, "models": {"root": str(tmp_path / "models")},
                             "build": {"sources": sources}})


def _policy(cfg) -> ImagePolicy:
    return ImagePolicy.from_sources_config(cfg.build.sources)


def _outcome(source, cfg, reader=None) -> tuple[str, str]:
    """(reason, detail) of a source after reading and decoding, or ("ok", size) when it is usable."""
    try:
        image = decode_image(read_source(source, cfg, _policy(cfg), reader), _policy(cfg))
    except ImageRejected as err:
        return err.reason.value, err.detail
    return "ok", f"{image.size}"


def _by_rel(sources, root) -> dict[str, dict]:
    return {os.path.relpath(s["uri"], str(root)): s for s in sources}


# ------------------------------------------------------------------------------------------------ ids


def test_ids_keep_the_formulas_of_the_first_release():
    assert source_id("file", "cat/x.png") == _old_sid("file", "cat/x.png")
    odd = os.fsdecode(b"cat/bad\xffname.png")  # surrogate escapes hash as the raw bytes
    assert source_id("file", odd) == hashlib.sha256(b"file|cat/bad\xffname.png").hexdigest()[:16]
    assert stable_hash("a", 1) == hashlib.sha256(b"a|1").hexdigest()
    for parts in [("row", 0, "abc"), ("instructions", 7, "0123456789abcdef"), ("finetune", 2**31 - 1, "")]:
        digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
        assert stable_int(*parts) == int.from_bytes(digest[:8], "big") & (2**31 - 1)
        assert stable_int(*parts, bits=8) == int.from_bytes(digest[:8], "big") & 255
    assert row_id(0, "0123456789abcdef", "on the beach") == hashlib.sha256(
        b"0|0123456789abcdef|on the beach").hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ folders

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


def test_enumeration_is_deterministic_and_keeps_odd_names(tmp_path, bad_folder):
    cfg = _cfg(tmp_path, kind="folder", path=str(bad_folder))
    a, b = list(iter_sources(cfg)), list(iter_sources(cfg))
    assert a == b and len(a) == len(GOOD) + len(BAD) + 1
    assert len({s["source_id"] for s in a}) == len(a)
    odd = [s for s in a if "bad" in s["uri"] and "name" in s["uri"]]
    assert len(odd) == 1 and odd[0]["uri"].encode("utf-8")  # valid UTF-8 text for the dataset
    assert odd[0]["uri"].endswith("person/bad\\xffname.png")
    assert os.path.exists(odd[0]["path"])  # the real (non-UTF-8) file is still reachable
    assert json.loads(json.dumps(a)) == a  # the plan is JSON


def test_folder_sources_quarantine_every_bad_input_and_keep_the_good(tmp_path, bad_folder):
    cfg = _cfg(tmp_path, kind="folder", path=str(bad_folder))
    outcomes = {rel: _outcome(s, cfg) for rel, s in _by_rel(iter_sources(cfg), bad_folder).items()}
    assert {rel: o[0] for rel, o in outcomes.items() if o[0] != "ok"} == BAD
    good = {rel for rel, o in outcomes.items() if o[0] == "ok"}
    assert good == GOOD | {"person/bad\\xffname.png"}
    assert all(outcomes[rel][1] == "(64, 64)" for rel in good)
    assert all(detail for reason, detail in outcomes.values())


def test_source_ids_are_the_first_release_ids(tmp_path, bad_folder):
    cfg = _cfg(tmp_path, kind="folder", path=str(bad_folder))
    by_rel = _by_rel(iter_sources(cfg), bad_folder)
    assert by_rel["person/good1.png"]["source_id"] == _old_sid("file", "person/good1.png")
    assert by_rel["person/bad\\xffname.png"]["source_id"] == _old_sid("file", os.fsdecode(b"person/bad\xffname.png"))
    assert by_rel["cat/dangling.png"]["source_id"] == _old_sid("file", "cat/dangling.png")
    gen = list(iter_sources(_cfg(tmp_path, kind="generate", classes=["cat", "dog"], num_per_class=2)))
    assert [(s["class_name"], s["index"]) for s in gen] == [("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1)]
    assert [s["source_id"] for s in gen] == [_old_sid("generate", c, i, 0) for c in ("cat", "dog") for i in (0, 1)]
    assert all(s["kind"] == "generate" and s["uri"].startswith("generate://") for s in gen)
    with pytest.raises(ValueError, match="generate"):
        read_source(gen[0], cfg, _policy(cfg))


def test_details_are_identical_between_runs_and_carry_no_addresses(tmp_path, bad_folder):
    cfg = _cfg(tmp_path, kind="folder", path=str(bad_folder))

    def run():
        reader = SourceReader()
        return [(s["source_id"], *_outcome(s, cfg, reader)) for s in iter_sources(cfg)]

    first = run()
    assert first == run()
    details = [d for _, reason, d in first if reason != "ok"]
    assert details and not any("0x" in d or " at 0x" in d for d in details)


def _tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_numeric_folder_classes_are_quarantined_unless_declared(tmp_path):
    png = _png(_rgb(0))
    root = _tree(tmp_path / "ffhq", {"00000/00001.png": png, "01000/01001.png": png, "1_0.5-2/x.png": png,
                                     "dogs/d.png": png})
    numeric = {"00000/00001.png", "01000/01001.png", "1_0.5-2/x.png"}

    by_rel = _by_rel(iter_sources(_cfg(tmp_path, kind="folder", path=str(root))), root)
    assert {r for r, s in by_rel.items() if s.get("reject", [None])[0] == "numeric_class"} == numeric
    assert "reject" not in by_rel["dogs/d.png"] and by_rel["dogs/d.png"]["class_name"] == "dogs"
    assert "allow_numeric_classes" in by_rel["00000/00001.png"]["reject"][1]

    fixed = _cfg(tmp_path, kind="folder", path=str(root), class_from="fixed", class_name="face")
    assert {(s["class_name"], "reject" in s) for s in iter_sources(fixed)} == {("face", False)}
    fixed_ids = {s["uri"]: s["source_id"] for s in iter_sources(fixed)}
    assert fixed_ids == {s["uri"]: s["source_id"] for s in by_rel.values()}  # the class does not change the id

    allowed = _cfg(tmp_path, kind="folder", path=str(root), allow_numeric_classes=True)
    assert sorted(s["class_name"] for s in iter_sources(allowed)) == ["00000", "01000", "1_0.5-2", "dogs"]


def test_class_folder_name_that_is_not_utf8_is_a_bad_class(tmp_path):
    root = tmp_path / "src"
    os.makedirs(os.path.join(os.fsencode(root), b"caf\xe9"))
    with open(os.path.join(os.fsencode(root), b"caf\xe9", b"x.png"), "wb") as f:
        f.write(_png(_rgb(0)))
    (source,) = iter_sources(_cfg(tmp_path, kind="folder", path=str(root)))
    assert source["reject"] == ["bad_class", "the class 'caf\\xe9' is not valid UTF-8"]
    assert source["class_name"] == "caf\\xe9" and source["uri"].endswith("caf\\xe9/x.png")
    json.dumps(source).encode("utf-8")  # storable


def test_fixed_class_accepts_files_directly_in_the_root(tmp_path):
    root = _tree(tmp_path / "flat", {"a.png": _png(_rgb(0)), "b.png": _png(_rgb(1))})
    assert [s.get("reject", [None])[0] for s in iter_sources(_cfg(tmp_path, kind="folder", path=str(root)))] == [
        "no_class", "no_class"]
    cfg = _cfg(tmp_path, kind="folder", path=str(root), class_from="fixed", class_name="dog")
    assert [(s["class_name"], _outcome(s, cfg)[0]) for s in iter_sources(cfg)] == [("dog", "ok"), ("dog", "ok")]


@pytest.mark.parametrize("sources, match", [
    ({"kind": "folder", "path": "x", "class_from": "fixed"}, "class_name"),
    ({"kind": "folder", "path": "x", "class_name": "dog"}, "class_name"),
    ({"kind": "folder", "path": "x", "class_from": "manifest"}, "manifest"),
    ({"kind": "table", "path": "x", "class_from": "folder"}, "class_from"),
    ({"kind": "generate", "class_from": "fixed", "class_name": "dog"}, "class_from"),
    ({"kind": "generate", "classes": ["cat", "cat"]}, "once"),
])
def test_class_declarations_are_validated(tmp_path, sources, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **sources)


def test_hidden_entries_and_non_files_are_counted_not_lost(tmp_path):
    png = _png(_rgb(0))
    root = _tree(tmp_path / "src", {"cat/a.png": png, "cat/.DS_Store": b"junk", ".git/objects/x": b"1",
                                    ".git/HEAD": b"2", "cat/x.png/inner.png": png, "cat/.hid/y.png": png})
    (root / "cat" / "empty.png").mkdir()
    os.mkfifo(root / "cat" / "pipe.png")
    cfg = _cfg(tmp_path, kind="folder", path=str(root))
    reasons = {rel: s.get("reject", ["ok"])[0] for rel, s in _by_rel(iter_sources(cfg), root).items()}
    assert reasons == {
        ".git": "hidden_file",  # a hidden folder is one entry; its contents are not listed
        "cat/.DS_Store": "hidden_file",
        "cat/.hid": "hidden_file",
        "cat/a.png": "ok",
        "cat/empty.png": "not_a_file",
        "cat/pipe.png": "not_a_file",
        "cat/x.png": "not_a_file",
        "cat/x.png/inner.png": "ok",  # a directory named like an image is reported, and its files listed
    }
    pipe = next(s for s in iter_sources(cfg) if s["uri"].endswith("pipe.png"))
    assert pipe["reject"] == ["not_a_file", "not a regular file (fifo)"]
    with pytest.raises(ImageRejected) as info:  # a planning reject is raised by read_source too: one code path
        read_source(pipe, cfg, _policy(cfg))
    assert info.value.reason.value == "not_a_file"


def test_symlinks_are_contained_and_followed_only_to_files_inside(tmp_path):
    png = _png(_rgb(0))
    outside = _tree(tmp_path / "outside", {"secret.png": png, "dir/s.png": png})
    root = _tree(tmp_path / "src", {"cat/a.png": png})
    (root / "dog").mkdir()
    os.symlink(outside / "secret.png", root / "cat" / "leak.png")
    os.symlink(outside / "dir", root / "dogdir")
    os.symlink(root / "cat" / "a.png", root / "dog" / "alias.png")  # inside: the same file as cat/a.png
    os.symlink(root / "cat", root / "cats")  # a directory inside: not followed (its files are listed at cat/)
    cfg = _cfg(tmp_path, kind="folder", path=str(root))
    sources = _by_rel(iter_sources(cfg), root)
    assert {rel: s.get("reject", ["ok"])[0] for rel, s in sources.items()} == {
        "cat/a.png": "ok", "cat/leak.png": "outside_root", "cats": "not_a_file", "dog/alias.png": "duplicate",
        "dogdir": "outside_root"}
    assert sources["cat/a.png"]["source_id"] == source_id("file", "cat/a.png")
    assert sources["cat/a.png"]["source_id"] in sources["dog/alias.png"]["reject"][1]
    assert len({s["source_id"] for s in sources.values()}) == len(sources)


def test_read_source_checks_containment_again(tmp_path):
    """A link swapped after planning to point outside the root is refused when read."""
    png = _png(_rgb(0))
    _tree(tmp_path / "outside", {"secret.png": png})
    root = _tree(tmp_path / "src", {"cat/real.png": png})
    os.symlink(root / "cat" / "real.png", root / "cat" / "link.png")
    cfg = _cfg(tmp_path, kind="folder", path=str(root))
    link = next(s for s in iter_sources(cfg) if s["uri"].endswith("link.png"))
    assert "reject" not in link  # listed first (sorted), so it holds the id and cat/real.png is the duplicate
    os.unlink(root / "cat" / "link.png")
    os.symlink(tmp_path / "outside" / "secret.png", root / "cat" / "link.png")
    assert _outcome(link, cfg)[0] == "outside_root"


def test_build_output_inside_the_source_is_skipped(tmp_path):
    png = _png(_rgb(0))
    root = _tree(tmp_path / "src", {"cat/a.png": png})
    out = root / "out"
    cfg = _cfg(tmp_path, kind="folder", path=str(root))
    before = list(iter_sources(cfg, exclude_uris=[out]))
    _tree(out, {"dataset/data/train-0.parquet": b"x", "report/samples.png": png})
    assert list(iter_sources(cfg, exclude_uris=[out])) == before  # a re-run sees what the first run saw
    assert len(list(iter_sources(cfg))) == 3  # without the exclusion the output would be ingested
    # a relative spelling of the same place is excluded too
    rel_out = os.path.relpath(out)
    assert list(iter_sources(cfg, exclude_uris=[rel_out])) == before
    # a manifest entry that names a file in the output is counted, not read
    (root / "m.csv").write_text("file,class\ncat/a.png,cat\nout/report/samples.png,cat\n")
    man = _cfg(tmp_path, kind="folder", path=str(root), manifest="m.csv")
    assert [s.get("reject", ["ok"])[0] for s in iter_sources(man, exclude_uris=[out])] == ["ok", "in_output"]
    with pytest.raises(ValueError, match="inside the build's output"):
        list(iter_sources(_cfg(tmp_path, kind="folder", path=str(out / "dataset")), exclude_uris=[out]))


# ------------------------------------------------------------------------------------------------ manifests


def test_manifest_spellings_of_one_file_are_one_source(tmp_path):
    png = _png(_rgb(0))
    root = _tree(tmp_path / "src", {"a/x.png": png, "a/b/y.png": png})
    rows = ["a/x.png", "a/./x.png", "a//x.png", "a/b/../x.png", "a/b/y.png"]
    (root / "m.csv").write_text("file,class\n" + "".join(f"{r},thing\n" for r in rows))
    cfg = _cfg(tmp_path, kind="folder", path=str(root), manifest="m.csv")
    sources = list(iter_sources(cfg))
    assert [s.get("reject", ["ok"])[0] for s in sources] == ["ok", "duplicate", "duplicate", "duplicate", "ok"]
    assert sources[0]["source_id"] == _old_sid("file", "a/x.png")
    assert sources[0]["uri"] == os.path.join(str(root), "a/x.png")
    assert all(sources[0]["source_id"] in s["reject"][1] for s in sources[1:4])
    assert len({s["source_id"] for s in sources}) == len(sources)
    assert [_outcome(s, cfg)[0] for s in sources] == ["ok", "duplicate", "duplicate", "duplicate", "ok"]
    assert {s["class_name"] for s in sources} == {"thing"}


def test_manifest_paths_that_leave_the_root_are_never_read(tmp_path, monkeypatch):
    png = _png(_rgb(0))
    _tree(tmp_path / "outside", {"secret.png": png})
    root = _tree(tmp_path / "src", {"a/x.png": png})
    os.symlink(tmp_path / "outside", root / "a" / "escape")
    entries = ["../outside/secret.png", str(tmp_path / "outside/secret.png"), "a/../../outside/secret.png",
               "a/escape/secret.png", "a/x.png"]
    (root / "m.json").write_text(json.dumps([{"file": f, "class": "c"} for f in entries]))
    cfg = _cfg(tmp_path, kind="folder", path=str(root), manifest="m.json")
    opened = []
    real_open = open

    def spy(path, *args, **kwargs):
        opened.append(os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    sources = list(iter_sources(cfg))
    monkeypatch.setattr("builtins.open", spy)
    outcomes = [_outcome(s, cfg) for s in sources]
    assert [o[0] for o in outcomes] == ["outside_root"] * 4 + ["ok"]
    assert not any("outside" in p for p in opened)
    assert "absolute" in outcomes[1][1]


def test_bad_manifest_entries_are_quarantined_not_fatal(tmp_path):
    png = _png(_rgb(0))
    root = _tree(tmp_path / "src", {"a/x.png": png, "a/y.png": png})
    entries = [{"file": 12, "class": "c"}, {"file": None, "class": "c"}, "a/x.png", {"class": "c"},
               {"file": "", "class": "c"}, {"file": "a/x.png", "class": 3}, {"file": "a/y.png"},
               {"file": "a/y.png", "class": "cat"}, {"file": "a", "class": "c"}]
    (root / "m.json").write_text(json.dumps(entries))
    cfg = _cfg(tmp_path, kind="folder", path=str(root), manifest="m.json")
    sources = list(iter_sources(cfg))
    assert [s.get("reject", ["ok"])[0] for s in sources] == [
        "bad_manifest_entry", "bad_manifest_entry", "bad_manifest_entry", "bad_manifest_entry",
        "bad_manifest_entry", "bad_class", "no_class", "duplicate", "ok"]  # a/y.png listed twice: one source
    assert sources[0]["reject"][1] == "entry 0 'file' holds int; expected text"
    assert sources[5]["reject"][1] == "the class holds int; expected text"
    assert len({s["source_id"] for s in sources}) == len(sources)
    assert _outcome(sources[8], cfg)[0] == "not_a_file"  # a directory listed by the manifest


def test_manifest_class_from_folder_and_missing_columns(tmp_path):
    png = _png(_rgb(0))
    root = _tree(tmp_path / "src", {"dog/x.png": png})
    (root / "m.csv").write_text("file\ndog/x.png\n")
    cfg = _cfg(tmp_path, kind="folder", path=str(root), manifest="m.csv", class_from="folder")
    assert [(s["class_name"], "reject" in s) for s in iter_sources(cfg)] == [("dog", False)]
    with pytest.raises(ValueError, match="no column 'class'"):
        list(iter_sources(_cfg(tmp_path, kind="folder", path=str(root), manifest="m.csv")))
    with pytest.raises(FileNotFoundError, match="manifest"):
        list(iter_sources(_cfg(tmp_path, kind="folder", path=str(root), manifest="missing.csv")))


# ------------------------------------------------------------------------------------------------ tables


def test_table_sources_decode_and_quarantine(tmp_path):
    """Parquet with image bytes, HF Image structs, and every kind of bad cell: each row counted."""
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([
        {"bytes": _png(_rgb(7)), "path": None}, {"bytes": None, "path": None}, {"bytes": b"garbage", "path": None},
        {"bytes": _png(_rgb(8)), "path": None}, {"bytes": None, "path": "/elsewhere/x.png"},
        {"bytes": _png(_rgb(9)), "path": None}, {"bytes": b"x" * 2_000_000, "path": None},
    ], type=struct_type)
    classes = pa.array(["dog", "dog", "cat", "", "cat", "cat", "cat"])
    pq.write_table(pa.table({"image": images, "class": classes}), tmp_path / "src.parquet")
    cfg = _cfg(tmp_path, kind="table", path=str(tmp_path / "src.parquet"), max_file_mb=1.0)
    sources = list(iter_sources(cfg))
    assert [s["source_id"] for s in sources] == [_old_sid("table", "src.parquet", r) for r in range(7)]
    assert [s["uri"] for s in sources] == [f"{tmp_path / 'src.parquet'}#{r}" for r in range(7)]
    outcomes = [_outcome(s, cfg) for s in sources]
    assert [o[0] for o in outcomes] == ["ok", "empty_file", "not_an_image", "no_class", "empty_file", "ok",
                                        "file_too_large"]
    assert "path only" in outcomes[4][1]
    assert outcomes[0][1] == "(64, 64)"


def test_non_bytes_cells_and_non_text_classes_are_counted(tmp_path):
    # a column of mixed content cannot exist in Arrow: one file per cell type
    pq.write_table(pa.table({"image": pa.array([1, 2]), "class": ["a", "b"]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"image": ["not bytes"], "class": ["a"]}), tmp_path / "strs.parquet")
    pq.write_table(pa.table({"image": [_png(_rgb(0))] * 2, "class": pa.array([4, None])}), tmp_path / "c.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    cfg = _cfg(tmp_path, kind="table", path=str(tmp_path))
    sources = list(iter_sources(cfg))
    got = [(os.path.basename(s["file"]), s["row"], _outcome(s, cfg)) for s in sources]
    assert [(f, r, o[0]) for f, r, o in got] == [
        ("broken.parquet", -1, "unreadable_file"), ("c.parquet", 0, "bad_class"), ("c.parquet", 1, "no_class"),
        ("ints.parquet", 0, "bad_cell"), ("ints.parquet", 1, "bad_cell"), ("strs.parquet", 0, "bad_cell")]
    assert got[3][2][1] == "image cell holds int; expected bytes or an HF Image struct"
    assert got[5][2][1] == "image cell holds str; expected bytes or an HF Image struct"
    assert [o for _, _, o in got] == [_outcome(s, cfg) for s in iter_sources(cfg)]  # identical between runs


def test_table_configuration_errors_raise(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "class": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no column 'image'"):
        list(iter_sources(_cfg(tmp_path, kind="table", path=str(tmp_path / "t.parquet"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        list(iter_sources(_cfg(tmp_path, kind="table", path=str(tmp_path / "empty"))))


@pytest.fixture
def grouped_parquet(tmp_path):
    """3 row groups of 4 rows; row r holds a PNG of seed r and class c<r % 2>."""
    path = tmp_path / "grouped.parquet"
    table = pa.table({"image": [_png(_rgb(r, (16, 16))) for r in range(12)],
                      "class": [f"c{r % 2}" for r in range(12)]})
    pq.write_table(table, path, row_group_size=4)
    return path


class _ReadSpy:
    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, tuple[str, ...]]] = []
        original = pq.ParquetFile.read_row_group

        def spy(pf, i, columns=None, **kwargs):
            self.calls.append((i, tuple(columns or ())))
            return original(pf, i, columns=columns, **kwargs)

        monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
        for name in ("read", "iter_batches", "read_row_groups"):
            monkeypatch.setattr(pq.ParquetFile, name, lambda *a, **k: pytest.fail("only read_row_group is used"))


def test_table_enumeration_reads_only_the_class_column(tmp_path, grouped_parquet, monkeypatch):
    spy = _ReadSpy(monkeypatch)
    cfg = _cfg(tmp_path, kind="table", path=str(grouped_parquet), min_side=8)
    sources = list(iter_sources(cfg))
    assert spy.calls == [(0, ("class",)), (1, ("class",)), (2, ("class",))]
    assert [(s["row_group"], s["row_in_group"], s["row"]) for s in sources] == [
        (r // 4, r % 4, r) for r in range(12)]
    assert [s["class_name"] for s in sources] == [f"c{r % 2}" for r in range(12)]

    spy.calls.clear()
    reader = SourceReader()
    data = [read_source(s, cfg, _policy(cfg), reader) for s in sources]
    assert spy.calls == [(0, ("image",)), (1, ("image",)), (2, ("image",))]  # each row group read once
    assert data == [_png(_rgb(r, (16, 16))) for r in range(12)]

    fixed = _cfg(tmp_path, kind="table", path=str(grouped_parquet), class_from="fixed", class_name="thing")
    spy.calls.clear()
    assert [s["class_name"] for s in iter_sources(fixed)] == ["thing"] * 12
    assert spy.calls == []  # row counts come from the metadata


def test_hf_datasets_arrow_with_image_structs_and_class_labels(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    ds = datasets.Dataset.from_dict({"image": [_rgb(r) for r in range(5)], "label": [0, 1, 1, 0, 1]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "hf"), max_shard_size="20KB")
    arrows = sorted(p.name for p in (tmp_path / "hf").iterdir() if p.suffix == ".arrow")
    assert len(arrows) > 1  # several shards, one source per row of each
    cfg = _cfg(tmp_path, kind="table", path=str(tmp_path / "hf"), class_column="label")
    sources = list(iter_sources(cfg))
    assert [s["class_name"] for s in sources] == ["cat", "dog", "dog", "cat", "dog"]
    reader = SourceReader()
    for r, s in enumerate(sources):
        image = decode_image(read_source(s, cfg, _policy(cfg), reader), ImagePolicy(size=56, resize="stretch"))
        expected = np.asarray(_rgb(r).resize((56, 56), Image.Resampling.BICUBIC))
        assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1


# ------------------------------------------------------------------------------------------------ s3


def _s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def test_s3_folder_and_table_sources(tmp_path, s3_server, s3_bucket):
    client, bucket = _s3_client(s3_server), s3_bucket[len("s3://"):]
    png = _png(_rgb(0))
    for key, body in {"src/cat/a.png": png, "src/cat/.DS_Store": b"junk", "src/cat/bad.png": b"garbage",
                      "src/00000/x.png": png, "src/orphan.png": png, "src/out/dataset/y.png": png,
                      "src/cat/x.png/inner.png": png}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    cfg = _cfg(tmp_path, kind="folder", path=f"s3://testing:{secret}@{bucket}/src")  # credentials in the URI
    sources = list(iter_sources(cfg, exclude_uris=[f"{s3_bucket}/src/out"]))
    assert not any(secret in json.dumps(s) for s in sources)
    got = {s["uri"][len(s3_bucket):]: (s.get("reject", ["ok"])[0], _outcome(s, cfg)[0]) for s in sources}
    assert got == {
        "/src/00000/x.png": ("numeric_class", "numeric_class"),
        "/src/cat/.DS_Store": ("hidden_file", "hidden_file"),
        "/src/cat/a.png": ("ok", "ok"),
        "/src/cat/bad.png": ("ok", "not_an_image"),
        "/src/cat/x.png": ("not_a_file", "not_a_file"),
        "/src/cat/x.png/inner.png": ("ok", "ok"),
        "/src/orphan.png": ("no_class", "no_class"),
    }
    a = next(s for s in sources if s["uri"].endswith("/src/cat/a.png"))
    assert a["source_id"] == _old_sid("file", "cat/a.png")  # the same id as the same layout on a local disk

    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [png, b"garbage", png], "class": ["dog", "dog", None]}), buf,
                   row_group_size=2)
    client.put_object(Bucket=bucket, Key="tables/t.parquet", Body=buf.getvalue())
    tcfg = _cfg(tmp_path, kind="table", path=f"{s3_bucket}/tables")
    rows = list(iter_sources(tcfg))
    assert [(s["uri"], s["row_group"]) for s in rows] == [(f"{s3_bucket}/tables/t.parquet#{r}", r // 2)
                                                          for r in range(3)]
    reader = SourceReader()
    assert [_outcome(s, tcfg, reader)[0] for s in rows] == ["ok", "not_an_image", "no_class"]


def test_s3_storage_errors_are_transient_not_quarantined(tmp_path, s3_server, s3_bucket):
    """A storage that cannot be reached raises OSError (retry), never ImageRejected (which would quarantine)."""
    import socket

    _s3_client(s3_server).put_object(Bucket=s3_bucket[len("s3://"):], Key="live/cat/a.png", Body=_png(_rgb(0)))
    cfg = _cfg(tmp_path, kind="folder", path=f"{s3_bucket}/live")
    (source,) = iter_sources(cfg)
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
        with pytest.raises(OSError):
            read_source(source, cfg, _policy(cfg))  # a fresh reader opens the URI against the dead endpoint
    assert _outcome(source, cfg)[0] == "ok"


def test_skip_ids_leaves_out_what_an_earlier_build_consumed(tmp_path, caplog):
    """``build.sources.skip_ids`` (a retrain's source increment): exactly the listed ids are left out and counted;
    the ids of the rest are unchanged (the same source keeps its id in every increment)."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _tree(tmp_path / "src", {f"cat/{i}.png": _png(_rgb(i)) for i in range(4)})
    everything = list(iter_sources(_cfg(tmp_path, kind="folder", path=str(root))))
    pq.write_table(pa.table({"source_id": [s["source_id"] for s in everything[:3]]}), tmp_path / "built.parquet")
    cfg = _cfg(tmp_path, kind="folder", path=str(root), skip_ids=str(tmp_path / "built.parquet"))
    with caplog.at_level(logging.INFO, logger="pipeline.sources"):
        assert list(iter_sources(cfg)) == everything[3:]
    assert "built before (build.sources.skip_ids): 3" in caplog.text
