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

import re

import torch

#: RuntimeError messages that mean the device or its runtime failed, not the input. Case matters for the
#: acronyms ("HIP" as a word, so "relationship" does not count); "out of memory" matches any case.
_TRANSIENT_MESSAGE = re.compile(r"CUDA|CUDNN|cuDNN|NCCL|\bHIP\b|device-side assert|(?i:out of memory)")

_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t}
)


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
        if isinstance(exc, _OOM_TYPES + (MemoryError,)):
            return True
        if isinstance(exc, RuntimeError) and _TRANSIENT_MESSAGE.search(str(exc)):
            return True
        exc = exc.__cause__
    return False
