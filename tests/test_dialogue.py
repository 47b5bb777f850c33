"""Dialogue synthesis (SPEC §1.5, D4): strict parsing, the three backends, retry and concurrency rules."""
from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.build_config import DialogueConfig, OpenAIBackendConfig, TransformersBackendConfig
from pipeline.dialogue import (
    DIALOGUE_JSON_SCHEMA,
    DIALOGUE_PROMPT,
    STYLES,
    DialogueBackend,
    DialogueRequest,
    OpenAIBackend,
    TemplateBackend,
    TransformersBackend,
    build_messages,
    choose_style,
    make_backend,
    parse_dialogue,
)

GOOD = {"user": "Can you show this cat on the beach?", "assistant": "Here is your cat on the beach, same fur and eyes."}


def _parse(text: str, max_chars: int = 200) -> tuple[dict | None, str | None]:
    return parse_dialogue(text, "cat", "on the beach", max_chars)


# --------------------------------------------------------------------------------------------------
# Prompt and style
# --------------------------------------------------------------------------------------------------


def test_build_messages_fills_class_phrase_and_style() -> None:
    for style in STYLES:
        msgs = build_messages("dog", "wearing a red hat", style)
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert msgs[0]["content"] == DIALOGUE_PROMPT["system"]
        assert '"user"' in msgs[0]["content"] and '"assistant"' in msgs[0]["content"]
        user = msgs[1]["content"]
        assert '"this dog"' in user and "wearing a red hat" in user
        assert "{" not in user and "}" not in user  # every placeholder filled
    assert build_messages("dog", "x", "clear") != build_messages("dog", "x", "question")
    with pytest.raises(ValueError, match="style"):
        build_messages("dog", "x", "rude")


def test_choose_style_is_deterministic_and_covers_styles() -> None:
    styles = list(STYLES)
    picks = [choose_style(f"row-{i}", styles) for i in range(60)]
    assert picks == [choose_style(f"row-{i}", styles) for i in range(60)]
    assert set(picks) == set(styles)
    assert choose_style("row-1", ["question"]) == "question"
    with pytest.raises(ValueError):
        choose_style("row-1", [])
    with pytest.raises(ValueError):
        choose_style("row-1", ["clear", "shouting"])


def test_choose_style_does_not_use_salted_hash() -> None:
    import subprocess
    import sys

    code = "from pipeline.dialogue import choose_style; print([choose_style(f'r{i}', ['clear','ambiguous','question']) for i in range(20)])"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str([choose_style(f"r{i}", ["clear", "ambiguous", "question"]) for i in range(20)])


# --------------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------------


def test_parse_accepts_plain_and_fenced_and_strips() -> None:
    plain = json.dumps(GOOD)
    assert _parse(plain) == (GOOD, None)
    assert _parse("  \n" + plain + "\n\t ") == (GOOD, None)
    assert _parse("```json\n" + plain + "\n```") == (GOOD, None)
    assert _parse("\n```\n" + plain + "```\n") == (GOOD, None)
    assert _parse("```JSON " + plain + " ```") == (GOOD, None)
    padded = json.dumps({"user": "  " + GOOD["user"] + " ", "assistant": "\n" + GOOD["assistant"]})
    assert _parse(padded) == (GOOD, None)
    # class check is case-insensitive; non-ASCII survives
    parsed, reason = parse_dialogue('{"user": "Make this Cat café-style", "assistant": "Voilà."}', "cat", "x", 100)
    assert reason is None and parsed == {"user": "Make this Cat café-style", "assistant": "Voilà."}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty_output"),
        ("  \n ", "empty_output"),
        ("Sure! " + json.dumps(GOOD), "not_json"),
        (json.dumps(GOOD) + " Hope this helps.", "not_json"),
        ('{"user": "this cat", "assistant": "trunc', "not_json"),
        ("```python\n" + json.dumps(GOOD) + "\n```", "not_json"),
        ("[1, 2]", "not_an_object"),
        ('"just a string"', "not_an_object"),
        ('{"user": "this cat", "user": "this cat again", "assistant": "ok"}', "duplicate_field:user"),
        ('{"assistant": "ok"}', "missing_field:user"),
        ('{"user": "this cat"}', "missing_field:assistant"),
        ('{"user": "this cat", "assistant": "ok", "style": "clear"}', "extra_fields"),
        ('{"user": 3, "assistant": "ok"}', "wrong_type:user"),
        ('{"user": "this cat", "assistant": ["ok"]}', "wrong_type:assistant"),
        ('{"user": "this cat", "assistant": null}', "wrong_type:assistant"),
        ('{"user": "   ", "assistant": "ok"}', "empty_field:user"),
        ('{"user": "this cat", "assistant": ""}', "empty_field:assistant"),
        (json.dumps({"user": "this cat " + "a" * 200, "assistant": "ok"}), "too_long:user"),
        (json.dumps({"user": "this cat", "assistant": "b" * 201}), "too_long:assistant"),
        ('{"user": "Generate this {class} on the beach", "assistant": "ok"}', "template_leftover"),
        ('{"user": "this cat", "assistant": "Here it is {phrase}."}', "template_leftover"),
        ('{"user": "this cat <phrase>", "assistant": "ok"}', "template_leftover"),
        ('{"user": "[INST] this cat", "assistant": "ok"}', "template_leftover"),
        ('{"user": "this cat", "assistant": "ok </s>"}', "template_leftover"),
        ('{"user": "this cat", "assistant": "ok <|assistant|> more"}', "template_leftover"),
        ('{"user": "this cat", "assistant": "ok \\"user\\": again"}', "template_leftover"),
        ('{"user": "Generate this dog on the beach", "assistant": "ok"}', "missing_class:user"),
    ],
)
def test_parse_rejects_with_reason(text: str, reason: str) -> None:
    assert _parse(text) == (None, reason)


def test_parse_length_limit_is_inclusive_on_stripped_value() -> None:
    user = "this cat" + "x" * 12  # 20 chars
    assert _parse(json.dumps({"user": user + "   ", "assistant": "ok"}), max_chars=20)[1] is None
    assert _parse(json.dumps({"user": user + "y", "assistant": "ok"}), max_chars=20) == (None, "too_long:user")


# --------------------------------------------------------------------------------------------------
# Template backend
# --------------------------------------------------------------------------------------------------

PHRASES = ["in comic book style", "on the beach", "wearing a red hat"]


def _requests(n: int, styles: list[str] | None = None, classes: tuple[str, ...] = ("person", "cat")) -> list[DialogueRequest]:
    styles = styles or list(STYLES)
    return [
        DialogueRequest(f"row-{i:03d}", classes[i % len(classes)], PHRASES[i % len(PHRASES)], choose_style(f"row-{i:03d}", styles))
        for i in range(n)
    ]


def test_template_backend_valid_deterministic_every_style() -> None:
    backend = make_backend(DialogueConfig(backend="template"))
    assert isinstance(backend, TemplateBackend) and isinstance(backend, DialogueBackend)
    reqs = [DialogueRequest(f"r{i}-{s}", "person", p, s) for i in range(6) for s in STYLES for p in PHRASES]
    first = backend.generate(reqs)
    assert first == backend.generate(reqs)
    assert [r.row_id for r in first] == [q.row_id for q in reqs]
    users_by_style: dict[str, set[str]] = {s: set() for s in STYLES}
    for req, res in zip(reqs, first):
        assert res.reason is None and res.attempts == 1
        assert "this person" in res.user and req.phrase in res.user
        assert "person" in res.assistant and req.phrase in res.assistant
        assert parse_dialogue(res.raw, req.class_name, req.phrase, 600) == ({"user": res.user, "assistant": res.assistant}, None)
        if req.style == "question":
            assert res.user.endswith("?")
        users_by_style[req.style].add(res.user.replace(req.phrase, "<P>"))
    # several templates per style, chosen by row id
    assert all(len(v) >= 2 for v in users_by_style.values())
    assert users_by_style["clear"].isdisjoint(users_by_style["question"])


def test_template_backend_applies_parse_rules() -> None:
    backend = TemplateBackend(DialogueConfig(backend="template", max_chars=16))
    res = backend.generate([DialogueRequest("r0", "person", "on the beach", "clear")])[0]
    assert res.reason is not None and res.reason.startswith("too_long:")
    assert res.user is None and res.assistant is None and res.raw is not None
    with pytest.raises(ValueError, match="style"):
        backend.generate([DialogueRequest("r0", "person", "x", "loud")])


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible backend against a loopback server
# --------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def completion(content: str | None) -> Reply:
    return Reply(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode())


def good_reply(body: dict[str, Any]) -> Reply:
    """A valid dialogue that echoes the class/phrase the prompt asked about."""
    prompt = body["messages"][1]["content"]
    cls = prompt.split("Photo subject: ", 1)[1].split(".", 1)[0]
    return completion(json.dumps({"user": f"Please draw this {cls} nicely.", "assistant": f"Here is the {cls}."}))


@dataclass
class Call:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]
    raw_headers: str  # the request's header block as received


class StubServer:
    """A real HTTP server on 127.0.0.1 whose answers come from ``behaviour(call_index, call)``."""

    def __init__(self, behaviour: Callable[[int, Call], Reply]) -> None:
        self.behaviour = behaviour
        self.requests: list[Call] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                call = Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body, str(self.headers))
                with stub.lock:
                    index = len(stub.requests)
                    stub.requests.append(call)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    reply = stub.behaviour(index, call)
                    time.sleep(reply.delay)
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(reply.body)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[int, Call], Reply]], StubServer]]:
    servers: list[StubServer] = []

    def start(behaviour: Callable[[int, Call], Reply]) -> StubServer:
        servers.append(StubServer(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def backends() -> Iterator[list[OpenAIBackend]]:
    """Backends registered here are closed after the test (their event-loop thread and HTTP client)."""
    made: list[OpenAIBackend] = []
    yield made
    for b in made:
        b.close()


@pytest.fixture
def openai_backend(backends) -> Callable[..., OpenAIBackend]:
    def make(url: str, sleep: Callable[[float], Any] | None = None, **kw: Any) -> OpenAIBackend:
        args = {"base_url": url, "model": "tiny-chat", "max_retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **kw}
        extra = {} if sleep is None else {"sleep": sleep}
        backends.append(OpenAIBackend(OpenAIBackendConfig(**args), max_chars=600, **extra))
        return backends[-1]

    return make


def recorder() -> tuple[list[float], Callable[[float], Any]]:
    """An async ``sleep`` that records the delays and returns at once."""
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    return delays, sleep


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more: connection refused


REQ = DialogueRequest("row-a", "cat", "on the beach", "question")


def test_openai_good_answer_and_request_shape(serve, openai_backend, monkeypatch) -> None:
    monkeypatch.setenv("TEST_DIALOGUE_KEY", "sk-test-123")
    server = serve(lambda i, call: good_reply(call.body))
    backend = openai_backend(server.url, api_key_env="TEST_DIALOGUE_KEY", temperature=0.3, max_tokens=64)
    assert "sk-test" not in repr(backend) and "sk-test" not in repr(backend._client)
    [res] = backend.generate([REQ])
    assert (res.row_id, res.user, res.assistant, res.reason, res.attempts, res.pending, res.error) == (
        "row-a", "Please draw this cat nicely.", "Here is the cat.", None, 1, False, None)
    assert res.ok
    call = server.requests[0]
    assert call.path == "/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer sk-test-123"
    assert call.body == {
        "model": "tiny-chat",
        "messages": build_messages("cat", "on the beach", "question"),
        "temperature": 0.3,
        "max_tokens": 64,
        "response_format": {"type": "json_object"},
    }
    # the SDK's own retries are off: one call per attempt, counted by us
    assert call.headers.get("x-stainless-retry-count", "0") == "0"


def test_openai_json_schema_response_format(serve, openai_backend) -> None:
    server = serve(lambda i, call: good_reply(call.body))
    [res] = openai_backend(server.url, json_schema=True).generate([REQ])
    assert res.ok
    assert server.requests[0].body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "dialogue", "strict": True, "schema": DIALOGUE_JSON_SCHEMA},
    }
    assert DIALOGUE_JSON_SCHEMA["required"] == ["user", "assistant"]
    assert DIALOGUE_JSON_SCHEMA["additionalProperties"] is False


def test_openai_no_key_env_sends_no_header(serve, openai_backend, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-should-not-be-sent")
    server = serve(lambda i, call: good_reply(call.body))
    [res] = openai_backend(server.url, api_key_env=None).generate([REQ])
    assert res.ok
    assert "authorization" not in server.requests[0].headers
    assert "sk-ambient" not in server.requests[0].raw_headers


@pytest.mark.parametrize("value", [None, "", "  "])
def test_openai_missing_key_env_fails_at_setup(monkeypatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("TEST_DIALOGUE_KEY", raising=False)
    else:
        monkeypatch.setenv("TEST_DIALOGUE_KEY", value)
    cfg = DialogueConfig(backend="openai", openai=OpenAIBackendConfig(api_key_env="TEST_DIALOGUE_KEY"))
    with pytest.raises(ValueError, match="TEST_DIALOGUE_KEY") as err:
        make_backend(cfg)
    assert "api_key_env" in str(err.value)


def test_openai_retries_503_then_succeeds(serve, openai_backend) -> None:
    server = serve(lambda i, call: Reply(503, b"busy") if i < 2 else good_reply(call.body))
    [res] = openai_backend(server.url).generate([REQ])
    assert res.ok and res.attempts == 3 and res.user == "Please draw this cat nicely."
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [500, 503, 429])
def test_openai_endpoint_always_failing_leaves_rows_pending(serve, openai_backend, status: int) -> None:
    server = serve(lambda i, call: Reply(status, b'{"error": "overloaded"}'))
    [res] = openai_backend(server.url, max_retries=2).generate([REQ])
    assert (res.user, res.assistant, res.reason, res.attempts) == (None, None, None, 3)
    assert res.pending and res.error == f"http_{status}" and not res.ok
    assert res.raw == f'HTTP {status}: {{"error": "overloaded"}}'
    assert len(server.requests) == 3


def test_openai_connection_refused_is_pending(openai_backend) -> None:
    delays, sleep = recorder()
    reqs = [DialogueRequest(f"row-{i}", "cat", "on the beach", "clear") for i in range(4)]
    results = openai_backend(closed_port_url(), sleep=sleep, max_retries=2, max_concurrency=1).generate(reqs)
    assert [r.row_id for r in results] == [q.row_id for q in reqs]
    assert all(r.pending and r.reason is None and r.error == "connection_error" for r in results)
    # the first row used its retries; the endpoint is down, so the rest of the batch was not attempted
    assert [r.attempts for r in results] == [3, 0, 0, 0]
    assert len(delays) == 2
    assert "APIConnectionError" in results[0].raw and "0x" not in results[0].raw


def test_openai_429_is_retried(serve, openai_backend) -> None:
    server = serve(lambda i, call: Reply(429, b"slow down") if i == 0 else good_reply(call.body))
    [res] = openai_backend(server.url).generate([REQ])
    assert res.ok and res.attempts == 2


def test_openai_backoff_is_exponential_and_honours_retry_after(serve, openai_backend) -> None:
    server = serve(lambda i, call: Reply(502, b""))
    delays, sleep = recorder()
    [res] = openai_backend(server.url, sleep=sleep, max_retries=3, backoff_s=0.5).generate([REQ])
    assert res.pending and res.error == "http_502" and res.attempts == 4
    assert len(delays) == 3  # no sleep after the last attempt
    for attempt, d in enumerate(delays):
        assert 0.5 * 2**attempt <= d <= 0.5 * 2**attempt * 1.1
    # a longer Retry-After wins over the back-off (and is capped); a shorter one does not
    server2 = serve(lambda i, call: Reply(429, b"", headers={"Retry-After": "3"}) if i == 0 else good_reply(call.body))
    delays2, sleep2 = recorder()
    assert openai_backend(server2.url, sleep=sleep2, backoff_s=0.01).generate([REQ])[0].ok
    assert delays2 == [3.0]
    server3 = serve(lambda i, call: Reply(503, b"", headers={"Retry-After": "99999"}) if i == 0 else good_reply(call.body))
    delays3, sleep3 = recorder()
    assert openai_backend(server3.url, sleep=sleep3, backoff_s=0.01).generate([REQ])[0].ok
    assert delays3 == [60.0]


def test_openai_timeout_is_pending(serve, openai_backend) -> None:
    def slow(i: int, call: Call) -> Reply:
        reply = good_reply(call.body)
        reply.delay = 0.6
        return reply

    server = serve(slow)
    t0 = time.monotonic()
    [res] = openai_backend(server.url, timeout_s=0.2, max_retries=1).generate([REQ])
    assert (res.reason, res.attempts, res.user, res.pending, res.error) == (None, 2, None, True, "timeout")
    assert time.monotonic() - t0 < 1.2  # did not wait for the slow handler


def test_openai_malformed_body_is_a_content_failure(serve, openai_backend) -> None:
    server = serve(lambda i, call: Reply(200, b"<html>not json</html>"))
    delays, sleep = recorder()
    [res] = openai_backend(server.url, sleep=sleep, max_retries=1).generate([REQ])
    assert (res.reason, res.attempts, res.raw, res.pending) == ("malformed_response", 2, "<html>not json</html>", False)
    assert delays == []  # a bad answer is asked again at once
    server2 = serve(lambda i, call: Reply(200, b'{"choices": []}'))
    assert openai_backend(server2.url, max_retries=0).generate([REQ])[0].reason == "malformed_response"
    # null content (a refusal): the model wrote nothing
    server3 = serve(lambda i, call: completion(None))
    assert openai_backend(server3.url, max_retries=0).generate([REQ])[0].reason == "empty_output"


def test_openai_html_page_at_200_is_pending(serve, openai_backend) -> None:
    server = serve(lambda i, call: Reply(200, b"<html>please log in</html>", content_type="text/html"))
    [res] = openai_backend(server.url, max_retries=1).generate([REQ])
    assert (res.reason, res.pending, res.error, res.attempts) == (None, True, "unexpected_content_type", 2)


def test_openai_invalid_dialogue_is_retried_then_parse_reason(serve, openai_backend) -> None:
    server = serve(lambda i, call: completion('{"user": "draw it", "assistant": "done"}'))
    [res] = openai_backend(server.url, max_retries=2).generate([REQ])
    assert (res.reason, res.attempts, res.pending) == ("missing_class:user", 3, False)
    assert res.raw == '{"user": "draw it", "assistant": "done"}'
    # a bad first answer followed by a good one succeeds
    server2 = serve(lambda i, call: completion("Sure, here you go!") if i == 0 else good_reply(call.body))
    [res2] = openai_backend(server2.url).generate([REQ])
    assert res2.ok and res2.attempts == 2


def test_openai_last_attempt_decides(serve, openai_backend) -> None:
    # bad answers, then the endpoint goes down: not proven to be the row's fault -> pending
    server = serve(lambda i, call: completion("nope") if i < 2 else Reply(503, b""))
    [res] = openai_backend(server.url, max_retries=2).generate([REQ])
    assert (res.reason, res.pending, res.error) == (None, True, "http_503")
    # endpoint trouble, then bad answers -> quarantined with the parser's reason
    server2 = serve(lambda i, call: Reply(503, b"") if i < 2 else completion("nope"))
    [res2] = openai_backend(server2.url, max_retries=2).generate([REQ])
    assert (res2.reason, res2.pending, res2.error) == ("not_json", False, None)


@pytest.mark.parametrize("status", [400, 422])
def test_openai_row_4xx_quarantined_not_retried(serve, openai_backend, status: int) -> None:
    server = serve(lambda i, call: Reply(status, b'{"error": "bad request"}'))
    [res] = openai_backend(server.url, max_retries=5).generate([REQ])
    assert (res.reason, res.attempts, res.pending) == (f"http_4xx:{status}", 1, False)
    assert res.raw == f'HTTP {status}: {{"error": "bad request"}}'
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_openai_auth_and_url_errors_pending_not_retried(serve, openai_backend, status: int) -> None:
    server = serve(lambda i, call: Reply(status, b'{"error": "no"}'))
    reqs = [DialogueRequest(f"row-{i}", "cat", "on the beach", "clear") for i in range(3)]
    results = openai_backend(server.url, max_retries=5, max_concurrency=1).generate(reqs)
    assert all(r.pending and r.reason is None and r.error == f"http_{status}" for r in results)
    assert [r.attempts for r in results] == [1, 0, 0]
    assert len(server.requests) == 1


def test_openai_bounded_concurrency_and_order(serve, openai_backend) -> None:
    def behaviour(i: int, call: Call) -> Reply:
        reply = good_reply(call.body)
        reply.delay = 0.15
        return reply

    server = serve(behaviour)
    reqs = [DialogueRequest(f"row-{i}", f"class{i}", "on the beach", "clear") for i in range(6)]
    backend = openai_backend(server.url, max_concurrency=2)
    results = backend.generate(reqs)
    assert server.max_in_flight == 2
    assert [r.row_id for r in results] == [q.row_id for q in reqs]
    assert [r.user for r in results] == [f"Please draw this class{i} nicely." for i in range(6)]
    # the backend's event loop serves later batches too, and many requests run at once
    wide = openai_backend(server.url, max_concurrency=6)
    t0 = time.monotonic()
    assert all(r.ok for r in wide.generate(reqs))
    assert time.monotonic() - t0 < 0.15 * 6 * 0.75
    assert all(r.ok for r in backend.generate(reqs[:1]))


SENTINEL = "sentinel-KEY-5f3a9c2e71d4"


def test_openai_secret_never_stored_or_logged(serve, openai_backend, monkeypatch, caplog) -> None:
    """Error pages that echo the request headers (with the Authorization header) are redacted."""
    monkeypatch.setenv("TEST_DIALOGUE_KEY", SENTINEL)
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and the HTTP library's included

    def echo(status: int) -> Callable[[int, Call], Reply]:
        return lambda i, call: Reply(status, f"<pre>{call.raw_headers}</pre> object at 0x7f3a2b1c9d00".encode())

    def leak(i: int, call: Call) -> Reply:  # a server that puts the key into the model's answer
        key = call.headers["authorization"].split()[-1]
        return completion(json.dumps({"user": f"this cat {key}", "assistant": "ok"}))

    results = []
    for behaviour in (echo(400), echo(503), echo(401), leak):
        server = serve(behaviour)
        backend = openai_backend(server.url, api_key_env="TEST_DIALOGUE_KEY", max_retries=1)
        assert SENTINEL not in repr(backend) and SENTINEL not in repr(backend._client)
        [res] = backend.generate([REQ])
        assert server.requests[0].headers["authorization"] == f"Bearer {SENTINEL}"  # it was sent
        results.append(res)
    assert [(r.reason, r.error) for r in results] == [
        ("http_4xx:400", None), (None, "http_503"), (None, "http_401"), ("secret_in_output", None)]
    for res in results:
        for value in vars(res).values():
            assert SENTINEL not in str(value)
    assert "authorization: bearer [redacted]" in results[0].raw.lower()
    assert "[REDACTED]" in results[3].raw
    assert "0x7f3a" not in results[0].raw  # stable_detail
    assert caplog.records and SENTINEL not in caplog.text
    assert all(SENTINEL not in r.getMessage() for r in caplog.records)


def test_openai_error_detail_reproducible(serve, openai_backend) -> None:
    def noisy(i: int, call: Call) -> Reply:
        body = {"error": f"<Model object at 0x{id(call):x}> failed", "request_id": f"req-{uuid.uuid4().hex}",
                "trace": str(uuid.uuid4()), "time": "2025-03-04T05:06:07.123Z", "took": f"{time.monotonic():.3f}s"}
        return Reply(400, json.dumps(body).encode())

    server = serve(noisy)
    first = openai_backend(server.url).generate([REQ])[0]
    second = openai_backend(server.url).generate([REQ])[0]
    assert first.reason == "http_4xx:400" and first.raw == second.raw
    assert "0x" not in first.raw and "req-" not in first.raw and "2025" not in first.raw
    assert first == second


def test_make_backend_kinds() -> None:
    backend = make_backend(DialogueConfig(backend="openai"))
    assert isinstance(backend, OpenAIBackend)
    thread = backend._thread
    backend.close()
    backend.close()  # idempotent
    assert not thread.is_alive()
    # a backend dropped without close() stops its event-loop thread too
    dropped = make_backend(DialogueConfig(backend="openai"))
    thread = dropped._thread
    del dropped
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="components"):
        make_backend(DialogueConfig(backend="transformers"))


# --------------------------------------------------------------------------------------------------
# Transformers backend with a tiny real Llama
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm() -> SimpleNamespace:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a photo of a cat", '{"user": "x", "assistant": "y"}'] * 5
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    return SimpleNamespace(model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("do_sample", [False, True])
def test_transformers_backend_tiny_llama(tiny_llm, monkeypatch, do_sample: bool) -> None:
    import torch

    tokenizer, model = tiny_llm.tokenizer, tiny_llm.model
    max_new = 12
    reqs = _requests(5)
    prompt_lens = [
        len(tokenizer.apply_chat_template(build_messages(r.class_name, r.phrase, r.style), add_generation_prompt=True, tokenize=True)["input_ids"])
        for r in reqs
    ]
    assert max(prompt_lens) + max_new <= model.config.max_position_embeddings

    new_lengths: list[int] = []
    generate = model.generate

    def recording_generate(**kw: Any) -> torch.Tensor:  # the real model runs; only lengths are recorded
        out = generate(**kw)
        new_lengths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", recording_generate)
    cfg = DialogueConfig(backend="transformers", transformers=TransformersBackendConfig(max_new_tokens=max_new, batch_size=2, do_sample=do_sample))
    backend = make_backend(cfg, components=tiny_llm)
    assert isinstance(backend, TransformersBackend)

    rng_before = torch.get_rng_state()
    first = backend.generate(reqs)
    assert torch.equal(rng_before, torch.get_rng_state())  # caller's RNG untouched
    second = backend.generate(reqs)

    assert first == second  # deterministic
    assert [r.row_id for r in first] == [q.row_id for q in reqs]
    assert len(new_lengths) == 2 * 3  # 5 requests in batches of 2 -> 3 generate calls per run
    assert all(0 < n <= max_new for n in new_lengths)
    for req, res in zip(reqs, first):
        assert res.attempts == 1 and isinstance(res.raw, str)
        parsed, reason = parse_dialogue(res.raw, req.class_name, req.phrase, cfg.max_chars)
        assert res.reason == reason
        if reason is None:
            assert (res.user, res.assistant) == (parsed["user"], parsed["assistant"])
        else:
            assert res.user is None and res.assistant is None
    # the random tiny model writes noise: quarantined with a parse reason
    assert any(r.reason is not None for r in first)


def test_transformers_backend_decodes_only_new_tokens(tiny_llm) -> None:
    import torch

    tokenizer, model = tiny_llm.tokenizer, tiny_llm.model
    req = DialogueRequest("row-solo", "cat", "on the beach", "clear")
    cfg = TransformersBackendConfig(max_new_tokens=8, batch_size=1, do_sample=False)
    [res] = TransformersBackend(cfg, 600, tiny_llm).generate([req])
    # independent computation: greedy generation of the same single prompt
    prompt = tokenizer.apply_chat_template(build_messages("cat", "on the beach", "clear"), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert res.raw == expected
    assert "Photo subject" not in res.raw


def test_transformers_backend_requires_chat_template(tiny_llm) -> None:
    no_template = SimpleNamespace(model=tiny_llm.model, tokenizer=SimpleNamespace(chat_template=None))
    with pytest.raises(ValueError, match="chat_template"):
        TransformersBackend(TransformersBackendConfig(), 600, no_template)
