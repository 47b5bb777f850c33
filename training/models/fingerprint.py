"""Model-directory fingerprints, without importing torch or any model library (the build's driver uses this)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fingerprint(directory: str | os.PathLike) -> str:
    """sha256 over every config/weights/tokenizer file (name, size, content).

    Files up to 64 MiB are hashed whole; larger ones by their size plus the first, middle and last MiB,
    so fingerprinting paper-scale weights stays fast (it identifies a checkpoint, it is not an integrity check).
    """
    h = hashlib.sha256()
    root = Path(directory)
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root)}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
            else:
                for off in (0, size // 2, size - (1 << 20)):
                    f.seek(off)
                    h.update(f.read(1 << 20))
    return h.hexdigest()[:16]
