"""Decoding and validating source images for the dataset build (CAFE round 0).

Usage::

    policy = ImagePolicy.from_sources_config(cfg.sources)
    try:
        image, png = load_source_image(path, policy)
    except ImageRejected as err:
        quarantine(path, err.reason, err.detail)

Every source image goes through the same steps, and any failure raises :class:`ImageRejected` with a
:class:`QuarantineReason`, so a bad file is quarantined with a reason instead of crashing a worker or being
dropped silently.

1. **Read** (:func:`read_file_bytes`): the path must be a regular file (a directory, FIFO or device is
   ``not_a_file``; a FIFO is never opened, so it cannot block; a missing file, a dangling symlink or a
   permission error is ``unreadable_file``), non-empty (``empty_file``) and at most ``max_file_bytes`` long
   (``file_too_large``, checked with ``os.stat`` before reading and again while reading). A table cell
   (:func:`cell_bytes`) must hold bytes or an HF ``Image`` struct with bytes (anything else is ``bad_cell``)
   and obeys the same size limit.
2. **Header checks** (no pixels decoded yet): bytes PIL does not recognise are ``not_an_image``;
   ``width * height > max_pixels`` is ``decompression_bomb`` (our own limit, checked from the header; PIL's
   global ``MAX_IMAGE_PIXELS`` is neither relied on nor changed, but its ``DecompressionBombError`` is also
   mapped to ``decompression_bomb``); a shorter side below ``min_side`` is ``too_small``.
3. **Decode**: a failure while decoding pixels (``image file is truncated``, ``broken data stream``, ...) is
   ``truncated_image``. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set. Multi-frame files (GIF, APNG,
   TIFF) use their first frame.
4. **Orientation**: the EXIF orientation tag is applied (``ImageOps.exif_transpose``); EXIF that cannot be
   parsed is ``corrupt_metadata``.
5. **Mode → RGB** (:func:`to_rgb`), a fixed table:

   ============================  ==========================================================
   source mode                   conversion
   ============================  ==========================================================
   ``RGB``                       unchanged
   ``1``, ``L``, ``P`` (opaque)  grey / palette expanded to RGB
   ``RGBX``, ``YCbCr``, ``CMYK`` PIL ``convert("RGB")`` (CMYK: PIL's naive inversion, no ICC)
   ``RGBA``, ``RGBa``, ``LA``,   alpha-composited over white
   ``PA``, ``P`` + transparency
   ``I;16``, ``I;16L/B/N``       ``value >> 8`` to 8 bits, then grey → RGB
   ``I``                         32-bit container: the source's bit depth ``b`` (TIFF
                                 BitsPerSample, else 16) — clip to ``[0, 2**b - 1]``, then
                                 ``value >> (b - 8)``, then grey → RGB
   ``F``                         clip to ``[0, 255]``, round half to even, then grey → RGB
   anything else (LAB, HSV, ..)  ``unsupported_mode`` (no colour-managed conversion here)
   ============================  ==========================================================

   Embedded ICC profiles are not applied: stored pixel values are taken as sRGB, and the returned image
   carries no metadata.

6. **Resize** to ``size × size`` (bicubic), by ``ImagePolicy.resize``:

   * ``center_crop``: scale so the shorter side equals ``size``, then crop the centre.
   * ``pad``: scale so the longer side equals ``size``, then centre on a white square.
   * ``stretch``: resize straight to ``size × size`` (aspect ratio not kept).

   An image already ``size × size`` is not resampled.

The stored form is :func:`encode_png`: deterministic PNG bytes (no metadata chunks, fixed compression).

Details are reproducible: error texts never carry object addresses (``<_io.BytesIO object at 0x7f..>``), so
two runs over the same inputs quarantine with identical details.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import re
import stat
import warnings
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ImagePolicy",
    "ImageRejected",
    "QuarantineReason",
    "cell_bytes",
    "check_size",
    "decode_image",
    "error_text",
    "file_kind",
    "decode_png_rgb",
    "encode_png",
    "load_source_image",
    "read_file_bytes",
    "safe_path_text",
    "to_rgb",
]

ResizeMode = Literal["center_crop", "pad", "stretch"]
_RESIZE_MODES: tuple[str, ...] = ("center_crop", "pad", "stretch")
_PNG_COMPRESS_LEVEL = 6
_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_DIRECT_MODES = frozenset({"1", "L", "RGBX", "YCbCr", "CMYK"})
_TIFF_BITS_PER_SAMPLE = 258
_OBJECT_REPR = re.compile(r"\s*<[^<>]*? at 0x[0-9a-fA-F]+>")


class QuarantineReason(str, enum.Enum):
    """Why a source was quarantined (stored as the ``.value`` string).

    The first group is found while reading and decoding an image; the second while listing sources
    (:mod:`pipeline.sources`), before anything is read.
    """

    EMPTY_FILE = "empty_file"
    TRUNCATED = "truncated_image"
    NOT_AN_IMAGE = "not_an_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    UNREADABLE = "unreadable_file"
    NOT_A_FILE = "not_a_file"
    TOO_LARGE_FILE = "file_too_large"
    UNSUPPORTED_MODE = "unsupported_mode"
    BAD_FILENAME = "bad_filename"
    CORRUPT_METADATA = "corrupt_metadata"
    BAD_CELL = "bad_cell"
    # listing
    HIDDEN_FILE = "hidden_file"
    OUTSIDE_ROOT = "outside_root"
    DUPLICATE = "duplicate"
    IN_OUTPUT = "in_output"
    BAD_MANIFEST_ENTRY = "bad_manifest_entry"
    NO_CLASS = "no_class"
    BAD_CLASS = "bad_class"
    NUMERIC_CLASS = "numeric_class"


class ImageRejected(Exception):
    """A source image that cannot be used; the row is quarantined with ``reason``.

    Args:
        reason: Machine-readable reason.
        detail: Human-readable detail (sizes, limits, the underlying error text).
    """

    def __init__(self, reason: QuarantineReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """How source images are validated and normalised.

    Attributes:
        size: Output side length; every image becomes ``size × size`` RGB.
        resize: ``center_crop``, ``pad`` or ``stretch`` (see the module docstring).
        min_side: Images whose shorter side is below this are ``too_small``.
        max_pixels: ``width * height`` above this is a ``decompression_bomb``.
        max_file_bytes: Files larger than this are ``file_too_large``.
    """

    size: int = 64
    resize: ResizeMode = "center_crop"
    min_side: int = 8
    max_pixels: int = 64_000_000
    max_file_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.resize not in _RESIZE_MODES:
            raise ValueError(f"ImagePolicy.resize={self.resize!r}; allowed: {', '.join(_RESIZE_MODES)}")
        for name in ("size", "min_side", "max_pixels", "max_file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImagePolicy.{name}={value!r}; must be an integer >= 1")

    @classmethod
    def from_sources_config(cls, cfg: Any) -> ImagePolicy:
        """Build the policy from a ``SourcesConfig``-like object.

        Usage: ``ImagePolicy.from_sources_config(cfg.sources)``

        Args:
            cfg: Any object with ``image_size``, ``resize``, ``min_side``, ``max_pixels`` and
                ``max_file_mb`` attributes (duck-typed; ``filtering`` does not import ``pipeline``).

        Returns:
            The policy; ``max_file_mb`` is converted to bytes (MiB, rounded down).
        """
        return cls(
            size=int(cfg.image_size),
            resize=cfg.resize,
            min_side=int(cfg.min_side),
            max_pixels=int(cfg.max_pixels),
            max_file_bytes=int(float(cfg.max_file_mb) * (1 << 20)),
        )


def safe_path_text(path: str | bytes | os.PathLike[Any]) -> str:
    """Return a text form of ``path`` that is always valid UTF-8.

    Usage: ``manifest_row["path"] = safe_path_text(path)``

    Bytes that are not UTF-8 (``b"bad\\xff.png"``, or the surrogate escapes Python uses for them in ``str``
    paths) become backslash escapes (``bad\\xff.png``). The result is for records and reports; open files
    with the original path.

    Args:
        path: A ``str``, ``bytes`` or path-like object.

    Returns:
        A ``str`` that ``.encode("utf-8")`` accepts.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_file_bytes(path: str | bytes | os.PathLike[Any], policy: ImagePolicy) -> bytes:
    """Read a source file, refusing empty, oversized and non-regular files.

    Usage: ``data = read_file_bytes(path, policy)``

    Args:
        path: File to read (``bytes`` paths are fine for names that are not UTF-8).
        policy: Supplies ``max_file_bytes``.

    Returns:
        The file's bytes.

    Raises:
        ImageRejected: ``unreadable_file`` (missing, dangling symlink, permission denied, ... — with the
            errno text), ``not_a_file`` (directory, FIFO, socket, device), ``empty_file`` or
            ``file_too_large``.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise ImageRejected(QuarantineReason.UNREADABLE, _os_error_text(err)) from err
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO would block and a directory cannot be read; refuse before open().
        raise ImageRejected(QuarantineReason.NOT_A_FILE, f"not a regular file ({file_kind(st.st_mode)})")
    check_size(st.st_size, policy)
    try:
        with open(path, "rb") as f:
            # Read one byte past the limit so a file that grew after stat() is still caught.
            data = f.read(policy.max_file_bytes + 1)
    except OSError as err:
        raise ImageRejected(QuarantineReason.UNREADABLE, _os_error_text(err)) from err
    check_size(len(data), policy)
    return data


def cell_bytes(value: object, policy: ImagePolicy) -> bytes:
    """The image bytes of a table cell: raw bytes or an HF ``Image`` struct ``{"bytes": ..., "path": ...}``.

    Usage: ``data = cell_bytes(column[i].as_py(), policy)``

    Args:
        value: The cell as Python (``bytes``, ``dict``, ``None`` or anything a column may hold).
        policy: Supplies ``max_file_bytes``.

    Returns:
        The bytes, not yet decoded.

    Raises:
        ImageRejected: ``empty_file`` (null, empty, or a struct without bytes), ``bad_cell`` (a cell that is
            not bytes: a number, text, a list, ... — named by its type only) or ``file_too_large``.
    """
    if isinstance(value, dict):  # HF Image feature
        if value.get("bytes") is None:
            where = "a path only (not read: images must be inside the table)" if value.get("path") else "no bytes"
            raise ImageRejected(QuarantineReason.EMPTY_FILE, f"image struct has {where}")
        value = value["bytes"]
    if value is None:
        raise ImageRejected(QuarantineReason.EMPTY_FILE, "image cell is null")
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise ImageRejected(QuarantineReason.BAD_CELL,
                            f"image cell holds {type(value).__name__}; expected bytes or an HF Image struct")
    check_size(len(value), policy)
    return value


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode, validate and normalise image bytes to an RGB ``size × size`` image.

    Usage: ``image = decode_image(data, policy)``

    Args:
        data: Encoded image bytes (any format PIL reads).
        policy: Limits, output size and resize mode.

    Returns:
        A loaded RGB image of exactly ``policy.size × policy.size``, with no ``info`` metadata.

    Raises:
        ImageRejected: ``empty_file``, ``not_an_image``, ``decompression_bomb``, ``too_small``,
            ``truncated_image``, ``corrupt_metadata`` or ``unsupported_mode``.
    """
    if not data:
        raise ImageRejected(QuarantineReason.EMPTY_FILE, "0 bytes")
    with warnings.catch_warnings():
        # Our own max_pixels check below is the authority; PIL's warning threshold is not.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        src = _open_header(data)
        try:
            _check_header(src, policy)
            _load_pixels(src)
            # Read the bit depth from the file's tags: the transposed copy no longer has them.
            rgb = to_rgb(_exif_transpose(src), int_bits=_declared_bits(src))
        finally:
            src.close()
    out = _resize(rgb, policy)
    out.info = {}  # ICC profile, EXIF, text: not carried (pixels are taken as sRGB as stored)
    return out


def to_rgb(img: Image.Image, int_bits: int | None = None) -> Image.Image:
    """Convert a loaded image to RGB by the module's mode table.

    Usage: ``rgb = to_rgb(img)``

    Args:
        img: A loaded PIL image of any mode.
        int_bits: Bits per sample for mode ``I`` (8..32); ``None`` reads TIFF BitsPerSample from ``img``,
            else assumes 16.

    Returns:
        A new RGB image of the same size.

    Raises:
        ImageRejected: ``unsupported_mode`` for modes outside the table (LAB, HSV, La, I;16S, ...).
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode == "P":
        if "transparency" in img.info:
            return _over_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    if mode in _ALPHA_MODES:
        return _over_white(img.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        # np.asarray honours the mode's byte order; values are 0..65535.
        grey16 = np.asarray(img).astype(np.uint16)
        return _grey_to_rgb((grey16 >> 8).astype(np.uint8))
    if mode == "I":
        bits = _declared_bits(img) if int_bits is None else int_bits
        if not 8 <= bits <= 32:
            raise ValueError(f"to_rgb: int_bits={bits}; allowed: 8..32")
        grey32 = np.clip(np.asarray(img).astype(np.int64), 0, (1 << bits) - 1)
        return _grey_to_rgb((grey32 >> (bits - 8)).astype(np.uint8))
    if mode == "F":
        grey = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0.0, 255.0))
        return _grey_to_rgb(grey.astype(np.uint8))
    raise ImageRejected(QuarantineReason.UNSUPPORTED_MODE, f"mode {mode!r} has no RGB conversion policy")


def encode_png(img: Image.Image) -> bytes:
    """Encode an image as deterministic PNG bytes.

    Usage: ``png = encode_png(image)``

    The pixels are copied into a fresh image first, so no ``info`` entry (ICC profile, transparency, EXIF,
    text) leaks into the file; compression is fixed (level 6, ``optimize=False``). Equal pixels give equal
    bytes.

    Args:
        img: An ``RGB`` or ``L`` image.

    Returns:
        PNG file bytes.

    Raises:
        ValueError: For any other mode.
    """
    if img.mode not in ("RGB", "L"):
        raise ValueError(f"encode_png: image mode {img.mode!r}; allowed: 'RGB', 'L'")
    clean = Image.frombytes(img.mode, img.size, img.tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def decode_png_rgb(data: bytes) -> np.ndarray:
    """Decode PNG bytes written by :func:`encode_png` into an array.

    Usage: ``pixels = decode_png_rgb(row["image"])``

    Args:
        data: PNG bytes of an RGB image.

    Returns:
        ``(H, W, 3)`` uint8 array.

    Raises:
        ValueError: If the bytes are not a PNG or the image is not RGB.
    """
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            img.load()
            if img.mode != "RGB":
                raise ValueError(f"decode_png_rgb: PNG mode {img.mode!r}; expected 'RGB'")
            return np.array(img, dtype=np.uint8)  # (H, W, 3)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"decode_png_rgb: not a readable PNG ({err})") from err


def load_source_image(
    path: str | bytes | os.PathLike[Any], policy: ImagePolicy
) -> tuple[Image.Image, bytes]:
    """Read, validate and normalise one source image file.

    Usage: ``image, png = load_source_image(path, policy)``

    Args:
        path: Image file (``bytes`` paths are fine for names that are not UTF-8).
        policy: Limits, output size and resize mode.

    Returns:
        The RGB ``size × size`` image and its :func:`encode_png` bytes.

    Raises:
        ImageRejected: Any reason from :func:`read_file_bytes` or :func:`decode_image`.
    """
    image = decode_image(read_file_bytes(path, policy), policy)
    return image, encode_png(image)


# --- steps -----------------------------------------------------------------------------------------


def _open_header(data: bytes) -> Image.Image:
    """Parse the header only (``Image.open`` is lazy: no pixel buffer is allocated)."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageRejected(QuarantineReason.DECOMPRESSION_BOMB, error_text(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # UnidentifiedImageError is an OSError; its text names the BytesIO object (an address): scrubbed.
        raise ImageRejected(QuarantineReason.NOT_AN_IMAGE, f"not recognised as an image ({error_text(err)})") from err


def _check_header(img: Image.Image, policy: ImagePolicy) -> None:
    width, height = img.size
    if width * height > policy.max_pixels:
        raise ImageRejected(
            QuarantineReason.DECOMPRESSION_BOMB,
            f"{width}x{height} = {width * height} pixels > max_pixels={policy.max_pixels}",
        )
    if min(width, height) < policy.min_side:
        raise ImageRejected(
            QuarantineReason.TOO_SMALL, f"{width}x{height}: shorter side < min_side={policy.min_side}"
        )


def _load_pixels(img: Image.Image) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageRejected(QuarantineReason.DECOMPRESSION_BOMB, error_text(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected(QuarantineReason.TRUNCATED, f"pixel data could not be decoded ({error_text(err)})") from err


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - EXIF parsing raises many types on corrupt blocks
        raise ImageRejected(QuarantineReason.CORRUPT_METADATA, f"EXIF could not be parsed ({error_text(err)})") from err
    return img if out is None else out


def _resize(img: Image.Image, policy: ImagePolicy) -> Image.Image:
    size = policy.size
    width, height = img.size
    if (width, height) == (size, size):
        return img
    bicubic = Image.Resampling.BICUBIC
    if policy.resize == "stretch":
        return img.resize((size, size), bicubic)
    if policy.resize == "center_crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        scaled = img.resize((new_w, new_h), bicubic)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return scaled.crop((left, top, left + size, top + size))
    # pad
    scale = size / max(width, height)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    canvas = Image.new("RGB", (size, size), _WHITE)
    canvas.paste(img.resize((new_w, new_h), bicubic), ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


# --- helpers ---------------------------------------------------------------------------------------


def _over_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """``(H, W)`` uint8 → RGB image."""
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def _declared_bits(img: Image.Image) -> int:
    """Bits per sample of an ``I`` image: TIFF's BitsPerSample if given, else 16."""
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        bits = tags.get(_TIFF_BITS_PER_SAMPLE)
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        if isinstance(bits, int) and 8 <= bits <= 32:
            return bits
    return 16


def error_text(err: BaseException) -> str:
    """``str(err)`` without object reprs that carry addresses (``<_io.BytesIO object at 0x7f..>``).

    Usage: ``detail = f"decode failed ({error_text(err)})"`` — equal inputs give equal details across runs.
    """
    return _OBJECT_REPR.sub("", str(err)).strip() or type(err).__name__


def check_size(n_bytes: int, policy: ImagePolicy) -> None:
    """Refuse ``n_bytes`` of 0 (``empty_file``) or above ``policy.max_file_bytes`` (``file_too_large``)."""
    if n_bytes == 0:
        raise ImageRejected(QuarantineReason.EMPTY_FILE, "0 bytes")
    if n_bytes > policy.max_file_bytes:
        raise ImageRejected(
            QuarantineReason.TOO_LARGE_FILE,
            f"{n_bytes} bytes > max_file_bytes={policy.max_file_bytes}",
        )


def _os_error_text(err: OSError) -> str:
    return err.strerror or error_text(err)


def file_kind(mode: int) -> str:
    """``directory``, ``fifo``, ``socket``, ``device`` or ``special file`` for an ``st_mode``."""
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"
