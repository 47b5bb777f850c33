"""Dialogue synthesis for the CAFE dataset build (SPEC §1.5, decision D4).

Usage::

    backend = make_backend(cfg.build.dialogue, components=None)
    requests = [DialogueRequest(rid, cls, phrase, choose_style(rid, cfg.build.dialogue.styles)) for ...]
    results = backend.generate(requests)  # same order; ``result.reason`` set => quarantine the row

Every row gets one JSON object ``{"user": ..., "assistant": ...}``: the user's input text (a clear
instruction, an ambiguous request or a question about "this {class}") and the assistant's response
(an explanation/elaboration of what it generated). The paper's prompt is lost (D4); ``DIALOGUE_PROMPT``
is ours. Whatever the backend, its text goes through :func:`parse_dialogue`, so one set of rules
decides what is accepted and every rejection carries a reason code.

Backends share one interface (:class:`DialogueBackend`): :class:`TemplateBackend` (rule-based,
deterministic, no model), :class:`OpenAIBackend` (any OpenAI-compatible chat-completions server,
standard library only) and :class:`TransformersBackend` (a local causal LM with a chat template).
This module does not import Ray; a Ray Data stage wraps a backend elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Callable, Protocol, runtime_checkable

from pipeline.build_config import DialogueConfig, OpenAIBackendConfig, TransformersBackendConfig

__all__ = [
    "STYLES",
    "DIALOGUE_PROMPT",
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
#: Backends add their own: ``http_<code>`` (429/5xx after retries), ``http_4xx:<code>`` (not retried),
#: ``timeout``, ``connection_error``, ``malformed_response`` (:class:`OpenAIBackend`).
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
    "http_<code>",
    "http_4xx:<code>",
    "timeout",
    "connection_error",
    "malformed_response",
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
        reason: ``None`` on success; otherwise the quarantine reason (see :data:`REASON_CODES`).
        attempts: how many generations/HTTP calls were made for this row.
        raw: the last raw model text (or response body on HTTP/format errors, truncated), for audit.
    """

    row_id: str
    user: str | None
    assistant: str | None
    reason: str | None
    attempts: int
    raw: str | None

    @property
    def ok(self) -> bool:
        """Whether the row has a valid dialogue."""
        return self.reason is None


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

_USER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "clear": (
        "Generate an image of this {class_name} {phrase}.",
        "Please create a picture of this {class_name} {phrase}.",
        "Show this {class_name} {phrase}, keeping its look the same.",
    ),
    "ambiguous": (
        "Something with this {class_name} {phrase} would be nice.",
        "Maybe this {class_name}, {phrase}? Whatever you think works.",
        "I have this {class_name} here... {phrase}, I guess.",
    ),
    "question": (
        "Can you generate an image for this {class_name} {phrase}?",
        "What would this {class_name} look like {phrase}?",
        "Could you show me this {class_name} {phrase}?",
    ),
}

_ASSISTANT_TEMPLATES: tuple[str, ...] = (
    "Here is the {class_name} {phrase}. I kept the identity and distinctive features of your "
    "{class_name} while applying the change.",
    "I generated an image of this {class_name} {phrase}, preserving its appearance from your photo.",
    "This image shows the same {class_name} {phrase}: its key features match the reference, and the "
    "rest follows your request.",
)


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
            users = _USER_TEMPLATES[req.style]
            user = users[_stable_int("user", req.row_id) % len(users)]
            assistant = _ASSISTANT_TEMPLATES[_stable_int("assistant", req.row_id) % len(_ASSISTANT_TEMPLATES)]
            fields = {"class_name": req.class_name, "phrase": req.phrase}
            raw = json.dumps({"user": user.format(**fields), "assistant": assistant.format(**fields)})
            parsed, reason = parse_dialogue(raw, req.class_name, req.phrase, self.max_chars)
            results.append(_result(req, raw, parsed, reason, attempts=1))
        return results


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible backend
# ---------------------------------------------------------------------------------------------------

_RAW_LIMIT = 4000  # characters of a response body kept on a failed result


class OpenAIBackend:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, ...), standard library only.

    Requests run on a thread pool of ``max_concurrency`` workers. Each row is retried up to
    ``max_retries`` times with back-off ``backoff_s * 2**attempt`` (+ up to 10 % deterministic jitter)
    on connection errors, timeouts, HTTP 429/5xx, malformed response bodies and content that fails
    :func:`parse_dialogue`; other HTTP 4xx are not retried (reason ``http_4xx:<code>``). The API key is
    read once from the environment variable named by ``api_key_env`` and sent as a bearer token (no
    header when unset); it is never logged. ``timeout_s`` bounds each blocking socket operation
    (connect, and each read), as urllib does.

    Args:
        cfg: endpoint, model and retry settings.
        max_chars: per-field length limit passed to :func:`parse_dialogue`.
        sleep: the function used to wait between attempts (``time.sleep``).
    """

    def __init__(self, cfg: OpenAIBackendConfig, max_chars: int, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.max_chars = max_chars
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._sleep = sleep
        self._api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None

    def __repr__(self) -> str:
        return f"OpenAIBackend(url={self.url!r}, model={self.cfg.model!r})"

    def generate(self, requests: list[DialogueRequest]) -> list[DialogueResult]:
        """Dialogue for each request, in request order; at most ``max_concurrency`` calls in flight.

        Raises:
            ValueError: a request names an unknown style.
        """
        for req in requests:
            _check_style(req.style)
        if not requests:
            return []
        workers = min(self.cfg.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dialogue-openai") as pool:
            return list(pool.map(self._generate_one, requests))

    def _generate_one(self, req: DialogueRequest) -> DialogueResult:
        reason: str | None = None
        raw: str | None = None
        attempts = 0
        for attempt in range(self.cfg.max_retries + 1):
            attempts = attempt + 1
            raw, parsed, reason, retryable = self._attempt(req)
            if reason is None:
                return _result(req, raw, parsed, None, attempts)
            if not retryable or attempt == self.cfg.max_retries:
                break
            jitter = 0.1 * (_stable_int("jitter", req.row_id, str(attempt)) % 1000) / 1000.0
            delay = self.cfg.backoff_s * (2**attempt) * (1.0 + jitter)
            logger.debug("dialogue row %s attempt %d failed (%s); retrying in %.3fs", req.row_id, attempts, reason, delay)
            self._sleep(delay)
        return _result(req, raw, None, reason, attempts)

    def _attempt(self, req: DialogueRequest) -> tuple[str | None, dict[str, str] | None, str | None, bool]:
        """One HTTP call. Returns ``(raw, parsed, reason, retryable)``."""
        payload = {
            "model": self.cfg.model,
            "messages": build_messages(req.class_name, req.phrase, req.style),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            "response_format": {"type": "json_object"},
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        http_req = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http_req, timeout=self.cfg.timeout_s) as resp:
                body = resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as err:
            code = err.code
            body = _read_error_body(err)
            if code == 429 or code >= 500:
                return body, None, f"http_{code}", True
            if 400 <= code < 500:
                return body, None, f"http_4xx:{code}", False
            return body, None, f"http_{code}", False
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                return None, None, "timeout", True
            return None, None, "connection_error", True
        except (TimeoutError, socket.timeout):
            return None, None, "timeout", True
        except (OSError, HTTPException):  # resets, refused, truncated/invalid HTTP
            return None, None, "connection_error", True

        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            return body[:_RAW_LIMIT], None, "malformed_response", True
        if not isinstance(content, str):
            return body[:_RAW_LIMIT], None, "malformed_response", True
        parsed, reason = parse_dialogue(content, req.class_name, req.phrase, self.max_chars)
        return content, parsed, reason, reason is not None


def _read_error_body(err: urllib.error.HTTPError) -> str | None:
    try:
        return err.read().decode("utf-8", errors="replace")[:_RAW_LIMIT]
    except Exception:  # the body of an error response is best-effort audit data only
        return None
    finally:
        err.close()


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
        ValueError: ``transformers`` without components.
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
