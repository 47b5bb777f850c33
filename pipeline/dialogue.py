"""Dialogue synthesis for the CAFE dataset build (SPEC §1.5, decision D4).

Usage::

    backend = make_backend(cfg.build.dialogue, components=None)
    requests = [DialogueRequest(rid, cls, phrase, choose_style(rid, cfg.build.dialogue.styles)) for ...]
    results = backend.generate(requests)  # same order
    # result.ok: store user/assistant; result.reason: quarantine the row; result.pending: keep it pending

Every row gets one JSON object ``{"user": ..., "assistant": ...}``: the user's input text (a clear
instruction, an ambiguous request or a question about "this {class}") and the assistant's response
(an explanation/elaboration of what it generated). The paper's prompt is lost (D4); ``DIALOGUE_PROMPT``
is ours. Whatever the backend, its text goes through :func:`parse_dialogue`, so one set of rules
decides what is accepted and every rejection carries a reason code.

Backends share one interface (:class:`DialogueBackend`): :class:`TemplateBackend` (rule-based,
deterministic, no model), :class:`OpenAIBackend` (any OpenAI-compatible chat-completions server through
the ``openai`` SDK) and :class:`TransformersBackend` (a local causal LM with a chat template).
This module does not import Ray; a Ray Data stage wraps a backend elsewhere.

Every result is one of three outcomes:

- **ok** (``result.ok``): ``user``/``assistant`` hold the parsed dialogue.
- **quarantine** (``result.reason`` set): the *row* caused it, so asking again next run would not help.
  Reasons are the parser's (:data:`REASON_CODES`) after the content retries, ``malformed_response``
  (a 200 JSON body without ``choices[0].message``), ``secret_in_output`` (the answer contains a secret's
  value) and ``http_4xx:<code>`` for request errors the row causes (400, 413, 422 and other 4xx not
  listed below; not retried).
- **pending** (``result.pending``, ``reason`` is ``None``, ``result.error`` says why): the *endpoint or
  the operator* caused it; the caller keeps the row pending, so the next run asks again, and the build
  exits non-zero. Retried with back-off first: ``connection_error`` (refused, reset, DNS),
  ``timeout``, ``http_<code>`` for 5xx, 408, 409, 425 and 429, and ``unexpected_content_type`` (a 200
  that is not JSON, e.g. a proxy's HTML page). Not retried: ``http_401``, ``http_403`` (credentials),
  ``http_404``, ``http_405``, ``http_407`` (URL, model name or proxy). Once one row of a batch ends
  pending, rows of that batch not yet started are left pending without a call (``attempts == 0``).

Each row gets at most ``max_retries`` retries: a bad answer (parser, ``malformed_response``) is asked
again at once, an endpoint failure after ``backoff_s * 2**attempt`` (+ up to 10 % jitter, or the
server's ``Retry-After`` when longer). When a row's attempts mix outcomes, the last attempt decides. Texts kept on a result (``raw``) are
redacted (:mod:`pipeline.redact`); error texts are also made run-independent (``stable_detail``).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pipeline.build_config import DialogueConfig, OpenAIBackendConfig, TransformersBackendConfig
from pipeline.redact import redact, secret_values_from_env, stable_detail
from training.data.dialogue_templates import ASSISTANT_TEMPLATES, USER_TEMPLATES

__all__ = [
    "STYLES",
    "DIALOGUE_PROMPT",
    "DIALOGUE_JSON_SCHEMA",
    "STYLE_INSTRUCTIONS",
    "REASON_CODES",
    "DialogueRequest",
    "DialogueResult",
    "DialogueBackend",
    "TemplateBackend",
    "OpenAIBackend",
    "TransformersBackend",
    "build_messages",
    "choose_style",
    "parse_dialogue",
    "make_backend",
]

logger = logging.getLogger(__name__)

STYLES: tuple[str, ...] = ("clear", "ambiguous", "question")
FIELDS: tuple[str, ...] = ("user", "assistant")

# ---------------------------------------------------------------------------------------------------
# Prompt (D4)
# ---------------------------------------------------------------------------------------------------

#: D4 prompt. ``system`` is sent as is; ``user`` is formatted with ``class_name``, ``phrase`` and
#: ``style_instruction`` (one of :data:`STYLE_INSTRUCTIONS`). Kept short: local models may have small
#: context windows, and every extra token is paid once per row.
DIALOGUE_PROMPT: dict[str, str] = {
    "system": (
        "You write training dialogues for an image-editing assistant. Reply with one JSON object "
        'and nothing else: {"user": "...", "assistant": "..."}. No markdown, no other keys.'
    ),
    "user": (
        "Photo subject: {class_name}. Requested change: {phrase}.\n"
        'Write "user": the user asks the assistant to generate an image of this {class_name}, '
        '{style_instruction} It must contain the words "this {class_name}".\n'
        'Write "assistant": one or two sentences explaining what it generated and how the image '
        "keeps this {class_name} while applying the change."
    ),
}

#: How the user's text should read for each style (appended to the user message).
STYLE_INSTRUCTIONS: dict[str, str] = {
    "clear": "as a clear, direct instruction that states the change.",
    "ambiguous": "as a vague, casual request that only hints at the change.",
    "question": "as a question (ending with '?') that mentions the change.",
}


def build_messages(class_name: str, phrase: str, style: str) -> list[dict[str, str]]:
    """Chat messages (OpenAI format) asking for one dialogue in ``style``.

    Args:
        class_name: the class noun of the source image, e.g. ``"person"``.
        phrase: the instruction phrase, e.g. ``"wearing a red hat"``.
        style: one of :data:`STYLES`.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]``.

    Raises:
        ValueError: ``style`` is not one of :data:`STYLES`.
    """
    _check_style(style)
    user = DIALOGUE_PROMPT["user"].format(
        class_name=class_name, phrase=phrase, style_instruction=STYLE_INSTRUCTIONS[style]
    )
    return [{"role": "system", "content": DIALOGUE_PROMPT["system"]}, {"role": "user", "content": user}]


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"dialogue style {style!r} is not allowed; allowed: {list(STYLES)}")


def _stable_int(*parts: str) -> int:
    """A process-independent 64-bit integer from strings (unlike ``hash()``, not salted per process)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def choose_style(row_id: str, styles: list[str]) -> str:
    """The dialogue style of a row: a deterministic function of ``row_id`` (sha256, not ``hash()``).

    Args:
        row_id: the row's stable id.
        styles: the configured styles (``DialogueConfig.styles``), each one of :data:`STYLES`.

    Returns:
        One element of ``styles``.

    Raises:
        ValueError: ``styles`` is empty or names an unknown style.
    """
    if not styles:
        raise ValueError("dialogue.styles must name at least one style")
    for style in styles:
        _check_style(style)
    return styles[_stable_int("style", row_id) % len(styles)]


# ---------------------------------------------------------------------------------------------------
# Strict parsing
# ---------------------------------------------------------------------------------------------------

#: Every reason :func:`parse_dialogue` can return (``<field>`` is ``user`` or ``assistant``):
#:
#: - ``empty_output``: the text is empty or whitespace only.
#: - ``not_json``: after removing surrounding whitespace and one optional ```` ```json ```` fence, the
#:   text is not exactly one JSON value (prose around it, truncation, trailing text ...).
#: - ``not_an_object``: valid JSON, but not an object (a list, a string, a number ...).
#: - ``duplicate_field:<field>``: the object repeats a key (JSON would silently keep the last one).
#: - ``missing_field:<field>``: the object lacks a required key.
#: - ``extra_fields``: the object has keys other than ``user`` and ``assistant``.
#: - ``wrong_type:<field>``: the value is not a string.
#: - ``empty_field:<field>``: the value is empty or whitespace only.
#: - ``too_long:<field>``: the stripped value is longer than ``max_chars`` characters.
#: - ``template_leftover``: a value contains an unreplaced placeholder (``{class}``, ``{phrase}``,
#:   ``<class>``, ``<...>``), a chat-template marker (``[INST]``, ``<<SYS>>``, ``<|...|>``, ``</s>``)
#:   or a JSON key echo (``"user":`` / ``"assistant":`` inside a value).
#: - ``missing_class:user``: the user text does not mention the class noun (it must ask about
#:   "this {class}"; checked case-insensitively).
#:
#: :class:`OpenAIBackend` adds ``malformed_response``, ``secret_in_output`` and ``http_4xx:<code>``
#: (see the module docstring). Endpoint failures are not reasons: they leave the row pending.
REASON_CODES: tuple[str, ...] = (
    "empty_output",
    "not_json",
    "not_an_object",
    "duplicate_field:<field>",
    "missing_field:<field>",
    "extra_fields",
    "wrong_type:<field>",
    "empty_field:<field>",
    "too_long:<field>",
    "template_leftover",
    "missing_class:user",
    "malformed_response",
    "secret_in_output",
    "http_4xx:<code>",
)

_FENCE = re.compile(r"\A```(?:json)?(?P<body>.*?)```\Z", re.DOTALL | re.IGNORECASE)
_LEFTOVERS = (
    re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_ ]*\s*\}"),  # {class}, {phrase}, {class_name}
    re.compile(r"<\s*/?\s*[A-Za-z_|][^<>\n]{0,40}>"),  # <class>, <phrase>, </s>, <|assistant|>
    re.compile(r"\[/?INST\]|<<\s*/?SYS\s*>>", re.IGNORECASE),  # Llama-2 chat markers
    re.compile(r'"\s*(?:user|assistant)\s*"\s*:'),  # a key echoed inside a value
)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_dialogue(
    text: str, class_name: str, phrase: str, max_chars: int
) -> tuple[dict[str, str] | None, str | None]:
    """Strictly parse one model answer into ``{"user": ..., "assistant": ...}``.

    Accepted: exactly one JSON object with exactly the keys ``user`` and ``assistant`` (non-empty
    strings of at most ``max_chars`` characters each, no template leftovers, the class noun in the user
    text), optionally wrapped in one ```` ```json ```` (or bare ```` ``` ````) fence, with only
    whitespace around it. Everything else is rejected with one of :data:`REASON_CODES`. Checks run in
    the order listed there, except that type, emptiness and length are checked for ``user`` before
    ``assistant``; so exactly one, deterministic reason is reported.

    Args:
        text: the model's answer.
        class_name: the class noun the user text must mention.
        phrase: the instruction phrase. Not required verbatim (ambiguous requests paraphrase it); kept
            in the signature so all rules see the row's full context.
        max_chars: the largest allowed length of each stripped value.

    Returns:
        ``(parsed, None)`` with the stripped values, or ``(None, reason)``.
    """
    del phrase  # see Args
    if not isinstance(text, str) or not text.strip():
        return None, "empty_output"
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced is not None:
        body = fenced.group("body").strip()
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        # A duplicated non-dialogue key is reported as such too: the object is ambiguous either way.
        return None, f"duplicate_field:{dup.key}"
    except (json.JSONDecodeError, RecursionError):
        return None, "not_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    for name in FIELDS:
        if name not in obj:
            return None, f"missing_field:{name}"
    if set(obj) != set(FIELDS):
        return None, "extra_fields"
    values: dict[str, str] = {}
    for name in FIELDS:
        value = obj[name]
        if not isinstance(value, str):
            return None, f"wrong_type:{name}"
        value = value.strip()
        if not value:
            return None, f"empty_field:{name}"
        if len(value) > max_chars:
            return None, f"too_long:{name}"
        values[name] = value
    for name in FIELDS:
        if any(p.search(values[name]) for p in _LEFTOVERS):
            return None, "template_leftover"
    if class_name.strip().lower() not in values["user"].lower():
        return None, "missing_class:user"
    return values, None


# ---------------------------------------------------------------------------------------------------
# Requests, results, backend interface
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DialogueRequest:
    """One row to write dialogue for.

    Attributes:
        row_id: the row's stable id (drives template choice, seeds and jitter).
        class_name: class noun of the source image.
        phrase: instruction phrase.
        style: one of :data:`STYLES` (usually :func:`choose_style`).
    """

    row_id: str
    class_name: str
    phrase: str
    style: str


@dataclass(frozen=True)
class DialogueResult:
    """The outcome for one request.

    Attributes:
        row_id: the request's row id.
        user: the user's text, or ``None`` when rejected.
        assistant: the assistant's text, or ``None`` when rejected.
        reason: the quarantine reason (see :data:`REASON_CODES`); ``None`` when ok or pending.
        attempts: how many generations/HTTP calls were made for this row (0: not attempted).
        raw: the last raw model text, or the error text (response body, transport error) of the last
            attempt, redacted and truncated; for audit and the quarantine detail.
        pending: the endpoint or the operator's setup failed, not the row: keep the row pending (ask
            again next run) instead of quarantining it.
        error: why the row is pending (``connection_error``, ``timeout``, ``http_503`` ...), else ``None``.
    """

    row_id: str
    user: str | None
    assistant: str | None
    reason: str | None
    attempts: int
    raw: str | None
    pending: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the row has a valid dialogue."""
        return self.reason is None and not self.pending


def _result(req: DialogueRequest, raw: str | None, parsed: dict[str, str] | None, reason: str | None,
            attempts: int) -> DialogueResult:
    if parsed is None:
        return DialogueResult(req.row_id, None, None, reason, attempts, raw)
    return DialogueResult(req.row_id, parsed["user"], parsed["assistant"], None, attempts, raw)


@runtime_checkable
class DialogueBackend(Protocol):
    """Writes dialogue for a batch of requests; results come back in request order."""

    def generate(self, requests: list[DialogueRequest]) -> list[DialogueResult]:
        """Dialogue for each request (``reason`` set on the ones to quarantine)."""
        ...


# ---------------------------------------------------------------------------------------------------
# Template backend
# ---------------------------------------------------------------------------------------------------


class TemplateBackend:
    """Rule-based dialogue: several templates per style, picked by a hash of the row id.

    Deterministic and model-free (the default for tiny builds and tests). Output goes through
    :func:`parse_dialogue` like any model's, so e.g. ``max_chars`` still applies.

    Args:
        cfg: the dialogue config (``max_chars`` is used).
    """

    def __init__(self, cfg: DialogueConfig) -> None:
        self.max_chars = cfg.max_chars

    def generate(self, requests: list[DialogueRequest]) -> list[DialogueResult]:
        """Dialogue for each request, in order.

        Raises:
            ValueError: a request names an unknown style.
        """
        results = []
        for req in requests:
            _check_style(req.style)
            users = USER_TEMPLATES[req.style]
            user = users[_stable_int("user", req.row_id) % len(users)]
            assistant = ASSISTANT_TEMPLATES[_stable_int("assistant", req.row_id) % len(ASSISTANT_TEMPLATES)]
            fields = {"class_name": req.class_name, "phrase": req.phrase}
            raw = json.dumps({"user": user.format(**fields), "assistant": assistant.format(**fields)})
            parsed, reason = parse_dialogue(raw, req.class_name, req.phrase, self.max_chars)
            results.append(_result(req, raw, parsed, reason, attempts=1))
        return results


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible backend
# ---------------------------------------------------------------------------------------------------

_RAW_LIMIT = 4000  # characters of a response body kept on a result
_RETRY_AFTER_CAP_S = 60.0  # the longest server-requested wait (Retry-After) honoured between attempts

#: JSON schema of the answer, sent as ``response_format`` when ``OpenAIBackendConfig.json_schema`` is set
#: (servers with guided decoding, e.g. vLLM, then cannot produce anything else). The strict parser still
#: runs: the schema cannot express the length limit, the class-noun rule or template leftovers.
DIALOGUE_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"user": {"type": "string"}, "assistant": {"type": "string"}},
    "required": ["user", "assistant"],
    "additionalProperties": False,
}

#: HTTP statuses that say the endpoint, not the row, is at fault right now; retried with back-off.
_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})
#: HTTP statuses that say the operator's setup is wrong (credentials, URL, model name); not retried.
_OPERATOR_STATUS = frozenset({401, 403, 404, 405, 407})


@dataclass(frozen=True)
class _Attempt:
    """One call's outcome. ``kind``: ``ok``, ``content`` (row-caused, retried), ``row`` (row-caused, not
    retried), ``transient`` (endpoint, retried) or ``operator`` (setup, not retried)."""

    kind: str
    code: str | None
    raw: str | None
    parsed: dict[str, str] | None = None
    retry_after: float | None = None


class OpenAIBackend:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, OpenAI, ...) through the
    ``openai`` SDK's :class:`openai.AsyncOpenAI` client.

    Each :meth:`generate` call runs its requests concurrently on the backend's own event loop (a daemon
    thread started in ``__init__``), at most ``max_concurrency`` in flight. The SDK's own retries are
    off (``max_retries=0``): this class retries, so that bad answers and endpoint failures share one
    attempt budget (``max_retries`` retries per row) and one deterministic schedule. See the module
    docstring for which outcomes retry, quarantine or leave the row pending.

    The API key is read once, here, from the variable named by ``api_key_env``; no key (and no
    ``Authorization`` header, whatever ``OPENAI_API_KEY`` says) when ``api_key_env`` is null. Every
    stored or logged text goes through :func:`pipeline.redact.redact` with the key and the values of
    secret-looking environment variables; ``repr()`` shows neither.

    Args:
        cfg: endpoint, model and retry settings.
        max_chars: per-field length limit passed to :func:`parse_dialogue`.
        sleep: awaited to wait between attempts (``asyncio.sleep``).

    Raises:
        ValueError: ``api_key_env`` names a variable that is unset or empty.
    """

    def __init__(self, cfg: OpenAIBackendConfig, max_chars: int,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        import openai

        self.cfg = cfg
        self.max_chars = max_chars
        self._sleep = sleep
        api_key = _read_api_key(cfg.api_key_env)
        self._secrets = tuple(s for s in (api_key,) if s) + tuple(secret_values_from_env())
        if cfg.json_schema:
            self._response_format: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": "dialogue", "strict": True, "schema": DIALOGUE_JSON_SCHEMA},
            }
        else:
            self._response_format = {"type": "json_object"}
        # No key: the SDK insists on one, so it gets a placeholder and each request drops the header.
        self._extra_headers: dict[str, Any] = {} if api_key else {"Authorization": _omit()}
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "unused",
            base_url=cfg.base_url,
            timeout=cfg.timeout_s,  # each of connect / read / write / pool
            max_retries=0,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="dialogue-openai-loop", daemon=True)
        self._thread.start()
        # a backend dropped without close() still stops its loop thread
        weakref.finalize(self, _stop_loop, self._loop)

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={redact(self.cfg.base_url, self._secrets)!r}, model={self.cfg.model!r})"

    def close(self) -> None:
        """Close the HTTP client and stop the event loop. The backend cannot be used afterwards."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()  # the thread closes the loop

    def generate(self, requests: list[DialogueRequest]) -> list[DialogueResult]:
        """Dialogue for each request, in request order; at most ``max_concurrency`` calls in flight.

        Raises:
            ValueError: a request names an unknown style.
        """
        for req in requests:
            _check_style(req.style)
        if not requests:
            return []
        future = asyncio.run_coroutine_threadsafe(self._generate_all(requests), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def _generate_all(self, requests: list[DialogueRequest]) -> list[DialogueResult]:
        semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
        halted: list[str] = []  # the error code of the first row left pending, if any

        async def one(req: DialogueRequest) -> DialogueResult:
            async with semaphore:
                if halted:  # the endpoint is down or refuses us: do not start more rows
                    detail = f"not attempted: an earlier row of the batch ended with {halted[0]}"
                    return DialogueResult(req.row_id, None, None, None, 0, detail, pending=True, error=halted[0])
                result = await self._generate_one(req)
                if result.pending and not halted:
                    halted.append(result.error or "pending")
                return result

        tasks = [asyncio.ensure_future(one(req)) for req in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _generate_one(self, req: DialogueRequest) -> DialogueResult:
        out = _Attempt("transient", "not_attempted", None)
        attempts = 0
        for attempt in range(self.cfg.max_retries + 1):
            attempts = attempt + 1
            out = await self._attempt(req)
            if out.kind == "ok":
                return _result(req, out.raw, out.parsed, None, attempts)
            if out.kind in ("row", "operator") or attempt == self.cfg.max_retries:
                break
            if out.kind == "transient":  # a bad answer from a healthy endpoint is asked again at once
                await self._sleep(self._delay(req, attempt, out.retry_after))
            logger.debug("dialogue row %s attempt %d failed (%s); retrying", req.row_id, attempts, out.code)
        if out.kind in ("transient", "operator"):
            logger.warning("dialogue row %s left pending after %d attempt(s): %s", req.row_id, attempts, out.code)
            return DialogueResult(req.row_id, None, None, None, attempts, out.raw, pending=True, error=out.code)
        return _result(req, out.raw, None, out.code, attempts)

    def _delay(self, req: DialogueRequest, attempt: int, retry_after: float | None) -> float:
        """``backoff_s * 2**attempt`` plus up to 10 % jitter (a hash of row id and attempt), or the
        server's ``Retry-After`` (capped) when that is longer."""
        jitter = 0.1 * (_stable_int("jitter", req.row_id, str(attempt)) % 1000) / 1000.0
        delay = self.cfg.backoff_s * (2**attempt) * (1.0 + jitter)
        if retry_after is not None:
            delay = max(delay, min(retry_after, _RETRY_AFTER_CAP_S))
        return delay

    async def _attempt(self, req: DialogueRequest) -> _Attempt:
        """One HTTP call, classified."""
        import openai

        try:
            response = await self._client.chat.completions.with_raw_response.create(
                model=self.cfg.model,
                messages=build_messages(req.class_name, req.phrase, req.style),
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
                response_format=self._response_format,
                extra_headers=self._extra_headers,
            )
        except openai.APITimeoutError as err:
            return _Attempt("transient", "timeout", self._detail(_describe(err)))
        except openai.APIConnectionError as err:
            return _Attempt("transient", "connection_error", self._detail(_describe(err)))
        except openai.APIStatusError as err:
            code, body = err.status_code, self._detail(f"HTTP {err.status_code}: {_body_text(err.response)}")
            if code in _TRANSIENT_STATUS or code >= 500:
                return _Attempt("transient", f"http_{code}", body, retry_after=_retry_after(err.response))
            if code in _OPERATOR_STATUS:
                return _Attempt("operator", f"http_{code}", body)
            return _Attempt("row", f"http_4xx:{code}", body)

        http = response.http_response
        body = _body_text(http)
        content_type = http.headers.get("content-type", "")
        if content_type and "json" not in content_type.lower():  # e.g. a proxy's HTML page: not the row's fault
            return _Attempt("transient", "unexpected_content_type", self._detail(f"{content_type}: {body}"))
        content = _message_content(body)
        if content is _MALFORMED:
            return _Attempt("content", "malformed_response", self._detail(body))
        content = content or ""  # null content (e.g. a refusal): the model wrote no text
        if redact(content, self._secrets, shapes=False) != content:
            # the answer contains a secret's value: never stored, not even redacted in the dataset
            return _Attempt("content", "secret_in_output", redact(content, self._secrets))
        parsed, reason = parse_dialogue(content, req.class_name, req.phrase, self.max_chars)
        return _Attempt("ok" if parsed is not None else "content", reason, redact(content, self._secrets), parsed)

    def _detail(self, text: str) -> str:
        """Error text made safe to store: secrets redacted (before truncation, so no partial key
        survives), then run-dependent parts removed, then truncated."""
        return stable_detail(redact(text, self._secrets))[:_RAW_LIMIT]


_MALFORMED = object()


def _omit() -> Any:
    """The SDK's marker that drops a default header (public as ``openai.Omit`` in newer releases)."""
    import openai

    omit_cls = getattr(openai, "Omit", None)
    if omit_cls is None:
        from openai._types import Omit as omit_cls  # older releases export it only here
    return omit_cls()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)


def _message_content(body: str) -> Any:
    """``choices[0].message.content`` (``None`` when the model returned no text), or ``_MALFORMED``."""
    try:
        data = json.loads(body)
    except ValueError:
        return _MALFORMED
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return _MALFORMED
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return _MALFORMED
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return _MALFORMED
    return content


def _read_api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name, "")
    if not value.strip():
        raise ValueError(
            f"dialogue.openai.api_key_env={env_name!r}, but the environment variable {env_name} is unset or empty; "
            "export it, or set api_key_env to null for an endpoint without a key"
        )
    return value.strip()


def _body_text(response: Any) -> str:
    try:
        return response.text
    except Exception:  # the body is best-effort audit data only (e.g. undecodable bytes)
        return ""


def _retry_after(response: Any) -> float | None:
    """The ``Retry-After`` header in seconds (the HTTP-date form is ignored)."""
    try:
        value = float(response.headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def _describe(err: BaseException) -> str:
    """``Type: message`` of an exception and of its cause (the transport error under the SDK's)."""
    text = f"{type(err).__name__}: {err}"
    cause = err.__cause__
    if cause is not None:
        text += f" ({type(cause).__name__}: {cause})"
    return text


# ---------------------------------------------------------------------------------------------------
# Local transformers backend
# ---------------------------------------------------------------------------------------------------


class TransformersBackend:
    """A local causal LM with a chat template, batched with left padding.

    Each batch of ``batch_size`` requests is rendered with ``tokenizer.apply_chat_template``, generated
    with ``model.generate`` under ``torch.manual_seed(seed)`` (seed = hash of the batch's first row id,
    inside ``torch.random.fork_rng`` so the caller's RNG state is untouched), and only the new tokens
    are decoded and parsed. One attempt per row: a rejected row is quarantined with the parse reason.

    Args:
        cfg: generation settings.
        max_chars: per-field length limit passed to :func:`parse_dialogue`.
        components: an object with ``.model`` (a transformers causal LM) and ``.tokenizer`` (with a
            chat template).

    Raises:
        ValueError: ``components`` lacks a model or tokenizer, or the tokenizer has no chat template.
    """

    def __init__(self, cfg: TransformersBackendConfig, max_chars: int, components: Any) -> None:
        model = getattr(components, "model", None)
        tokenizer = getattr(components, "tokenizer", None)
        if model is None or tokenizer is None:
            raise ValueError("dialogue.backend='transformers' needs components with .model and .tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("dialogue.backend='transformers' needs a tokenizer with a chat_template")
        self.cfg = cfg
        self.max_chars = max_chars
        self.model = model
        self.tokenizer = tokenizer

    def generate(self, requests: list[DialogueRequest]) -> list[DialogueResult]:
        """Dialogue for each request, in request order.

        Raises:
            ValueError: a request names an unknown style.
        """
        for req in requests:
            _check_style(req.style)
        results: list[DialogueResult] = []
        for start in range(0, len(requests), self.cfg.batch_size):
            results.extend(self._generate_batch(requests[start : start + self.cfg.batch_size]))
        return results

    def _generate_batch(self, batch: list[DialogueRequest]) -> list[DialogueResult]:
        import torch

        tok = self.tokenizer
        prompts = [
            tok.apply_chat_template(build_messages(r.class_name, r.phrase, r.style), add_generation_prompt=True, tokenize=False)
            for r in batch
        ]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        side = tok.padding_side
        tok.padding_side = "left"  # new tokens start at the same column for every row
        try:
            # The chat template already writes any BOS it wants.
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        device = self.model.device
        enc = {k: v.to(device) for k, v in enc.items()}
        gen_kwargs: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens, "do_sample": self.cfg.do_sample, "pad_token_id": pad_id}
        if self.cfg.do_sample:
            gen_kwargs["temperature"] = self.cfg.temperature
        seed = _stable_int("dialogue-seed", batch[0].row_id) % (2**31)
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(**enc, **gen_kwargs)  # (B, L_prompt + new)
        new_tokens = out[:, enc["input_ids"].shape[1] :]  # (B, <= max_new_tokens)
        texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
        results = []
        for req, raw in zip(batch, texts):
            parsed, reason = parse_dialogue(raw, req.class_name, req.phrase, self.max_chars)
            results.append(_result(req, raw, parsed, reason, attempts=1))
        return results


def make_backend(cfg: DialogueConfig, components: Any = None) -> DialogueBackend:
    """The backend named by ``cfg.backend``.

    Args:
        cfg: the dialogue config.
        components: for ``transformers`` only, an object with ``.model`` and ``.tokenizer``.

    Returns:
        A :class:`DialogueBackend`.

    Raises:
        ValueError: ``transformers`` without components; ``openai`` whose ``api_key_env`` names an
            unset or empty variable.
    """
    if cfg.backend == "template":
        return TemplateBackend(cfg)
    if cfg.backend == "openai":
        return OpenAIBackend(cfg.openai, cfg.max_chars)
    if cfg.backend == "transformers":
        if components is None:
            raise ValueError("dialogue.backend='transformers' needs the 'dialogue' model components; got None")
        return TransformersBackend(cfg.transformers, cfg.max_chars, components)
    raise ValueError(f"dialogue.backend={cfg.backend!r} is not one of 'template', 'transformers', 'openai'")
