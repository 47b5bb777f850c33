"""The one stable-hash helper of the project: source ids, row ids and seeds derived from text.

Usage::

    sid = source_id("file", "cat/001.png")          # 16 hex characters
    seed = stable_int("row", run_seed, rid)         # 0 <= seed < 2**31
    rid = row_id(round_, sid, "on the beach")

Every id is ``sha256("|".join(map(str, parts)))``, never Python's ``hash`` (salted per process). Text is
encoded as UTF-8 with ``surrogateescape``, so a file name that is not UTF-8 (which Python decodes to lone
surrogates) hashes as its raw bytes instead of raising; for every other input the result is the plain
UTF-8 hash. These functions define the ids and seeds of built datasets: changing them changes every
dataset built afterwards.
"""
from __future__ import annotations

import hashlib

__all__ = ["row_id", "source_id", "stable_hash", "stable_int"]


def _digest(parts: tuple[object, ...]) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode("utf-8", "surrogateescape")).digest()


def stable_hash(*parts: object) -> str:
    """sha256 hex digest (64 characters) of ``"|".join(map(str, parts))``."""
    return _digest(parts).hex()


def source_id(*parts: object) -> str:
    """A source's id: the first 16 hex characters of :func:`stable_hash`."""
    return stable_hash(*parts)[:16]


def stable_int(*parts: object, bits: int = 31) -> int:
    """Deterministic non-negative int below ``2**bits``: the digest's first 8 bytes, big-endian, masked."""
    return int.from_bytes(_digest(parts)[:8], "big") & ((1 << bits) - 1)


def row_id(round_: int, source_id: str, phrase: str) -> str:
    """A dataset row's id: 16 hex characters of ``sha256(f"{round_}|{source_id}|{phrase}")``."""
    return stable_hash(round_, source_id, phrase)[:16]
