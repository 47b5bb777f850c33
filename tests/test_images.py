"""Unit tests for filtering.images: real files on disk, every rejection checked by its exact reason."""

from __future__ import annotations

import io
import os
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filtering.images import (
    ImagePolicy,
    ImageRejected,
    QuarantineReason,
    cell_bytes,
    decode_image,
    decode_png_rgb,
    encode_png,
    error_text,
    load_source_image,
    read_file_bytes,
    safe_path_text,
    to_rgb,
)

SIZE = 32
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture
def policy() -> ImagePolicy:
    return ImagePolicy(size=SIZE)


def _save(img: Image.Image, path: Path, fmt: str = "PNG", **params) -> Path:
    img.save(path, format=fmt, **params)
    return path


def _png_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


def _reject(fn, *args) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        fn(*args)
    return info.value


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)  # (H, W, 3)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG (valid IHDR and CRCs) declaring ``width × height`` 8-bit grey, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- policy -----------------------------------------------------------------------------------------


def test_policy_from_real_sources_config():
    from pipeline.build_config import SourcesConfig

    cfg = SourcesConfig(image_size=48, resize="pad", min_side=4, max_pixels=1000, max_file_mb=1.5)
    assert ImagePolicy.from_sources_config(cfg) == ImagePolicy(
        size=48, resize="pad", min_side=4, max_pixels=1000, max_file_bytes=1_572_864
    )


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError, match="resize"):
        ImagePolicy(resize="squash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        ImagePolicy(size=0)


# --- reading ----------------------------------------------------------------------------------------


def test_zero_byte_file_is_empty(tmp_path, policy):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _reject(load_source_image, path, policy).reason is QuarantineReason.EMPTY_FILE
    assert _reject(decode_image, b"", policy).reason is QuarantineReason.EMPTY_FILE


def test_file_over_limit_is_too_large(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(b"\x00" * 200)
    err = _reject(read_file_bytes, path, ImagePolicy(max_file_bytes=100))
    assert err.reason is QuarantineReason.TOO_LARGE_FILE
    assert "200" in err.detail
    assert read_file_bytes(path, ImagePolicy(max_file_bytes=200)) == b"\x00" * 200


# Tests run as root, and chmod 000 does not stop root from reading. These paths fail for every user:
# a directory cannot be read as a file (EISDIR), a dangling symlink has no target (ENOENT), a symlink
# loop cannot be resolved (ELOOP), and a FIFO would block open() forever, so it must be refused first.
def test_directory_named_like_an_image_is_not_a_file(tmp_path, policy):
    path = tmp_path / "x.png"
    path.mkdir()
    err = _reject(load_source_image, path, policy)
    assert err.reason is QuarantineReason.NOT_A_FILE
    assert err.detail == "not a regular file (directory)"


def test_dangling_symlink_is_unreadable_with_errno_text(tmp_path, policy):
    path = tmp_path / "gone.png"
    path.symlink_to(tmp_path / "missing.png")
    err = _reject(load_source_image, path, policy)
    assert err.reason is QuarantineReason.UNREADABLE
    assert err.detail == os.strerror(2)  # ENOENT: "No such file or directory"


def test_symlink_loop_is_unreadable(tmp_path, policy):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    assert _reject(load_source_image, tmp_path / "a.png", policy).reason is QuarantineReason.UNREADABLE


def test_fifo_is_refused_without_blocking(tmp_path, policy):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    err = _reject(read_file_bytes, path, policy)
    assert err.reason is QuarantineReason.NOT_A_FILE
    assert err.detail == "not a regular file (fifo)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_is_unreadable(tmp_path, policy):
    path = _save(Image.new("RGB", (SIZE, SIZE)), tmp_path / "locked.png")
    path.chmod(0)
    err = _reject(load_source_image, path, policy)
    assert err.reason is QuarantineReason.UNREADABLE
    assert err.detail == os.strerror(13)  # EACCES


# --- table cells ------------------------------------------------------------------------------------


def test_cell_bytes_accepts_bytes_and_hf_image_structs():
    png = _png_bytes(Image.new("RGB", (SIZE, SIZE), RED))
    policy = ImagePolicy(size=SIZE)
    assert cell_bytes(png, policy) == png
    assert cell_bytes(bytearray(png), policy) == png
    assert cell_bytes({"bytes": png, "path": "x.png"}, policy) == png
    assert (_pixels(decode_image(cell_bytes({"bytes": png, "path": None}, policy), policy)) == RED).all()


@pytest.mark.parametrize("cell, reason, detail", [
    (None, QuarantineReason.EMPTY_FILE, "image cell is null"),
    (b"", QuarantineReason.EMPTY_FILE, "0 bytes"),
    ({"bytes": None, "path": None}, QuarantineReason.EMPTY_FILE, "image struct has no bytes"),
    ({"bytes": None, "path": "/data/x.png"}, QuarantineReason.EMPTY_FILE,
     "image struct has a path only (not read: images must be inside the table)"),
    (7, QuarantineReason.BAD_CELL, "image cell holds int; expected bytes or an HF Image struct"),
    ("x.png", QuarantineReason.BAD_CELL, "image cell holds str; expected bytes or an HF Image struct"),
    ([1, 2], QuarantineReason.BAD_CELL, "image cell holds list; expected bytes or an HF Image struct"),
    (b"\x00" * 101, QuarantineReason.TOO_LARGE_FILE, "101 bytes > max_file_bytes=100"),
])
def test_cell_bytes_rejects_bad_cells(cell, reason, detail):
    err = _reject(cell_bytes, cell, ImagePolicy(max_file_bytes=100))
    assert (err.reason, err.detail) == (reason, detail)


# --- decoding rejections ----------------------------------------------------------------------------


def test_text_file_named_png_is_not_an_image(tmp_path, policy):
    path = tmp_path / "x.png"
    path.write_text("this is not a picture\n")
    assert _reject(load_source_image, path, policy).reason is QuarantineReason.NOT_AN_IMAGE


def test_rejection_details_carry_no_object_addresses(policy):
    # PIL names the BytesIO it could not identify ("<_io.BytesIO object at 0x7f..>"): a new address every run
    first = _reject(decode_image, b"not an image at all", policy)
    second = _reject(decode_image, b"not an image at all", policy)
    assert first.detail == second.detail == "not recognised as an image (cannot identify image file)"
    assert error_text(OSError("cannot read <_io.BytesIO object at 0x7f3a2b1c> now")) == "cannot read now"
    assert error_text(ValueError("<Foo at 0xDEADbeef>")) == "ValueError"


def test_png_cut_in_half_is_truncated(tmp_path, policy):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert _reject(load_source_image, path, policy).reason is QuarantineReason.TRUNCATED
    # The uncut file is fine, so the reason is the cut and nothing else.
    path.write_bytes(data)
    assert load_source_image(path, policy)[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (20_000, 5_000)])
def test_huge_declared_dimensions_rejected_before_decoding(tmp_path, policy, width, height):
    # 100000² is past PIL's own hard limit; 20000×5000 (1e8 px, 300 MB as RGB) is below it, so only our
    # max_pixels check (64e6) stops it. Either way no pixel buffer may be allocated.
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(width, height))
    rss_before = _max_rss_bytes()
    start = time.perf_counter()
    err = _reject(load_source_image, path, policy)
    elapsed = time.perf_counter() - start
    assert err.reason is QuarantineReason.DECOMPRESSION_BOMB
    assert elapsed < 0.5
    assert _max_rss_bytes() - rss_before < 50 << 20
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before  # the global limit is left alone


def test_max_pixels_is_our_limit_not_pils(policy):
    data = _png_bytes(Image.new("RGB", (40, 40)))  # 1600 px, far below PIL's limit
    strict = ImagePolicy(size=SIZE, max_pixels=1599)
    assert _reject(decode_image, data, strict).reason is QuarantineReason.DECOMPRESSION_BOMB
    assert decode_image(data, ImagePolicy(size=SIZE, max_pixels=1600)).size == (SIZE, SIZE)


def test_one_pixel_image_is_too_small(tmp_path, policy):
    path = _save(Image.new("RGB", (1, 1), RED), tmp_path / "dot.png")
    assert _reject(load_source_image, path, policy).reason is QuarantineReason.TOO_SMALL


def test_min_side_is_the_shorter_side(policy):
    assert _reject(decode_image, _png_bytes(Image.new("RGB", (100, 7))), policy).reason is (
        QuarantineReason.TOO_SMALL
    )
    assert decode_image(_png_bytes(Image.new("RGB", (100, 8))), policy).size == (SIZE, SIZE)


def test_mode_without_policy_is_unsupported():
    assert _reject(to_rgb, Image.new("HSV", (8, 8))).reason is QuarantineReason.UNSUPPORTED_MODE


def test_lab_tiff_is_unsupported(tmp_path, policy):
    path = _save(Image.new("LAB", (SIZE, SIZE), (50, 0, 0)), tmp_path / "lab.tif", "TIFF")
    assert _reject(load_source_image, path, policy).reason is QuarantineReason.UNSUPPORTED_MODE


# --- mode conversion --------------------------------------------------------------------------------


def test_grayscale_becomes_equal_rgb(tmp_path, policy):
    path = _save(Image.new("L", (40, 48), 100), tmp_path / "grey.png")
    image, _ = load_source_image(path, policy)
    assert image.size == (SIZE, SIZE)
    assert (_pixels(image) == 100).all()


def test_cmyk_tiff_converts_exactly(tmp_path, policy):
    cmyk = Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0))  # full magenta + yellow = red
    image, _ = load_source_image(_save(cmyk, tmp_path / "cmyk.tif", "TIFF"), policy)
    assert (_pixels(image) == RED).all()


def test_cmyk_jpeg_converts_to_rgb(tmp_path, policy):
    cmyk = Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0))
    image, _ = load_source_image(_save(cmyk, tmp_path / "cmyk.jpg", "JPEG", quality=95), policy)
    mean = _pixels(image).reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, RED, atol=6)  # lossy codec


def test_rgba_is_composited_over_white(tmp_path, policy):
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[:, : SIZE // 2] = (0, 0, 0, 0)  # fully transparent black
    rgba[:, SIZE // 2 :] = (255, 0, 0, 255)  # opaque red
    rgba[0, 0] = (0, 0, 0, 128)  # half-transparent black
    image, _ = load_source_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"), policy)
    px = _pixels(image)
    assert (px[1:, : SIZE // 2] == WHITE).all()
    assert (px[:, SIZE // 2 :] == RED).all()
    np.testing.assert_allclose(px[0, 0], 127, atol=1)


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_other_alpha_modes_are_composited_over_white(mode):
    img = Image.new(mode, (SIZE, SIZE), (0, 0))
    assert (_pixels(to_rgb(img)) == WHITE).all()


def test_palette_with_transparency_is_composited_over_white(policy):
    pal = Image.new("P", (SIZE, SIZE), 1)
    pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)  # index 1 is black
    data = _png_bytes(pal, transparency=1)
    assert (_pixels(decode_image(data, policy)) == WHITE).all()
    opaque = _png_bytes(pal)
    assert (_pixels(decode_image(opaque, policy)) == 0).all()


def test_16_bit_png_is_shifted_to_8_bit(tmp_path, policy):
    grey16 = np.full((SIZE, SIZE), 65535, dtype=np.uint16)
    grey16[:, SIZE // 2 :] = 0x1234
    img = Image.fromarray(grey16)
    assert img.mode == "I;16"
    path = _save(img, tmp_path / "deep.png")
    with Image.open(path) as reopened:
        assert reopened.mode == "I;16"
    image, _ = load_source_image(path, policy)
    px = _pixels(image)
    assert (px[:, : SIZE // 2] == 255).all()
    assert (px[:, SIZE // 2 :] == 0x12).all()


def test_32_bit_int_tiff_uses_declared_bit_depth(tmp_path, policy):
    grey32 = np.full((SIZE, SIZE), 0x7F00_0000, dtype=np.int32)
    path = _save(Image.fromarray(grey32), tmp_path / "deep.tif", "TIFF")
    with Image.open(path) as reopened:
        assert reopened.mode == "I"
    assert (_pixels(load_source_image(path, policy)[0]) == 0x7F).all()


def test_float_image_is_clipped(tmp_path, policy):
    grey = np.zeros((SIZE, SIZE), dtype=np.float32)
    grey[:, :8], grey[:, 8:16], grey[:, 16:] = 300.0, -5.0, 99.6
    path = _save(Image.fromarray(grey, "F"), tmp_path / "float.tif", "TIFF")
    px = _pixels(load_source_image(path, policy)[0])
    assert (px[:, :8] == 255).all()
    assert (px[:, 8:16] == 0).all()
    assert (px[:, 16:] == 100).all()


def test_exif_orientation_is_applied_before_resizing():
    landscape = Image.new("RGB", (64, 32), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: stored 64×32 is shown 32×64 (portrait)
    data = _png_bytes(landscape, exif=exif)
    px = _pixels(decode_image(data, ImagePolicy(size=SIZE, resize="pad")))
    # Portrait padded into a square: white columns left and right, red full height in the middle.
    assert (px[:, :8] == WHITE).all() and (px[:, -8:] == WHITE).all()
    assert (px[:, 8:-8] == RED).all()


# --- resizing ---------------------------------------------------------------------------------------


def _three_bands() -> bytes:
    """64×32: green | red (middle 32 columns) | blue."""
    bands = np.zeros((32, 64, 3), dtype=np.uint8)
    bands[:, :16], bands[:, 16:48], bands[:, 48:] = GREEN, RED, BLUE
    return _png_bytes(Image.fromarray(bands))


def test_center_crop_keeps_the_middle():
    image = decode_image(_three_bands(), ImagePolicy(size=SIZE, resize="center_crop"))
    assert image.size == (SIZE, SIZE)
    assert (_pixels(image) == RED).all()


def test_center_crop_scales_shorter_side():
    image = decode_image(_three_bands(), ImagePolicy(size=16, resize="center_crop"))
    px = _pixels(image)
    assert image.size == (16, 16)
    assert (px[:, 4:12] == RED).all()  # interior of the middle band, away from bicubic ringing


def test_pad_fits_inside_white_borders():
    image = decode_image(_three_bands(), ImagePolicy(size=SIZE, resize="pad"))
    px = _pixels(image)
    assert image.size == (SIZE, SIZE)
    assert (px[:8] == WHITE).all() and (px[-8:] == WHITE).all()  # 32×16 centred vertically
    assert (px[8:-8, 12:20] == RED).all()
    assert (px[8:-8, :2] == GREEN).all() and (px[8:-8, -2:] == BLUE).all()


def test_stretch_keeps_all_content():
    image = decode_image(_three_bands(), ImagePolicy(size=SIZE, resize="stretch"))
    px = _pixels(image)
    assert image.size == (SIZE, SIZE)
    assert (px[:, :6] == GREEN).all() and (px[:, 10:22] == RED).all() and (px[:, -6:] == BLUE).all()
    assert not (px == WHITE).all(axis=-1).any()


# --- paths ------------------------------------------------------------------------------------------


def test_non_utf8_file_name_loads_and_has_safe_text(tmp_path, policy):
    path = os.fsencode(tmp_path) + b"/bad\xff.png"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(_png_bytes(Image.new("RGB", (SIZE, SIZE), BLUE)))
    image, png = load_source_image(path, policy)
    assert (_pixels(image) == BLUE).all()
    assert (decode_png_rgb(png) == BLUE).all()

    text = safe_path_text(path)
    assert isinstance(text, str)
    assert text.endswith("bad\\xff.png")
    text.encode("utf-8")  # would raise on a lone surrogate
    # The str form Python gives the same name (surrogate-escaped) maps to the same text.
    assert safe_path_text(os.fsdecode(path)) == text
    assert safe_path_text(Path(os.fsdecode(path))) == text


# --- encoding ---------------------------------------------------------------------------------------


def test_encode_png_is_deterministic_and_strips_metadata():
    noise = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    first = encode_png(image)
    assert encode_png(image) == first
    tagged = image.copy()
    tagged.info.update(icc_profile=b"not really a profile", dpi=(300, 300))
    assert encode_png(tagged) == first

    chunks, pos = [], 8
    while pos < len(first):
        (length,) = struct.unpack(">I", first[pos : pos + 4])
        chunks.append(first[pos + 4 : pos + 8])
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    np.testing.assert_array_equal(decode_png_rgb(first), noise)


def test_load_source_image_png_matches_image(tmp_path, policy):
    noise = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    image, png = load_source_image(_save(Image.fromarray(noise), tmp_path / "n.png"), policy)
    assert png == encode_png(image)
    decoded = decode_png_rgb(png)
    assert decoded.shape == (SIZE, SIZE, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.asarray(image))


def test_decode_png_rgb_refuses_other_modes_and_formats():
    with pytest.raises(ValueError, match="mode"):
        decode_png_rgb(_png_bytes(Image.new("L", (4, 4))))
    with pytest.raises(ValueError, match="PNG"):
        decode_png_rgb(b"GIF89a not a png")
