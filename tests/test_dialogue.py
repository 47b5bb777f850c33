"""Dialogue synthesis (SPEC §1.5, D4): strict parsing, the three backends, retry and concurrency rules."""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.build_config import DialogueConfig, OpenAIBackendConfig, TransformersBackendConfig
from pipeline.dialogue import (
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


def completion(content: str) -> Reply:
    return Reply(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode())


def good_reply(body: dict[str, Any]) -> Reply:
    """A valid dialogue that echoes the class/phrase the prompt asked about."""
    prompt = body["messages"][1]["content"]
    cls = prompt.split("Photo subject: ", 1)[1].split(".", 1)[0]
    return completion(json.dumps({"user": f"Please draw this {cls} nicely.", "assistant": f"Here is the {cls}."}))


class StubServer:
    """A real HTTP server on 127.0.0.1 whose answers come from ``behaviour(call_index, body)``."""

    def __init__(self, behaviour: Callable[[int, dict[str, Any]], Reply]) -> None:
        self.behaviour = behaviour
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    index = len(stub.requests)
                    stub.requests.append((self.path, dict(self.headers.items()), body))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    reply = stub.behaviour(index, body)
                    time.sleep(reply.delay)
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply.body)))
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
def serve() -> Iterator[Callable[[Callable[[int, dict[str, Any]], Reply]], StubServer]]:
    servers: list[StubServer] = []

    def start(behaviour: Callable[[int, dict[str, Any]], Reply]) -> StubServer:
        servers.append(StubServer(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _openai(server: StubServer, **kw: Any) -> OpenAIBackend:
    args = {"base_url": server.url, "model": "tiny-chat", "max_retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **kw}
    return OpenAIBackend(OpenAIBackendConfig(**args), max_chars=600)


REQ = DialogueRequest("row-a", "cat", "on the beach", "question")


def test_openai_good_answer_and_request_shape(serve, monkeypatch) -> None:
    monkeypatch.setenv("TEST_DIALOGUE_KEY", "sk-test-123")
    server = serve(lambda i, body: good_reply(body))
    backend = _openai(server, api_key_env="TEST_DIALOGUE_KEY", temperature=0.3, max_tokens=64)
    assert "sk-test" not in repr(backend)
    [res] = backend.generate([REQ])
    assert (res.row_id, res.user, res.assistant, res.reason, res.attempts) == (
        "row-a", "Please draw this cat nicely.", "Here is the cat.", None, 1)
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert body == {
        "model": "tiny-chat",
        "messages": build_messages("cat", "on the beach", "question"),
        "temperature": 0.3,
        "max_tokens": 64,
        "response_format": {"type": "json_object"},
    }


def test_openai_no_key_no_header(serve, monkeypatch) -> None:
    monkeypatch.delenv("TEST_DIALOGUE_KEY", raising=False)
    server = serve(lambda i, body: good_reply(body))
    [res] = _openai(server, api_key_env="TEST_DIALOGUE_KEY").generate([REQ])
    assert res.reason is None
    assert "Authorization" not in server.requests[0][1]


def test_openai_retries_503_then_succeeds(serve) -> None:
    server = serve(lambda i, body: Reply(503, b"busy") if i < 2 else good_reply(body))
    [res] = _openai(server).generate([REQ])
    assert res.reason is None and res.attempts == 3 and res.user == "Please draw this cat nicely."
    assert len(server.requests) == 3


def test_openai_always_500_quarantined_after_all_retries(serve) -> None:
    server = serve(lambda i, body: Reply(500, b'{"error": "boom"}'))
    [res] = _openai(server, max_retries=2).generate([REQ])
    assert (res.user, res.assistant, res.reason, res.attempts) == (None, None, "http_500", 3)
    assert len(server.requests) == 3


def test_openai_429_is_retried(serve) -> None:
    server = serve(lambda i, body: Reply(429, b"slow down") if i == 0 else good_reply(body))
    [res] = _openai(server).generate([REQ])
    assert res.reason is None and res.attempts == 2


def test_openai_backoff_is_exponential(serve) -> None:
    server = serve(lambda i, body: Reply(502, b""))
    delays: list[float] = []
    cfg = OpenAIBackendConfig(base_url=server.url, max_retries=3, backoff_s=0.5)
    [res] = OpenAIBackend(cfg, 600, sleep=delays.append).generate([REQ])
    assert res.reason == "http_502" and res.attempts == 4
    assert len(delays) == 3  # no sleep after the last attempt
    for attempt, d in enumerate(delays):
        assert 0.5 * 2**attempt <= d <= 0.5 * 2**attempt * 1.1


def test_openai_timeout(serve) -> None:
    def slow(i: int, body: dict[str, Any]) -> Reply:
        reply = good_reply(body)
        reply.delay = 0.6
        return reply

    server = serve(slow)
    t0 = time.monotonic()
    [res] = _openai(server, timeout_s=0.2, max_retries=1).generate([REQ])
    assert (res.reason, res.attempts, res.user) == ("timeout", 2, None)
    assert time.monotonic() - t0 < 1.2  # did not wait for the slow handler


def test_openai_malformed_body(serve) -> None:
    server = serve(lambda i, body: Reply(200, b"<html>not json</html>"))
    [res] = _openai(server, max_retries=1).generate([REQ])
    assert (res.reason, res.attempts, res.raw) == ("malformed_response", 2, "<html>not json</html>")
    server2 = serve(lambda i, body: Reply(200, b'{"choices": []}'))
    assert _openai(server2, max_retries=0).generate([REQ])[0].reason == "malformed_response"


def test_openai_invalid_dialogue_is_retried_then_parse_reason(serve) -> None:
    server = serve(lambda i, body: completion('{"user": "draw it", "assistant": "done"}'))
    [res] = _openai(server, max_retries=2).generate([REQ])
    assert (res.reason, res.attempts) == ("missing_class:user", 3)
    assert res.raw == '{"user": "draw it", "assistant": "done"}'
    # a bad first answer followed by a good one succeeds
    server2 = serve(lambda i, body: completion("Sure, here you go!") if i == 0 else good_reply(body))
    [res2] = _openai(server2).generate([REQ])
    assert res2.reason is None and res2.attempts == 2


def test_openai_400_not_retried(serve) -> None:
    server = serve(lambda i, body: Reply(400, b'{"error": "bad model"}'))
    [res] = _openai(server, max_retries=5).generate([REQ])
    assert (res.reason, res.attempts) == ("http_4xx:400", 1)
    assert len(server.requests) == 1


def test_openai_connection_refused(serve) -> None:
    server = serve(lambda i, body: good_reply(body))
    url = server.url
    server.close()
    cfg = OpenAIBackendConfig(base_url=url, max_retries=1, backoff_s=0.01, timeout_s=1.0)
    [res] = OpenAIBackend(cfg, 600).generate([REQ])
    assert (res.reason, res.attempts) == ("connection_error", 2)


def test_openai_bounded_concurrency_and_order(serve) -> None:
    def behaviour(i: int, body: dict[str, Any]) -> Reply:
        reply = good_reply(body)
        reply.delay = 0.15
        return reply

    server = serve(behaviour)
    reqs = [DialogueRequest(f"row-{i}", f"class{i}", "on the beach", "clear") for i in range(6)]
    results = _openai(server, max_concurrency=2).generate(reqs)
    assert server.max_in_flight == 2
    assert [r.row_id for r in results] == [q.row_id for q in reqs]
    assert [r.user for r in results] == [f"Please draw this class{i} nicely." for i in range(6)]


def test_make_backend_kinds() -> None:
    assert isinstance(make_backend(DialogueConfig(backend="openai")), OpenAIBackend)
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
