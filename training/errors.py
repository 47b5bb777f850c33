"""Failure classification: retry a device/resource failure, quarantine an input-caused one.

Usage::

    from training.errors import is_transient
    try:
        images = generator.sample(...)
    except (RuntimeError, ValueError, OSError) as exc:
        if is_transient(exc):
            raise          # let the stage retry the chunk (on a fresh worker)
        quarantine(rows, reason=f"{type(exc).__name__}: {exc}")
"""
from __future__ import annotations

import os

import re

import sys

#: RuntimeError messages that mean the device or its runtime failed, not the input. Case matters for the
#: acronyms ("HIP" as a word, so "relationship" does not count); "out of memory" matches any case.
_TRANSIENT_MESSAGE = re.compile(r"CUDA|CUDNN|cuDNN|NCCL|\bHIP\b|device-side assert|(?i:out of memory)")



def _oom_types() -> tuple[type[BaseException], ...]:
    """torch's out-of-memory types; none when torch was never imported (then no torch error can exist), so this
    module — and :class:`ModelLoadError` with it — imports without torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    return tuple({t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t})


def is_transient(exc: BaseException) -> bool:
    """True for device/resource failures worth a retry; False for input-caused errors (quarantine).

    Transient: ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError``, host ``MemoryError``, and a
    ``RuntimeError`` (``torch.AcceleratorError`` included) whose message names CUDA, cuDNN, NCCL, HIP, a
    device-side assert or "out of memory". An exception raised explicitly ``from`` such an error
    (``__cause__``) is transient too. Everything else — the ``ValueError`` of ProFusion's latent-size guard,
    image decode errors, non-finite outputs — is not: the same input would fail again.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _oom_types() + (MemoryError,)):
            return True
        if isinstance(exc, RuntimeError) and _TRANSIENT_MESSAGE.search(str(exc)):
            return True
        exc = exc.__cause__
    return False


class ModelLoadError(RuntimeError):
    """A model directory cannot be used: names the role, the path and what was expected."""

    def __init__(self, role: str, path: str | os.PathLike, problem: str):
        self.role, self.path, self.problem = role, str(path), problem
        super().__init__(f"model role '{role}' at {path}: {problem}")
