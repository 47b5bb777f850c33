"""Secret redaction and reproducible error details for text that the build stores or logs.

Usage::

    from pipeline.redact import redact, secret_values_from_env, stable_detail

    secrets = [api_key, *secret_values_from_env()]
    detail = stable_detail(redact(error_body, secrets))  # safe to store in a quarantine row or a log line

:func:`redact` removes credentials by shape (``Authorization:`` header values, ``Bearer <token>``,
``api_key=...``-style assignments, ``sk-...`` keys, AWS key ids, passwords in URLs) and by value (every
literal secret passed in, also in its JSON-escaped and URL-encoded forms). :func:`stable_detail` removes
what differs between two identical runs (object addresses, UUIDs and request ids, timestamps,
measured durations), so that a quarantine ``detail`` is reproducible.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping

__all__ = ["REDACTED", "redact", "secret_values_from_env", "stable_detail"]

REDACTED = "[REDACTED]"

#: Environment variable names whose values are treated as secrets (matched case-insensitively).
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

# Each pattern keeps group 1 (the label) and replaces the rest of the match with REDACTED.
_PATTERNS: tuple[re.Pattern[str], ...] = (
    # Authorization: Bearer abc / "authorization": "Basic abc" / 'Authorization': 'abc'
    re.compile(
        r"""(\b(?:proxy-)?authorization\b["']?\s*[:=]\s*["']?(?:(?:bearer|basic|token|digest)\s+)?)"""
        r"""(?!\[REDACTED\]|(?:bearer|basic|token|digest)\s)[^\s"',;}\]]+""",
        re.IGNORECASE,
    ),
    # a bare bearer token: "Bearer abc.def-ghi"
    re.compile(r"(\b[Bb]earer\s+)[A-Za-z0-9\-._~+/]{8,}=*"),
    # api_key=..., "x-api-key": "...", aws_secret_access_key = ..., password: ..., "access_token": "..."
    # The name must end in the secret word, so "max_tokens": 256 is left alone.
    re.compile(
        r"""(\b[\w.-]*(?:api[_-]?key|access[_-]?key|secret|password|passwd|token)["']?\s*[:=]\s*["']?)"""
        r"""(?!\[REDACTED\])[^\s"',;&}\]]+""",
        re.IGNORECASE,
    ),
    # user:password@ in a URL
    re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+(?=@)", re.IGNORECASE),
)
_KEY_SHAPES: tuple[re.Pattern[str], ...] = (
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),  # OpenAI-style secret keys (sk-..., sk-proj-...)
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
)


def _literal_forms(secret: str) -> set[str]:
    """The secret as written, JSON-escaped (an echo inside a JSON body) and URL-encoded."""
    return {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}


def redact(text: str, secrets: Iterable[str] = (), *, shapes: bool = True) -> str:
    """``text`` with credentials replaced by ``[REDACTED]``.

    Literal ``secrets`` are replaced first (longest first, so a secret that contains another is
    removed whole), then credential shapes: ``Authorization:`` values, ``Bearer <token>`` (8+ token
    characters), ``<name>=<value>`` / ``"<name>": "<value>"`` where the name ends in ``api_key``,
    ``access_key``, ``secret``, ``password``, ``passwd`` or ``token``, ``sk-...`` keys, AWS access key
    ids and ``user:password@`` in URLs. Labels are kept (``Authorization: Bearer [REDACTED]``) so the
    text stays readable.

    Args:
        text: any text (a response body, an exception message, model output).
        secrets: literal values to remove wherever they appear; empty values are ignored.
        shapes: also remove credentials by shape (``False``: only the literal ``secrets``).

    Returns:
        The redacted text (``text`` itself when nothing matched).
    """
    forms: set[str] = set()
    for secret in secrets:
        if secret:
            forms |= _literal_forms(secret)
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, REDACTED)
    if not shapes:
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    for pattern in _KEY_SHAPES:
        text = pattern.sub(REDACTED, text)
    return text


def secret_values_from_env(environ: Mapping[str, str] | None = None, min_length: int = 8) -> list[str]:
    """Values of environment variables whose names look secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``,
    ``*PASSWORD*``, ``*PASSWD*``, ``*CREDENTIAL*``, any case).

    Values shorter than ``min_length`` are skipped: flags such as ``HF_HUB_DISABLE_TOKEN=1`` are not
    secrets, and redacting every ``1`` would destroy the text.

    Args:
        environ: the environment to read (``os.environ``).
        min_length: the shortest value returned.

    Returns:
        The distinct values, sorted (so the result does not depend on the environment's order).
    """
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= min_length})


_UNSTABLE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\s+at 0x[0-9a-fA-F]+"), ""),  # <Foo object at 0x7f3a...>
    (re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "0x?"),  # any other address-like hex number
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "[ID]"),
    (re.compile(r"\b(?:req|chatcmpl|cmpl)[-_][A-Za-z0-9-]{8,}"), "[ID]"),  # request / completion ids
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"), "[TIME]"),
    (re.compile(r"\b\d+\.\d+\s?(?:ms|s|sec|secs|seconds)\b"), "[DURATION]"),
)


def stable_detail(text: str) -> str:
    """``text`` without what differs between two identical runs.

    Removes `` at 0x...`` object addresses (other long hex numbers become ``0x?``) and replaces UUIDs
    and ``req-``/``chatcmpl-`` ids by ``[ID]``, ISO timestamps by ``[TIME]`` and measured durations
    (``1.25s``, ``30.0 ms``) by ``[DURATION]``.

    Args:
        text: an error message or response body.

    Returns:
        The text with those parts replaced.
    """
    for pattern, repl in _UNSTABLE:
        text = pattern.sub(repl, text)
    return text


def redact_obj(obj, secrets: Iterable[str] | None = None):
    """:func:`redact` every string inside a JSON-like object (manifests, job records); keys are kept."""
    secrets = list(secret_values_from_env()) if secrets is None else list(secrets)
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {k: redact_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, secrets) for v in obj]
    return obj
