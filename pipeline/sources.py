"""Sources of the round-0 build: listing them (planning, on the driver) and reading their bytes (in actors).

Usage::

    for source in iter_sources(cfg, exclude_uris=[out_dir]):     # deterministic order, streamed, nothing decoded
        plan.add(source)                                          # source["reject"] = [reason, detail] if unusable
    reader = SourceReader()                                       # one per actor: caches the last row group
    try:
        data = read_source(source, cfg, policy, reader)           # raw bytes → filtering.images.decode_image
    except ImageRejected as err:
        quarantine(source, err.reason.value, err.detail)

Kinds (``build.sources.kind``):

* ``folder``: every entry under ``path``, or the files a ``manifest`` (CSV, JSON list or JSON Lines with a
  ``file`` field) lists, relative to ``path``. ``source_id = source_id("file", rel)`` with ``rel`` the
  normalised path relative to the root (symlinks resolved).
* ``table``: the ``.parquet`` / ``.arrow`` files directly in ``path`` (or ``path`` itself), one source per row;
  other files there (``dataset_info.json``, ``state.json``) are metadata, not inputs.
  Planning reads only the class column, one row group at a time (nothing when ``class_from: fixed``);
  :func:`read_source` reads one row group's image column and :class:`SourceReader` keeps it, so consecutive
  sources of a chunk read each row group once. Cells hold bytes or HF ``Image`` structs ``{bytes, path}``;
  an HF ``ClassLabel`` int column maps to its names. Arrow *stream* files (what ``datasets`` writes) cannot
  read a column alone: they are read record batch by record batch (a record batch is their row group).
  ``source_id = source_id("table", file name, row)``.
* ``generate``: ``num_per_class`` sources per class, rendered by the stage, not read here.
  ``source_id = source_id("generate", class, index, run seed)``.

Storage: ``path`` is a local path or any URI ``pyarrow.fs.FileSystem.from_uri`` opens (``s3://bucket/prefix``;
credentials and endpoint from the standard AWS variables, e.g. ``AWS_ENDPOINT_URL``). Local folders are
listed with ``os.scandir`` rather than ``pyarrow.fs`` because pyarrow's local listing raises on names that are
not UTF-8 and follows symlinks without saying so, which would defeat the containment policy below. A source's
``uri`` is printable text that never carries credentials (user info and query of the URI are dropped).

Policies (what never silently happens — every listed entry is either a source or a reject that is counted):

* **Containment.** Nothing outside the source root is read. A manifest path that is absolute, or that leaves
  the root after normalisation (``../x.png``, ``a/../../x.png``), and a symlink whose target is outside the root
  are rejected as ``outside_root``; :func:`read_source` checks again, so a link changed after planning is also
  refused. Symlinks inside the root are followed to files, never to directories (``not_a_file``: their files are
  listed at their real place). Spellings of one file (``a/./x.png``, ``a//x.png``, ``a/b/../x.png``, a symlink
  to ``a/x.png``) have one ``source_id``; the second listing of it is rejected as ``duplicate``.
* **Classes.** ``class_from: folder`` takes the first sub-folder; a file directly in the root is ``no_class``.
  Folder names that look numeric (``^[0-9_.-]+$``, e.g. FFHQ's ``00000``) are ``numeric_class`` unless
  ``allow_numeric_classes``; declare the class instead (``class_from: fixed`` + ``class_name``, or a manifest).
  Empty classes are ``no_class``; a class that is not text (an int cell) or not UTF-8 is ``bad_class``.
* **Hidden entries.** A file or folder whose name starts with ``.`` is not read and is listed once as a
  ``hidden_file`` reject (a hidden folder counts as one entry, its contents are not listed), so the funnel shows it.
* **Not files.** A directory named like an image (``x.png/``), FIFOs, sockets and devices are ``not_a_file``
  (a directory's own files are still listed).
* **The build's output.** Entries at or under an ``exclude_uris`` location inside the root (the build's ``--out``)
  are skipped and counted nowhere, so a re-run sees the same sources as the first run; a manifest entry that
  names a file there is rejected as ``in_output``. A source root at or inside an excluded location is an error.
* **Bad input is counted, never fatal**: a manifest entry that is not an object or whose ``file`` is missing or
  not text is ``bad_manifest_entry``; a table cell that is not bytes is ``bad_cell`` (at read time); an
  unreadable table file or row group is ``unreadable_file`` for its rows. Details never carry object
  addresses, so identical runs give identical quarantine rows. Configuration mistakes (missing root, no table
  files, a column that does not exist, an unparsable manifest) raise before anything runs.
"""
from __future__ import annotations

import fnmatch

import csv
import io
import json
import logging
import os
import posixpath
import re
import stat
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence
from urllib.parse import urlsplit

import pyarrow as pa

from filtering.images import (
    ImageRejected,
    QuarantineReason as R,
    cell_bytes,
    check_size,
    error_text,
    file_kind,
    read_file_bytes,
    safe_path_text,
)
from training.data.ids import source_id

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from filtering.images import ImagePolicy
    from pipeline.config import CafeConfig

__all__ = ["IMAGE_SUFFIXES", "TABLE_SUFFIXES", "SourceReader", "iter_sources", "read_source"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
TABLE_SUFFIXES = (".parquet", ".arrow")
_NUMERIC_CLASS = re.compile(r"^[0-9_.-]+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HIDDEN_DETAIL = "name starts with '.' (hidden; not read)"
# Errors that mean "this input is broken" rather than "the storage is unwell" (those propagate: transient).
_BROKEN_INPUT = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, UnicodeError, EOFError)


# ------------------------------------------------------------------------------------------------ public


def iter_sources(cfg: CafeConfig, exclude_uris: Sequence[str | os.PathLike] = ()) -> Iterator[dict]:
    """Every source of ``cfg.build.sources``, in a deterministic order, streamed (nothing is decoded).

    Usage: ``sources = list(iter_sources(cfg, exclude_uris=[out_dir]))``

    Args:
        cfg: The whole config (``build.sources`` and ``run.seed`` are used).
        exclude_uris: Locations whose entries are skipped (the build's output, if it lies inside the root).

    Yields:
        Dicts with ``source_id`` (16 hex), ``kind`` (``file`` | ``table`` | ``generate``), ``class_name``,
        ``uri`` (printable, no credentials) and, by kind, ``path`` (file: local path or URI), ``file``,
        ``row_group``, ``row`` (row in the file), ``row_in_group`` (table) or ``index`` (generate), and
        ``root`` (file, table: the absolute local root or the printable root URI, for :func:`read_source`).
        Inputs already known to be unusable carry ``reject: [reason, detail]``; they are still yielded so
        the funnel counts them. ``source_id`` is unique over the whole stream.

    Raises:
        FileNotFoundError: The root (or manifest) does not exist, or a table root holds no table files.
        ValueError: A manifest that cannot be parsed, a table without the configured column, or a source
            root inside an excluded location.
    """
    src = cfg.build.sources
    if src.kind == "generate":
        entries = _generated(src.classes, src.num_per_class, cfg.run.seed)
    else:
        root = _Root.open(src.path)
        skip = _Exclusions(root, exclude_uris)
        if src.kind == "table":
            entries = _table_sources(root, src, skip)
        elif src.manifest:
            entries = _manifest_sources(root, src, skip)
        else:
            entries = _listed_sources(root, src, skip)
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    held_out = 0
    built = consumed_ids(src.skip_ids) if src.skip_ids else frozenset()
    already = 0
    for alias, source in entries:
        if src.exclude and source["kind"] == "file" and any(fnmatch.fnmatchcase(alias, p) for p in src.exclude):
            held_out += 1  # left out on purpose (build.sources.exclude): not an input of this build
            continue
        if source["source_id"] in built:
            already += 1  # an earlier build consumed it (build.sources.skip_ids)
            continue
        sid = source["source_id"]
        if sid in seen:
            source = {**source, "source_id": source_id("duplicate", alias),
                      "reject": [R.DUPLICATE.value, f"the same file as source {sid}, listed earlier"]}
        seen.add(source["source_id"])
        counts[source["reject"][0] if "reject" in source else "ok"] += 1
        yield source
    log.info("sources: %d listed, %d usable; rejected at planning: %s; excluded by build.sources.exclude: %d%s",
             sum(counts.values()), counts.pop("ok", 0), dict(sorted(counts.items())) or "none", held_out,
             f"; built before (build.sources.skip_ids): {already}" if src.skip_ids else "")


def consumed_ids(location: str) -> frozenset[str]:
    """The ``source_id`` column of a Parquet file (path or URI): the sources an earlier build consumed."""
    from pipeline.store import Storage

    import pyarrow.parquet as pq

    where = Storage(location)
    with where.fs.open_input_file(where.root) as f:
        return frozenset(pq.read_table(f, columns=["source_id"]).column("source_id").to_pylist())


def read_source(source: dict, cfg: CafeConfig, policy: ImagePolicy, cache: SourceReader | None = None) -> bytes:
    """The raw (still encoded) image bytes of one source from :func:`iter_sources`.

    Usage: ``png = encode_png(decode_image(read_source(source, cfg, policy, reader), policy))``

    Args:
        source: A dict yielded by :func:`iter_sources` (a JSON round trip is fine).
        cfg: The config the source was listed with.
        policy: Supplies the size limit (``max_file_mb``), for files and table cells alike.
        cache: The actor's :class:`SourceReader`; ``None`` reads without caching.

    Returns:
        The bytes, for :func:`filtering.images.decode_image`.

    Raises:
        ImageRejected: Input-caused failures (the planning ``reject``, ``outside_root``, ``unreadable_file``,
            ``not_a_file``, ``empty_file``, ``file_too_large``, ``bad_cell``): quarantine with the reason.
        OSError: Storage errors that are not the input's fault (connection, throttling, ...) on remote
            storage: transient, retry.
        ValueError: ``generate`` sources (rendered by the ``t2i`` model, not read) and unknown kinds.
    """
    if source.get("reject"):
        reason, detail = source["reject"]
        raise ImageRejected(R(reason), detail)
    reader = cache if cache is not None else SourceReader()
    kind = source["kind"]
    if kind not in ("file", "table"):
        raise ValueError(f"read_source: a {kind!r} source has no stored bytes (allowed kinds: 'file', 'table')")
    configured = cfg.build.sources.path
    location = configured if _is_uri(configured) else source.get("root") or configured
    if kind == "file":
        return reader.root(location).read_file(source["path"], policy)
    column = reader.image_column(location, source["file"], source["row_group"], cfg.build.sources.image_column)
    k = source["row_in_group"]
    if not 0 <= k < len(column):
        raise ImageRejected(R.UNREADABLE, f"row {source['row']} is no longer in the table (changed since planning)")
    return cell_bytes(column[k].as_py(), policy)


class SourceReader:
    """Per-actor reading state: opened roots, the last table file and the last row group's image column.

    Usage: ``reader = SourceReader()`` once per actor, then ``read_source(s, cfg, policy, reader)`` per source.

    Memory is bounded by one row group's image column (plus one open file handle).
    """

    def __init__(self) -> None:
        self._roots: dict[str, _Root] = {}
        self._table: _TableFile | None = None
        self._group: tuple[tuple[str, int, str], Any] | None = None

    def root(self, location: str) -> _Root:
        if location not in self._roots:
            self._roots[location] = _Root.open(location)
        return self._roots[location]

    def image_column(self, location: str, file: str, group: int, column: str):
        """The ``column`` of row group ``group`` of ``file`` (cached: the last one read)."""
        key = (file, group, column)
        if self._group is not None and self._group[0] == key:
            return self._group[1]
        self._group = None  # free the previous row group before reading the next
        root = self.root(location)
        try:
            if self._table is None or self._table.file != file:
                self._table = None
                self._table = _TableFile(root, file)
            data = self._table.read_group(group, [column])[column]
        except root.broken_input as err:
            self._table = None
            raise ImageRejected(R.UNREADABLE, f"row group {group} could not be read ({error_text(err)})") from err
        self._group = (key, data)
        return data


# ------------------------------------------------------------------------------------------------ storage


def _is_uri(location: str) -> bool:
    return bool(_URI.match(location)) and not location.startswith("file://")


def _printable_uri(location: str) -> str:
    """``location`` without user info (credentials), query and fragment; no trailing slash."""
    parts = urlsplit(location)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


@dataclass
class _Root:
    """A source root: a local directory/file (read with ``os``) or a ``pyarrow.fs`` location."""

    uri: str  # printable
    base: str  # local: absolute path (may hold surrogate escapes); remote: the filesystem path
    fs: pafs.FileSystem | None = None  # None: local
    real: str = ""  # local: realpath of base

    @classmethod
    def open(cls, location: str) -> _Root:
        if _is_uri(location):
            import pyarrow.fs as pafs

            fs, base = pafs.FileSystem.from_uri(location)
            return cls(uri=_printable_uri(location), base=base.rstrip("/"), fs=fs)
        if location.startswith("file://"):
            location = location[len("file://"):]
        base = os.path.abspath(location)
        return cls(uri=safe_path_text(base), base=base, real=os.path.realpath(base))

    @property
    def local(self) -> bool:
        return self.fs is None

    @property
    def where(self) -> str:
        """The source's ``root`` key: the absolute local root (actors may run in another working directory)
        or the printable URI (actors reopen the configured URI, which keeps its options)."""
        return self.base if self.local else self.uri

    @property
    def broken_input(self) -> tuple[type[BaseException], ...]:
        # Locally an OSError is about the file (missing, a directory, permissions); remotely it may be the network.
        return _BROKEN_INPUT + (OSError,) if self.local else _BROKEN_INPUT

    def join(self, rel: str) -> str:
        """The source's ``path``: a local path (openable) or the printable URI of ``rel``."""
        if not rel:
            return self.base if self.local else self.uri
        return os.path.join(self.base, rel) if self.local else f"{self.uri}/{rel}"

    def text(self, path: str) -> str:
        return safe_path_text(path) if self.local else path

    def fs_path(self, path: str) -> str:
        """Filesystem path of a ``join``-ed path; refuses anything not under this root."""
        if self.local:
            real = os.path.realpath(path)
            if not _inside(real, self.real):
                raise ImageRejected(R.OUTSIDE_ROOT, "resolves outside the source root")
            return path
        if path == self.uri:
            return self.base
        if not path.startswith(self.uri + "/"):
            raise ImageRejected(R.OUTSIDE_ROOT, "not under the source root")
        rel = posixpath.normpath(path[len(self.uri) + 1:])
        if rel == ".." or rel.startswith("../") or rel.startswith("/"):
            raise ImageRejected(R.OUTSIDE_ROOT, "leaves the source root")
        return f"{self.base}/{rel}" if self.base else rel

    def kind(self) -> str:
        """``dir``, ``file`` or ``missing`` for the root itself."""
        if self.local:
            return "dir" if os.path.isdir(self.base) else "file" if os.path.isfile(self.base) else "missing"
        import pyarrow.fs as pafs

        t = self.fs.get_file_info(self.base).type
        return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(t, "missing")

    def open_input_file(self, path: str):
        fs_path = self.fs_path(path)
        return pa.memory_map(fs_path, "r") if self.local else self.fs.open_input_file(fs_path)

    def open_input_stream(self, path: str):
        fs_path = self.fs_path(path)
        return pa.memory_map(fs_path, "r") if self.local else self.fs.open_input_stream(fs_path)

    def read_file(self, path: str, policy: ImagePolicy) -> bytes:
        """Bytes of one file under the root (containment re-checked); see :func:`read_source`."""
        fs_path = self.fs_path(path)
        if self.local:
            return read_file_bytes(fs_path, policy)
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(fs_path)
        if info.type == pafs.FileType.NotFound:
            raise ImageRejected(R.UNREADABLE, os.strerror(2))
        if info.type != pafs.FileType.File:
            raise ImageRejected(R.NOT_A_FILE, f"not a regular file ({info.type.name.lower()})")
        check_size(info.size, policy)
        with self.fs.open_input_stream(fs_path) as f:
            data = f.read(policy.max_file_bytes + 1)  # one byte past the limit catches a file that grew
        check_size(len(data), policy)
        return data

    def read_text(self, location: str) -> str:
        """A small text file (a manifest): ``location`` absolute/URI, or relative to the root."""
        import pyarrow.fs as pafs

        if _is_uri(location):
            fs, path = pafs.FileSystem.from_uri(location)
            if fs.get_file_info(path).type != pafs.FileType.File:
                raise FileNotFoundError(f"build.sources.manifest = {_printable_uri(location)}: not found")
            with fs.open_input_stream(path) as f:
                return f.read().decode("utf-8-sig")
        if self.local or os.path.isabs(location):
            path = location if os.path.isabs(location) else os.path.join(self.base, location)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"build.sources.manifest = {location}: not found (looked at {path})")
            with open(path, encoding="utf-8-sig") as f:  # a BOM (spreadsheet exports) is not in a column name
                return f.read()
        path = self.fs_path(f"{self.uri}/{location}")  # the root's filesystem keeps its options and credentials
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"build.sources.manifest = {location}: not found under {self.uri}")
        with self.fs.open_input_stream(path) as f:
            return f.read().decode("utf-8-sig")


class _Exclusions:
    """Paths under the root (relative, ``/``-separated) that belong to the build's output."""

    def __init__(self, root: _Root, uris: Sequence[str | os.PathLike]):
        self.rels: set[str] = set()
        for uri in uris:
            uri = os.fspath(uri)
            if _is_uri(uri) != (not root.local):
                continue  # another storage: cannot overlap
            if root.local:
                local = uri[len("file://"):] if uri.startswith("file://") else uri
                pairs = [(os.path.abspath(local), root.base), (os.path.realpath(local), root.real)]
            else:
                pairs = [(_printable_uri(uri), root.uri)]
            for path, base in pairs:
                sep = os.sep if root.local else "/"
                if _inside(base, path):
                    raise ValueError(f"build.sources.path = {root.uri} is inside the build's output {uri}; "
                                     "use another --out or another source path")
                if _inside(path, base):
                    self.rels.add(path[len(base.rstrip(sep)) + 1:].replace(os.sep, "/"))

    def __call__(self, rel: str) -> bool:
        return any(rel == r or rel.startswith(r + "/") for r in self.rels)


# ------------------------------------------------------------------------------------------------ classes


def _class_reject(cls: object, from_folder: bool, allow_numeric: bool) -> list[str] | None:
    if cls is None or cls == "":
        detail = "the file is not in a class sub-folder" if from_folder else "the class is empty"
        return [R.NO_CLASS.value, detail]
    if not isinstance(cls, str):
        return [R.BAD_CLASS.value, f"the class holds {type(cls).__name__}; expected text"]
    try:
        cls.encode("utf-8")
    except UnicodeEncodeError:
        return [R.BAD_CLASS.value, f"the class '{safe_path_text(cls)}' is not valid UTF-8"]
    if not cls.strip():
        return [R.NO_CLASS.value, "the class is blank"]
    if from_folder and not allow_numeric and _NUMERIC_CLASS.match(cls):
        return [R.NUMERIC_CLASS.value, f"the folder name {cls!r} looks numeric, not like a class; declare the "
                "class (class_from: fixed or manifest) or set allow_numeric_classes"]
    return None


def _with_class(source: dict, cls: object, src, from_folder: bool) -> dict:
    reject = _class_reject(cls, from_folder, src.allow_numeric_classes)
    if reject is None:
        source["class_name"] = cls
    else:  # keep what was there (printable) for the quarantine row; the first reject is the one that counts
        source["class_name"] = safe_path_text(cls) if isinstance(cls, str) else ""
        source.setdefault("reject", reject)
    return source


def _folder_class(rel: str) -> str | None:
    head, sep, _ = rel.partition("/")
    return head if sep else None


# ------------------------------------------------------------------------------------------------ generate


def _generated(classes: list[str], num_per_class: int, seed: int) -> Iterator[tuple[str, dict]]:
    for cls in classes:
        for i in range(num_per_class):
            uri = f"generate://{cls}/{i}"
            yield uri, {"source_id": source_id("generate", cls, i, seed), "kind": "generate", "class_name": cls,
                        "uri": uri, "index": i}


# ------------------------------------------------------------------------------------------------ folders


@dataclass(frozen=True)
class _Entry:
    rel: str  # as listed, relative to the root
    status: str  # "file" or a QuarantineReason value
    detail: str = ""
    real_rel: str = ""  # files: the resolved path relative to the root (what the id hashes)


def _listed_sources(root: _Root, src, skip: _Exclusions) -> Iterator[tuple[str, dict]]:
    if root.kind() != "dir":
        raise FileNotFoundError(f"build.sources.path = {src.path}: not a directory")
    entries = _walk_local(root, skip) if root.local else _walk_remote(root, skip)
    for e in entries:
        path = root.join(e.rel)
        source = {"source_id": source_id("file", e.real_rel or e.rel), "kind": "file", "class_name": "",
                  "path": path, "uri": root.text(path), "root": root.where}
        if e.status != "file":
            source["reject"] = [e.status, e.detail]
        yield e.rel, _assign_class(source, e.rel, None, src)


def _assign_class(source: dict, rel: str, item: dict | None, src) -> dict:
    how = src.class_source
    if how == "fixed":
        return _with_class(source, src.class_name, src, from_folder=False)
    if how == "manifest":
        return _with_class(source, (item or {}).get(src.class_column), src, from_folder=False)
    return _with_class(source, _folder_class(rel), src, from_folder=True)


def _walk_local(root: _Root, skip: _Exclusions, rel_dir: str = "") -> Iterator[_Entry]:
    """Depth first, names sorted; directory symlinks are never followed (no loops, no double listing)."""
    with os.scandir(os.path.join(root.base, rel_dir) if rel_dir else root.base) as it:
        children = sorted(it, key=lambda d: os.fsencode(d.name))
    for d in children:
        rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
        if skip(rel):
            continue
        if d.name.startswith("."):
            yield _Entry(rel, R.HIDDEN_FILE.value, _HIDDEN_DETAIL)
        elif d.is_symlink():
            yield _resolve_link(root, skip, d.path, rel)
        elif d.is_dir(follow_symlinks=False):
            if os.path.splitext(d.name)[1].lower() in IMAGE_SUFFIXES:
                yield _Entry(rel, R.NOT_A_FILE.value, "a directory named like an image")
            yield from _walk_local(root, skip, rel)
        elif d.is_file(follow_symlinks=False):
            yield _Entry(rel, "file", real_rel=rel)
        else:
            kind = file_kind(d.stat(follow_symlinks=False).st_mode)
            yield _Entry(rel, R.NOT_A_FILE.value, f"not a regular file ({kind})")


def _resolve_link(root: _Root, skip: _Exclusions, path: str, rel: str) -> _Entry:
    real = os.path.realpath(path)
    if not _inside(real, root.real):
        return _Entry(rel, R.OUTSIDE_ROOT.value, "a symlink that resolves outside the source root")
    real_rel = os.path.relpath(real, root.real).replace(os.sep, "/")
    if skip(real_rel):
        return _Entry(rel, R.IN_OUTPUT.value, "a symlink into the build's output")
    try:
        mode = os.stat(real).st_mode
    except OSError:  # dangling or looping: read_source reports the errno text
        return _Entry(rel, "file", real_rel=rel)
    if stat.S_ISREG(mode):
        return _Entry(rel, "file", real_rel=real_rel)
    if stat.S_ISDIR(mode):
        return _Entry(rel, R.NOT_A_FILE.value, "a symlink to a directory (not followed; its files are listed "
                      "where they are)")
    return _Entry(rel, R.NOT_A_FILE.value, f"a symlink to a {file_kind(mode)}")


def _walk_remote(root: _Root, skip: _Exclusions) -> Iterator[_Entry]:
    import pyarrow.fs as pafs

    infos = root.fs.get_file_info(pafs.FileSelector(root.base, recursive=True))
    prefix = root.base + "/" if root.base else ""
    hidden: set[str] = set()
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
        if skip(rel):
            continue
        parts = rel.split("/")
        dot = next((i for i, p in enumerate(parts) if p.startswith(".")), None)
        if dot is not None:
            top = "/".join(parts[: dot + 1])
            if top not in hidden:
                hidden.add(top)
                yield _Entry(top, R.HIDDEN_FILE.value, _HIDDEN_DETAIL)
        elif info.type == pafs.FileType.Directory:
            if posixpath.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES:
                yield _Entry(rel, R.NOT_A_FILE.value, "a directory named like an image")
        elif info.type == pafs.FileType.File:
            yield _Entry(rel, "file", real_rel=rel)
        else:
            yield _Entry(rel, R.NOT_A_FILE.value, f"not a regular file ({info.type.name.lower()})")


# ------------------------------------------------------------------------------------------------ manifests


def _manifest_items(text: str, name: str, src) -> Iterator[object]:
    if name.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"build.sources.manifest {name}: line {n} is not JSON ({err.msg})") from None
    elif name.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"build.sources.manifest {name}: not JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(items, list):
            raise ValueError(f"build.sources.manifest {name}: holds a {type(items).__name__}; expected a list of "
                             "objects with 'file' (and the class column)")
        yield from items
    else:
        rows = csv.DictReader(io.StringIO(text, newline=""))
        header = rows.fieldnames or []
        needed = ["file"] + ([src.class_column] if src.class_source == "manifest" else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"build.sources.manifest {name}: no column {missing[0]!r} (columns: {header})")
        yield from rows


def _normalise(root: _Root, text: str) -> tuple[str | None, str]:
    """(lexical rel, real rel) of a manifest path, or (None, why) when it must not be read."""
    if text.startswith("/") or _is_uri(text) or text.startswith("file:"):
        return None, "an absolute path; manifest paths are relative to the source root"
    rel = posixpath.normpath(text)
    if rel == ".." or rel.startswith("../"):
        return None, "leaves the source root"
    if not root.local:
        return rel, rel
    real = os.path.realpath(os.path.join(root.base, rel))
    if not _inside(real, root.real):
        return None, "resolves (through a symlink) outside the source root"
    return rel, os.path.relpath(real, root.real).replace(os.sep, "/")


def _manifest_sources(root: _Root, src, skip: _Exclusions) -> Iterator[tuple[str, dict]]:
    if root.kind() != "dir":
        raise FileNotFoundError(f"build.sources.path = {src.path}: not a directory")
    name = src.manifest
    manifest_uri = _printable_uri(name) if _is_uri(name) else safe_path_text(name)
    for i, item in enumerate(_manifest_items(root.read_text(name), name, src)):
        alias = f"{manifest_uri}#{i}"
        bad = {"source_id": source_id("manifest", i), "kind": "file", "class_name": "", "path": "",
               "uri": alias, "root": root.where}
        if not isinstance(item, dict):
            yield alias, {**bad, "reject": [R.BAD_MANIFEST_ENTRY.value,
                                            f"entry {i} is a {type(item).__name__}; expected an object"]}
            continue
        file = item.get("file")
        why = ("has no 'file'" if file is None else f"'file' holds {type(file).__name__}; expected text"
               if not isinstance(file, str) else "'file' is empty" if not file.strip()
               else "'file' contains a NUL character" if "\x00" in file else None)
        rel, real_rel = (None, why) if why else _normalise(root, file)
        if rel is None:
            reason = R.BAD_MANIFEST_ENTRY if why else R.OUTSIDE_ROOT
            detail = f"entry {i} {why}" if why else f"entry {i} ({safe_path_text(file)!r}): {real_rel}"
            yield alias, _assign_class({**bad, "reject": [reason.value, detail]}, "", item, src)
            continue
        if rel == ".":
            yield alias, {**bad, "reject": [R.NOT_A_FILE.value, f"entry {i} names the source root itself"]}
            continue
        path = root.join(rel)
        source = {"source_id": source_id("file", real_rel), "kind": "file", "class_name": "", "path": path,
                  "uri": root.text(path), "root": root.where}
        if skip(real_rel) or skip(rel):
            source["reject"] = [R.IN_OUTPUT.value, f"entry {i} names a file in the build's output"]
        yield alias, _assign_class(source, rel, item, src)


# ------------------------------------------------------------------------------------------------ tables


class _TableFile:
    """A Parquet file (row groups) or Arrow IPC file/stream (record batches), read one group at a time."""

    def __init__(self, root: _Root, file: str):
        import pyarrow.parquet as pq

        self.file, self._root = file, root
        self._parquet = self._ipc_file = self._stream = None
        self._next = 0  # the next record batch a stream reader yields
        if file.endswith(".parquet"):
            self._parquet = pq.ParquetFile(root.open_input_file(file))
            self.schema = self._parquet.schema_arrow
        else:
            try:
                self._ipc_file = pa.ipc.open_file(root.open_input_file(file))
                self.schema = self._ipc_file.schema
            except pa.ArrowInvalid:  # not the file format: the stream format (what `datasets` writes)
                self._open_stream()
                self.schema = self._stream.schema

    def _open_stream(self) -> None:
        self._stream = pa.ipc.open_stream(self._root.open_input_stream(self.file))
        self._next = 0

    def group_sizes(self) -> list[int] | None:
        """Rows per group from metadata alone, or None (a stream's batches are known only by reading them)."""
        if self._parquet is not None:
            meta = self._parquet.metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        if self._ipc_file is not None:
            return [self._ipc_file.get_batch(g).num_rows for g in range(self._ipc_file.num_record_batches)]
        return None

    def iter_groups(self, columns: list[str]) -> Iterator[pa.Table | pa.RecordBatch]:
        sizes = self.group_sizes()
        if sizes is not None:
            for g in range(len(sizes)):
                yield self.read_group(g, columns)
            return
        self._open_stream()
        for batch in self._stream:
            self._next += 1
            yield batch.select(columns)

    def read_group(self, group: int, columns: list[str]) -> pa.Table | pa.RecordBatch:
        if self._parquet is not None:
            return self._parquet.read_row_group(group, columns=columns)
        if self._ipc_file is not None:
            return self._ipc_file.get_batch(group).select(columns)
        if self._stream is None or group < self._next:
            self._open_stream()
        while True:  # forward only: consecutive sources move forward through the stream
            try:
                batch = self._stream.read_next_batch()
            except StopIteration:
                raise ImageRejected(R.UNREADABLE, f"the table has no row group {group} (changed since planning)") from None
            self._next += 1
            if self._next == group + 1:
                return batch.select(columns)


def _class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """Names of an HF ``ClassLabel`` column, from the ``huggingface`` schema metadata."""
    try:
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        feature = info.get("info", {}).get("features", {}).get(column, {})
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    except (ValueError, AttributeError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _table_files(root: _Root, skip: _Exclusions) -> Iterator[tuple[str, str, list[str] | None]]:
    """(name, path, reject) of each table file: ``path`` itself or the table files directly in it."""
    kind = root.kind()
    if kind == "file":
        yield posixpath.basename(root.base), root.join(""), None
        return
    if kind != "dir":
        raise FileNotFoundError(f"build.sources.path = {root.uri}: does not exist")
    if root.local:
        with os.scandir(root.base) as it:
            listing = [(d.name, d.is_file(), d.is_dir()) for d in it]
    else:
        import pyarrow.fs as pafs

        infos = root.fs.get_file_info(pafs.FileSelector(root.base, recursive=False))
        listing = [(posixpath.basename(i.path), i.type == pafs.FileType.File, i.type == pafs.FileType.Directory)
                   for i in infos]
    found = 0
    for name, is_file, is_dir in sorted(listing, key=lambda x: os.fsencode(x[0])):
        if not name.endswith(TABLE_SUFFIXES) or skip(name):
            continue
        found += 1
        reject = ([R.HIDDEN_FILE.value, _HIDDEN_DETAIL] if name.startswith(".") else None if is_file
                  else [R.NOT_A_FILE.value, "a directory named like a table file" if is_dir else "not a regular file"])
        path = root.join(name)
        if reject is None and root.local and not _inside(os.path.realpath(path), root.real):
            reject = [R.OUTSIDE_ROOT.value, "a symlink that resolves outside the source root"]
        yield name, path, reject
    if not found:
        raise FileNotFoundError(f"build.sources.path = {root.uri}: no .parquet or .arrow files")


def _table_sources(root: _Root, src, skip: _Exclusions) -> Iterator[tuple[str, dict]]:
    fixed = src.class_source == "fixed"
    for name, file, reject in _table_files(root, skip):
        uri = root.text(file)
        whole = {"source_id": source_id("table", name, "file"), "kind": "table", "class_name": "", "uri": uri,
                 "file": file, "row_group": -1, "row": -1, "row_in_group": -1, "root": root.where}
        if reject:
            yield uri, {**whole, "reject": reject}
            continue
        try:
            table = _TableFile(root, file)
        except root.broken_input as err:
            yield uri, {**whole, "reject": [R.UNREADABLE.value, f"not a readable table ({error_text(err)})"]}
            continue
        names = table.schema.names
        for column in [src.image_column] + ([] if fixed else [src.class_column]):
            if column not in names:
                raise ValueError(f"build.sources: {uri} has no column {column!r} (columns: {names})")
        yield from _table_rows(root, table, name, uri, src)


def _table_rows(root: _Root, table: _TableFile, name: str, uri: str, src) -> Iterator[tuple[str, dict]]:
    fixed = src.class_source == "fixed"
    labels = None if fixed else _class_label_names(table.schema, src.class_column)
    sizes = table.group_sizes() if fixed else None
    row = 0

    def row_source(g: int, k: int, cls: object, reject: list[str] | None = None) -> tuple[str, dict]:
        if labels is not None and isinstance(cls, int) and not isinstance(cls, bool) and 0 <= cls < len(labels):
            cls = labels[cls]
        s = {"source_id": source_id("table", name, row + k), "kind": "table", "class_name": "",
             "uri": f"{uri}#{row + k}", "file": table.file, "row_group": g, "row": row + k, "row_in_group": k,
             "root": root.where}
        if reject:
            s["reject"] = reject
        return s["uri"], _with_class(s, src.class_name if fixed else cls, src, from_folder=False)

    try:
        if sizes is not None:  # fixed class from metadata: no column is read (streams have no metadata)
            for g, n in enumerate(sizes):
                for k in range(n):
                    yield row_source(g, k, None)
                row += n
            return
        for g, part in enumerate(table.iter_groups([] if fixed else [src.class_column])):
            classes = [None] * part.num_rows if fixed else part.column(0).to_pylist()
            for k, cls in enumerate(classes):
                yield row_source(g, k, cls)
            row += part.num_rows
    except root.broken_input as err:
        # the rest of the file cannot be listed: one reject stands for it, with where it stopped
        detail = f"unreadable from row {row} on ({error_text(err)})"
        yield f"{uri}#{row}-", {"source_id": source_id("table", name, "from", row), "kind": "table",
                                "class_name": "", "uri": f"{uri}#{row}-", "file": table.file, "row_group": -1,
                                "row": row, "row_in_group": -1, "root": root.where,
                                "reject": [R.UNREADABLE.value, detail]}
