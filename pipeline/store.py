"""Storage for builds behind URIs: atomic object writes, write-then-marker commits, a lease on the output.

Usage::

    out = Storage("s3://bucket/builds/round0")          # or a local path; pyarrow.fs underneath
    out.write_bytes("_work/x.json", b"...")             # whole object, atomic (temp + rename locally, one PUT on S3)
    table = out.read_parquet("dataset/data/train-000001.parquet")
    with Lease(out).held():                              # one driver per output, fenced by epochs (conditional creates)
        ...

Commit protocol: a multi-file unit (a chunk's generation parts, a chunk's published shards) is written file
by file and then *committed* by writing one small marker object last; readers trust only what a marker
names. There are no directory renames, so the same code runs on POSIX disks and on object stores (S3, GCS
through their pyarrow filesystems). Credentials and endpoints come from the standard environment variables
of each filesystem (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...), never from a
config file, and are never written anywhere.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

#: every local temporary file carries this infix, so a successor can tell a dead run's leftovers
TMP_INFIX = ".tmp-"


def is_uri(location: str) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI (``Path`` would collapse ``s3://b`` into ``s3:/b``)."""
    location = str(location)
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


class Storage:
    """A root location (local directory or ``scheme://…`` URI) and relative keys below it.

    Picklable (only the URI travels; the filesystem is re-created lazily in each process). Writes of one
    object are atomic: locally a temporary sibling (``.<name>.tmp-<owner>-<rand>``) is fsynced and renamed
    over the target; on an object store one PUT is atomic by itself.
    """

    def __init__(self, location: str | os.PathLike, owner: str | None = None):
        location = str(location)
        self.uri = location if is_uri(location) else str(Path(location).absolute())
        self.owner = owner or "anon"
        self._fs: pafs.FileSystem | None = None
        self._root: str | None = None

    def __getstate__(self):
        return {"uri": self.uri, "owner": self.owner, "_fs": None, "_root": None}

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            if is_uri(self.uri) and not self.uri.startswith("file://"):
                self._fs, root = pafs.FileSystem.from_uri(self.uri)
            else:
                self._fs, root = pafs.LocalFileSystem(), self.uri.removeprefix("file://")
            self._root = root.rstrip("/")
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - resolves the root
        return self._root  # type: ignore[return-value]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def sub(self, rel: str) -> "Storage":
        """A Storage rooted at ``rel`` below this one."""
        return Storage(f"{self.uri.rstrip('/')}/{rel}", owner=self.owner)

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    # -- reading -------------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str, default=None):
        try:
            return json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            return default

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self.path(rel)) as f:
            return pq.read_table(f, columns=columns)

    def list(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Relative keys of the files below ``rel`` (sorted); [] when it does not exist."""
        sel = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        base = self.path(rel).rstrip("/") + "/"
        out = [i.path[len(base):] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        return sorted(out)

    def size(self, rel: str = "") -> int:
        """Total bytes of the files below ``rel``."""
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        return sum(i.size or 0 for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    # -- writing -------------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.is_local:
            os.replace(self._local_tmp(target, data), target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def _tmp_sibling(self, target: str) -> str:
        """A fresh temporary name beside ``target`` (its directory created), named so a successor can tell a dead
        run's leftovers (:meth:`clean_dead_tmp`)."""
        parent, name = os.path.split(target)
        os.makedirs(parent, exist_ok=True)
        return os.path.join(parent, f".{name}{TMP_INFIX}{self.owner}-{uuid.uuid4().hex[:8]}")

    def _local_tmp(self, target: str, data: bytes) -> str:
        """``data`` fsynced in a temporary sibling of ``target``."""
        tmp = self._tmp_sibling(target)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist yet: True if this call created it, False if it already existed.

        The one conditional write everything that must not race is built on (the registry's log, see
        :mod:`pipeline.loop.registry`): of any number of concurrent creators of one key exactly one gets True, and
        readers see either nothing or the whole object. Locally a complete temporary file is hard-linked to the
        target (``link`` fails when the target exists); on S3 one ``PutObject`` with ``If-None-Match: *`` (boto3;
        S3 and S3-compatible stores answer 412 when the key exists). Other schemes are refused.
        """
        if self.is_local:
            target = self.path(rel)
            tmp = self._local_tmp(target, data)
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if not self.uri.startswith(("s3://", "s3a://")):
            raise NotImplementedError(f"{self.uri}: conditional writes are implemented for local paths and s3:// "
                                      "only (the registry needs one); use one of those")
        return _s3_create(self.path(rel), data)

    def create_json(self, rel: str, obj) -> bool:
        return self.create(rel, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_parquet(self, rel: str, table: pa.Table, **kwargs) -> int:
        """Write ``table`` as one Parquet object (atomically); return its size in bytes."""
        buf = io.BytesIO()
        pq.write_table(table, buf, **kwargs)
        data = buf.getvalue()
        self.write_bytes(rel, data)
        return len(data)

    @contextmanager
    def writer(self, rel: str):
        """A stream for one large object written piece by piece (a Parquet writer's sink): locally a temporary
        sibling renamed over ``rel`` when the block ends without error; on an object store a multipart upload
        that completes on close. Readers never see a partial object locally; on object stores the object appears
        whole at close. Callers that must survive a kill mid-write still commit with a marker written after it."""
        target = self.path(rel)
        if not self.is_local:
            with self.fs.open_output_stream(target) as f:
                yield f
            return
        tmp = self._tmp_sibling(target)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def delete_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self.path(rel))
        except FileNotFoundError:
            pass

    def clean_dead_tmp(self, live_owner: str) -> int:
        """Remove local temporary files left by killed runs (any owner but ``live_owner``); 0 on object stores."""
        if not self.is_local or not os.path.isdir(self.root):
            return 0
        removed = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames + dirnames:
                if name.startswith(".") and TMP_INFIX in name and f"{TMP_INFIX}{live_owner}-" not in name:
                    p = os.path.join(dirpath, name)
                    if os.path.isdir(p):
                        import shutil

                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        os.unlink(p)
                    removed += 1
        return removed


_S3_CLIENT = None


def _s3_create(path: str, data: bytes, attempts: int = 8) -> bool:
    """``PutObject`` with ``If-None-Match: *`` on ``bucket/key``: True created, False the key exists.

    The client is boto3's, configured by the standard environment (``AWS_ENDPOINT_URL`` for an S3-compatible
    server, credentials, region). S3 answers 409 ``ConditionalRequestConflict`` while another conditional write
    of the same key is in flight: retried with a short backoff, then the key is looked at again.
    """
    global _S3_CLIENT
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError as exc:  # pragma: no cover - boto3 is a dependency
        raise RuntimeError("conditional writes on s3:// need boto3 (pip install boto3)") from exc
    if _S3_CLIENT is None:
        _S3_CLIENT = boto3.client("s3")
    bucket, _, key = path.partition("/")
    for attempt in range(attempts):
        try:
            _S3_CLIENT.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return False
            if code == "ConditionalRequestConflict" or status == 409:
                time.sleep(0.05 * 2 ** attempt)
                continue
            raise
    raise OSError(f"s3://{path}: conditional write still conflicting after {attempts} attempts")


# ------------------------------------------------------------------------------------------------ lease


class OutputBusy(RuntimeError):
    """Another live driver holds the output's lease."""


class Lease:
    """One driver per output, fenced by epochs: ``_work/lease/<epoch>.json`` = owner id, host, pid, heartbeat time.

    The holder is the owner of the highest epoch. A driver takes the lease by *creating* the next epoch's object
    (:meth:`Storage.create`: ``If-None-Match`` on S3, a hard link locally), so of any number of drivers racing for
    a free or stale lease exactly one wins, with no settle time and no clock trusted for the race. A lease is free
    when its holder released it, when its heartbeat is older than ``ttl_s`` (a dead driver elsewhere) or, at once,
    when it was held on this host by a process that no longer exists (a scheduler's immediate retry after a crash
    need not wait ``ttl_s``). While held, a daemon thread rewrites the holder's own epoch object every
    ``heartbeat_s``; if a newer epoch appears (a successor took over a lease it judged stale) the lease is lost:
    :meth:`check` raises before the next commit, and :meth:`fence` — one existence check of the next epoch — lets
    a worker that outlived its driver refuse to commit. Epochs only grow: a release marks its epoch released
    instead of deleting it, so a fenced worker can never mistake a successor for its own driver.
    """

    DIR = "_work/lease"

    def __init__(self, storage: Storage, ttl_s: float = 60.0, heartbeat_s: float = 10.0):
        if heartbeat_s >= ttl_s:
            raise ValueError(f"lease heartbeat_s={heartbeat_s} must be below ttl_s={ttl_s}")
        self.storage = storage
        self.owner = storage.owner if storage.owner != "anon" else uuid.uuid4().hex[:12]
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.epoch: int | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None

    @staticmethod
    def _key(epoch: int) -> str:
        return f"{Lease.DIR}/{epoch:010d}.json"

    def _record(self, released: bool = False) -> dict:
        rec = {"owner": self.owner, "epoch": self.epoch, "host": socket.gethostname(), "pid": os.getpid(),
               "heartbeat": time.time()}
        return {**rec, "released": True} if released else rec

    def current(self) -> dict | None:
        """The highest epoch's record (None: never held)."""
        epochs = [int(n.removesuffix(".json")) for n in self.storage.list(self.DIR)
                  if n.endswith(".json") and n.removesuffix(".json").isdigit()]
        for epoch in sorted(epochs, reverse=True):
            rec = self.storage.read_json(self._key(epoch))
            if rec is not None:
                return {**rec, "epoch": epoch}
        return None

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait_s`` for a live owner to finish; :class:`OutputBusy` otherwise."""
        deadline = time.time() + wait_s
        while True:
            cur = self.current()
            age = time.time() - cur["heartbeat"] if cur else None
            if cur is None or cur.get("released") or cur["owner"] == self.owner or age > self.ttl_s \
                    or _dead_here(cur):
                self.epoch = (cur["epoch"] if cur else 0) + 1
                if self.storage.create_json(self._key(self.epoch), self._record()):
                    if cur is not None and not cur.get("released") and cur["owner"] != self.owner:
                        self.took_over = cur
                        log.warning("taking over %s from a dead driver (host %s pid %s, heartbeat %.0f s ago)",
                                    self.storage.uri, cur.get("host"), cur.get("pid"), age)
                    break
                continue  # another driver created that epoch first: look again
            if time.time() >= deadline:
                raise OutputBusy(
                    f"{self.storage.uri} is being built by another driver (host {cur.get('host')}, pid "
                    f"{cur.get('pid')}, heartbeat {age:.0f} s ago); wait for it, or re-run after it stops "
                    f"(a dead driver's lease expires after {self.ttl_s:.0f} s)")
            time.sleep(min(self.heartbeat_s, max(0.1, deadline - time.time())))
        for old in range(max(1, self.epoch - 64), self.epoch - 1):  # keep the log short; the last two stay
            self.storage.delete(self._key(old))
        self.lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="cafe-lease", daemon=True)
        self._thread.start()

    def _superseded(self) -> bool:
        return self.storage.exists(self._key(self.epoch + 1))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._superseded():
                    log.error("lost the lease on %s to epoch %d", self.storage.uri, self.epoch + 1)
                    self.lost.set()
                    return
                self.storage.write_json(self._key(self.epoch), self._record())
            except OSError as exc:  # a storage hiccup: keep trying; the ttl absorbs a few misses
                log.warning("lease heartbeat failed: %s", exc)

    def check(self) -> None:
        """Raise :class:`OutputBusy` if another driver took the lease (the heartbeat saw it, or it is there now)."""
        if self.lost.is_set() or (self.epoch is not None and self._superseded()):
            self.lost.set()
            raise OutputBusy(f"lost the lease on {self.storage.uri} to another driver; stopping")

    @staticmethod
    def fence(storage: Storage, epoch: int) -> None:
        """For workers: raise :class:`OutputBusy` if a driver newer than epoch ``epoch`` holds ``storage``."""
        if storage.exists(Lease._key(epoch + 1)):
            raise OutputBusy(f"{storage.uri}: a newer driver (epoch {epoch + 1}) holds this output; a worker of "
                             f"epoch {epoch} does not commit")

    def release(self) -> None:
        """Stop the heartbeat and mark this epoch released (a successor takes the lease at once). A storage error
        here is logged, never raised: it must not mask the error that ended the run (the ttl frees the lease)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.epoch is not None and not self.lost.is_set() and not self._superseded():
                self.storage.write_json(self._key(self.epoch), self._record(released=True))
        except OSError as exc:
            log.warning("could not release the lease on %s (it expires after %.0f s): %s", self.storage.uri,
                        self.ttl_s, exc)

    @contextmanager
    def held(self, wait_s: float = 0.0):
        self.acquire(wait_s)
        try:
            yield self
        finally:
            self.release()


def _dead_here(record: dict) -> bool:
    """The lease's driver ran on this host and its process is gone (a live or unknowable pid: not dead)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if record["pid"] == os.getpid():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. EPERM: the pid exists under another user
        return False
    return False


# ------------------------------------------------------------------------------------------------ helpers


def table_hash(table: pa.Table) -> str:
    """sha256 of a table's content (IPC bytes batch by batch, so memory stays bounded)."""
    import hashlib

    h = hashlib.sha256()
    for batch in table.to_batches(max_chunksize=256):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ shard readers


def parquet_shards(storage: Storage, table: str) -> list[str]:
    """Keys of the Parquet shards of one output table (``dataset`` | ``candidates`` | ``quarantine``), sorted.

    Only ``<table>/data/*.parquet`` counts (temporary files of a writer start with ``.``); [] when there are none.
    """
    return [f"{table}/data/{name}" for name in storage.list(f"{table}/data")
            if name.endswith(".parquet") and not name.startswith(".")]


def open_parquet(storage: Storage, rel: str) -> pq.ParquetFile:
    """``rel`` as a lazily read ``ParquetFile`` (use it in a ``with``).

    Pages are read through a 1 MiB buffer and nothing is pre-buffered, so ``iter_batches`` over an image column
    holds about one batch, not the whole column chunk.
    """
    return pq.ParquetFile(storage.fs.open_input_file(storage.path(rel)), buffer_size=1 << 20, pre_buffer=False)


def local_copy(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A local directory with the files of ``location``: the path itself when local; for a URI, a copy in the
    weights cache (``cache_dir``, else ``$CAFE_CACHE_DIR/weights``, else ``~/.cache/cafe/weights``), downloaded once.

    Model loaders read local directories (their libraries' layouts); trained weights may live on object storage
    (``train.output_dir: s3://…``). The copy is keyed by the URI and the listing (names, sizes, times), so new weights
    at the same URI get a new copy; it is downloaded into a temporary sibling and renamed, so a killed download
    is never mistaken for a complete one, and concurrent actors on one node each end with a complete copy.
    """
    location = str(location)
    if not is_uri(location):
        return location
    src = Storage(location)
    sel = pafs.FileSelector(src.root, recursive=True, allow_not_found=True)
    files = sorted((i.path[len(src.root.rstrip("/")) + 1:], i.size, str(i.mtime_ns))
                   for i in src.fs.get_file_info(sel) if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"{location}: no files there")
    key = hashlib.sha256(json.dumps([location, files]).encode()).hexdigest()[:24]
    root = Path(cache_dir or os.environ.get("CAFE_CACHE_DIR") or Path.home() / ".cache" / "cafe") / "weights"
    dest = root / key
    if (dest / ".complete").is_file():
        return str(dest)
    tmp = root / f".{key}{TMP_INFIX}{uuid.uuid4().hex[:8]}"
    for rel, _, _ in files:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes(rel))
    (tmp / ".complete").write_text(location + "\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished the same copy first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / ".complete").is_file():
            raise
    return str(dest)
