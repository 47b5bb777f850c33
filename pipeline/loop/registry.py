"""The model registry: every candidate the loop trains, its evidence, and which one serves (SQLite).

Usage::

    reg = Registry("outputs/tiny-loop/registry.sqlite")
    v = reg.register(checkpoint={...}, datasets=[...], config_hash="…", metrics={...}, sources="…", base=None)
    decision = reg.decide(v, gate)          # promotes when the gate passes, else records why not
    reg.current(); reg.list(); reg.promote(3); reg.rollback()

A version row: number, time, checkpoint (the exported weights), dataset versions, config hash, metrics, the
source snapshot it was built from, the version it was measured against (``base``), status (``candidate``,
``promoted``, ``rejected``, ``rolled_back``) and the reason. The **current** model is the most recently promoted
version that was not rolled back.

Concurrency: every decision runs in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock) and is a
compare-and-swap: a candidate is promoted only if the current model is still the one it was measured against, so
of two ``cafe retrain`` racing from the same current model at most one is promoted. The file must be on a local
or POSIX-locking file system (a shared volume); object-store registries are not supported yet.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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


class Registry:
    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        if "://" in str(path):
            raise ValueError(f"registry {path}: object-store registries are not supported yet; use a path on a "
                             "local or shared POSIX file system (pipeline.registry)")
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
                if (current.version if current else None) != cand.base:
                    ok, reason = False, (f"stale: measured against version {cand.base}, but the current model is "
                                         f"now version {current.version if current else None}")
                else:
                    ok, reason = gate_check(cand.metrics, current.metrics if current else None, metrics, tolerance)
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
