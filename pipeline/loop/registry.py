"""The model registry: every candidate the loop trains, its evidence, and which one serves.

Usage::

    reg = open_registry("outputs/tiny-loop/registry.sqlite")     # SQLite file, or
    reg = open_registry("s3://bucket/cafe/loop/registry")         # a log of decisions on any Storage location
    v = reg.register(checkpoint={...}, datasets=[...], config_hash="…", metrics={...}, sources="…", base=None)
    decision = reg.decide(v, gate)          # promotes when the gate passes, else records why not
    reg.current(); reg.list(); reg.promote(3); reg.rollback()

A version row: number, time, checkpoint (the exported weights), dataset versions, config hash, metrics, the
source snapshot it was built from, the version it was measured against (``base``), status (``candidate``,
``promoted``, ``rejected``, ``rolled_back``) and the reason. The **current** model is the most recently promoted
version that was not rolled back.

Two stores, one behaviour (the same tests run on both):

- :class:`SqliteRegistry` (a ``*.sqlite``/``*.db`` path): every decision runs in one ``BEGIN IMMEDIATE``
  transaction (SQLite's write lock). The file must be on a local or POSIX-locking file system.
- :class:`LogRegistry` (any other location: a directory, ``s3://…``): an append-only log of immutable decision
  objects ``log/<seq>.json``; the registry's state is the fold of the log. A decision is appended with a
  conditional create of the next sequence number (:meth:`pipeline.store.Storage.create`: ``If-None-Match`` on
  S3, a hard link locally); a writer that loses the race re-reads the log and decides again on the new state.
  No lock to expire, no clock to trust; the log is also the registry's audit trail.

Concurrency, both: a candidate is promoted only if the current model is still the one it was measured against
(a compare-and-swap), so of two ``cafe retrain`` racing from the same current model at most one is promoted.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    datasets TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    metrics TEXT NOT NULL,
    sources TEXT,
    base INTEGER,
    status TEXT NOT NULL,
    reason TEXT,
    promoted_seq INTEGER
);
"""


@dataclass
class Version:
    version: int
    created: str
    checkpoint: dict
    datasets: list
    config_hash: str
    metrics: dict
    sources: str | None
    base: int | None
    status: str
    reason: str | None
    promoted_seq: int | None

    @classmethod
    def of(cls, row) -> "Version":
        return cls(row[0], row[1], json.loads(row[2]), json.loads(row[3]), row[4], json.loads(row[5]), row[6],
                   row[7], row[8], row[9], row[10])


@dataclass
class Decision:
    version: int
    promoted: bool
    reason: str


def gate_check(candidate: dict, current: dict | None, metrics: list[str], tolerance: float) -> tuple[bool, str]:
    """Every gated metric of the candidate ≥ the current model's − tolerance (higher is better)."""
    if current is None:
        return True, "no current model: the first candidate is promoted"
    missing = [m for m in metrics if m not in candidate or m not in current]
    if missing:
        return False, f"metrics missing: {', '.join(missing)}"
    worse = [f"{m} {candidate[m]:.4f} < {current[m]:.4f} − {tolerance:g}" for m in metrics
             if candidate[m] < current[m] - tolerance]
    if worse:
        return False, "gate failed: " + "; ".join(worse)
    return True, "gate passed: " + ", ".join(f"{m} {candidate[m]:.4f} (current {current[m]:.4f})" for m in metrics)


def verdict(cand: Version, current: Version | None, metrics: list[str], tolerance: float) -> tuple[bool, str]:
    """The compare-and-swap and the gate: promote only if the current model is still the one ``cand`` was measured
    against (else ``stale``) and every gated metric passes against it."""
    if (current.version if current else None) != cand.base:
        return False, (f"stale: measured against version {cand.base}, but the current model is now version "
                       f"{current.version if current else None}")
    return gate_check(cand.metrics, current.metrics if current else None, metrics, tolerance)


class SqliteRegistry:
    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        db.execute("PRAGMA busy_timeout = %d" % int(self.timeout_s * 1000))
        return db

    # -- reading ---------------------------------------------------------------------------------------

    def list(self) -> list[Version]:
        with self._connect() as db:
            return [Version.of(r) for r in db.execute("SELECT * FROM versions ORDER BY version")]

    def get(self, version: int) -> Version:
        with self._connect() as db:
            row = db.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise ValueError(f"registry {self.path}: no version {version}")
        return Version.of(row)

    @staticmethod
    def _current(db) -> Version | None:
        row = db.execute("SELECT * FROM versions WHERE status = 'promoted' ORDER BY promoted_seq DESC LIMIT 1"
                         ).fetchone()
        return Version.of(row) if row else None

    def current(self) -> Version | None:
        with self._connect() as db:
            return self._current(db)

    def last_sources(self) -> str | None:
        """The source snapshot of the latest version (whatever its decision): what the last retrain consumed."""
        with self._connect() as db:
            row = db.execute("SELECT sources FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        return row[0] if row else None

    # -- writing ---------------------------------------------------------------------------------------

    def register(self, checkpoint: dict, datasets: list, config_hash: str, metrics: dict, sources: str | None,
                 base: int | None) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO versions (created, checkpoint, datasets, config_hash, metrics, sources, base, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'candidate')",
                (_now(), json.dumps(checkpoint, sort_keys=True), json.dumps(datasets), config_hash,
                 json.dumps(metrics, sort_keys=True), sources, base))
            return int(cur.lastrowid)

    def decide(self, version: int, metrics: list[str], tolerance: float) -> Decision:
        """Promote ``version`` if the gate passes against the current model and that model is still its base."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                cand = Version.of(db.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone())
                current = self._current(db)
                if cand.status != "candidate":
                    raise ValueError(f"version {version} is {cand.status}, not a candidate")
                ok, reason = verdict(cand, current, metrics, tolerance)
                self._set(db, version, "promoted" if ok else "rejected", reason)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Decision(version, ok, reason)

    def promote(self, version: int, reason: str = "promoted by hand") -> Version:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone() or _missing(version)
            self._set(db, version, "promoted", reason)
            db.execute("COMMIT")
        return self.get(version)

    def rollback(self) -> tuple[Version, Version | None]:
        """Retire the current model; the previously promoted version becomes current again."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            current = self._current(db)
            if current is None:
                db.execute("ROLLBACK")
                raise ValueError(f"registry {self.path}: no promoted version to roll back")
            db.execute("UPDATE versions SET status = 'rolled_back', reason = ? WHERE version = ?",
                       (f"rolled back at {_now()}", current.version))
            previous = self._current(db)
            db.execute("COMMIT")
        return current, previous

    @staticmethod
    def _set(db, version: int, status: str, reason: str) -> None:
        if status == "promoted":
            seq = db.execute("SELECT COALESCE(MAX(promoted_seq), 0) + 1 FROM versions").fetchone()[0]
            db.execute("UPDATE versions SET status = ?, reason = ?, promoted_seq = ? WHERE version = ?",
                       (status, reason, seq, version))
        else:
            db.execute("UPDATE versions SET status = ?, reason = ? WHERE version = ?", (status, reason, version))


class LogRegistry:
    """The registry as an append-only log of decisions on a :class:`~pipeline.store.Storage` location.

    Events (one immutable JSON object each, ``log/0000000001.json`` …): ``register`` (a new version with its
    evidence), ``decide`` (the gate's verdict), ``promote`` (by hand) and ``rollback``. The state — each version's
    status and reason, the current model — is their fold; events already read are cached (they never change), so
    a reader fetches only the new ones.
    """

    LOG = "log"

    def __init__(self, location: str | Path):
        from pipeline.store import Storage

        self.storage = Storage(str(location))
        self.path = self.storage.uri
        self._events: list[dict] = []

    # -- the log ---------------------------------------------------------------------------------------

    def _load(self) -> list[dict]:
        names = [n for n in self.storage.list(self.LOG) if n.endswith(".json") and not n.startswith(".")]
        for name in names[len(self._events):]:
            event = self.storage.read_json(f"{self.LOG}/{name}")
            if event is None or event.get("seq") != len(self._events) + 1:
                raise RuntimeError(f"registry {self.path}: log entry {name} is not entry {len(self._events) + 1}")
            self._events.append(event)
        return self._events

    @staticmethod
    def _fold(events: list[dict]) -> dict[int, Version]:
        versions: dict[int, Version] = {}
        for e in events:
            op, v = e["op"], e["version"]
            if op == "register":
                versions[v] = Version(v, e["time"], e["checkpoint"], e["datasets"], e["config_hash"], e["metrics"],
                                      e["sources"], e["base"], "candidate", None, None)
            elif op in ("decide", "promote"):
                versions[v].status, versions[v].reason = e["status"], e["reason"]
                if e["status"] == "promoted":
                    versions[v].promoted_seq = e["seq"]
            elif op == "rollback":
                versions[v].status, versions[v].reason = "rolled_back", e["reason"]
        return versions

    @staticmethod
    def _current_of(versions: dict[int, Version]) -> Version | None:
        live = [v for v in versions.values() if v.status == "promoted"]
        return max(live, key=lambda v: v.promoted_seq) if live else None

    def _append(self, make) -> tuple[dict, dict[int, Version]]:
        """``make(versions)`` → the next event, decided on the state it saw; appended only if no other writer
        appended first (else: re-read, decide again). Returns the event and the state it was decided on."""
        while True:
            events = self._load()
            versions = self._fold(events)
            event = {**make(versions), "seq": len(events) + 1, "time": _now()}
            if self.storage.create_json(f"{self.LOG}/{event['seq']:010d}.json", event):
                self._events.append(event)
                return event, versions
            log.debug("registry %s: entry %d taken by another writer; deciding again", self.path, event["seq"])

    # -- reading ---------------------------------------------------------------------------------------

    def list(self) -> list[Version]:
        return [v for _, v in sorted(self._fold(self._load()).items())]

    def get(self, version: int) -> Version:
        versions = self._fold(self._load())
        if version not in versions:
            raise ValueError(f"registry {self.path}: no version {version}")
        return versions[version]

    def current(self) -> Version | None:
        return self._current_of(self._fold(self._load()))

    def last_sources(self) -> str | None:
        versions = self.list()
        return versions[-1].sources if versions else None

    # -- writing ---------------------------------------------------------------------------------------

    def register(self, checkpoint: dict, datasets: list, config_hash: str, metrics: dict, sources: str | None,
                 base: int | None) -> int:
        event, _ = self._append(lambda versions: {
            "op": "register", "version": max(versions, default=0) + 1, "checkpoint": checkpoint,
            "datasets": list(datasets), "config_hash": config_hash, "metrics": metrics, "sources": sources,
            "base": base})
        return event["version"]

    def decide(self, version: int, metrics: list[str], tolerance: float) -> Decision:
        def make(versions):
            if version not in versions:
                raise ValueError(f"registry {self.path}: no version {version}")
            cand, current = versions[version], self._current_of(versions)
            if cand.status != "candidate":
                raise ValueError(f"version {version} is {cand.status}, not a candidate")
            ok, reason = verdict(cand, current, metrics, tolerance)
            return {"op": "decide", "version": version, "status": "promoted" if ok else "rejected", "reason": reason}

        event, _ = self._append(make)
        return Decision(version, event["status"] == "promoted", event["reason"])

    def promote(self, version: int, reason: str = "promoted by hand") -> Version:
        def make(versions):
            if version not in versions:
                _missing(version)
            return {"op": "promote", "version": version, "status": "promoted", "reason": reason}

        self._append(make)
        return self.get(version)

    def rollback(self) -> tuple[Version, Version | None]:
        def make(versions):
            current = self._current_of(versions)
            if current is None:
                raise ValueError(f"registry {self.path}: no promoted version to roll back")
            return {"op": "rollback", "version": current.version, "reason": f"rolled back at {_now()}"}

        event, _ = self._append(make)
        versions = self._fold(self._events)
        return versions[event["version"]], self._current_of(versions)


def open_registry(location: str | Path) -> SqliteRegistry | LogRegistry:
    """``*.sqlite`` / ``*.db`` on a file system → :class:`SqliteRegistry`; anything else (a directory, ``s3://…``)
    → :class:`LogRegistry`."""
    from pipeline.store import is_uri

    location = str(location)
    if location.endswith((".sqlite", ".db")):
        if is_uri(location) and not location.startswith("file://"):
            raise ValueError(f"registry {location}: SQLite needs a POSIX file system; on object storage name a "
                             "prefix instead (e.g. s3://bucket/cafe/registry): the registry is then a log of "
                             "decisions written with conditional creates")
        return SqliteRegistry(location.removeprefix("file://"))
    return LogRegistry(location)


def registry_location(cfg) -> str:
    """``pipeline.registry``; unset: ``<loop output>/registry.sqlite`` locally, ``<loop output>/registry`` (the
    log registry) when the loop's output is a URI."""
    from pipeline.loop.cafe import loop_output
    from pipeline.store import is_uri, join

    if cfg.pipeline.registry:
        return cfg.pipeline.registry
    out = loop_output(cfg)
    return join(out, "registry") if is_uri(out) else join(out, "registry.sqlite")


def _missing(version: int):
    raise ValueError(f"no version {version}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def format_versions(versions: list[Version], current: Version | None) -> str:
    lines = [f"{'version':>7}  {'status':11}  {'created':20}  {'metrics':40}  reason"]
    for v in versions:
        mark = "*" if current and v.version == current.version else " "
        m = ", ".join(f"{k}={val:.3f}" for k, val in sorted(v.metrics.items()) if k.startswith("assistant.")
                      and k.split(".")[1] in ("both", "identity", "instruction"))
        lines.append(f"{mark}{v.version:>6}  {v.status:11}  {v.created:20}  {m[:40]:40}  {v.reason or ''}")
    return "\n".join(lines)
