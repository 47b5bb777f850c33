"""Secret redaction and run-independent error details (pipeline/redact.py)."""
from __future__ import annotations

import json
import urllib.parse

import pytest

from pipeline.redact import REDACTED, redact, secret_values_from_env, stable_detail

KEY = "sk-live-0123456789abcdefABCDEF"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc123", "Authorization: Bearer [REDACTED]"),
        ("authorization: bearer abc", "authorization: bearer [REDACTED]"),
        ('{"Authorization": "Bearer abc.def"}', '{"Authorization": "Bearer [REDACTED]"}'),
        ("{'authorization': 'Basic dXNlcjpwYXNz'}", "{'authorization': 'Basic [REDACTED]'}"),
        ("Proxy-Authorization: xyz", "Proxy-Authorization: [REDACTED]"),
        ("sent Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc to it", "sent Bearer [REDACTED] to it"),
        ("GET /v1?api_key=abc123&x=1", "GET /v1?api_key=[REDACTED]&x=1"),
        ('{"api_key": "abc123", "model": "m"}', '{"api_key": "[REDACTED]", "model": "m"}'),
        ("x-api-key: abc123", "x-api-key: [REDACTED]"),
        ("OPENAI_API_KEY=abc123 rest", "OPENAI_API_KEY=[REDACTED] rest"),
        (f"aws_secret_access_key = {AWS_SECRET}\nregion = eu", "aws_secret_access_key = [REDACTED]\nregion = eu"),
        (f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}", "AWS_SECRET_ACCESS_KEY=[REDACTED]"),
        ('{"client_secret": "s3cr3t", "password": "hunter2"}', '{"client_secret": "[REDACTED]", "password": "[REDACTED]"}'),
        ("access_token=abc; path=/", "access_token=[REDACTED]; path=/"),
        (f"key {KEY} leaked", "key [REDACTED] leaked"),
        ("id AKIAIOSFODNN7EXAMPLE used", "id [REDACTED] used"),
        ("http://alice:pa55@host:8000/v1", "http://[REDACTED]@host:8000/v1"),
    ],
)
def test_redact_shapes(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: nothing to find in redacted text


@pytest.mark.parametrize(
    "text",
    [
        '{"max_tokens": 256, "prompt_tokens": 10, "completion_tokens": 3}',
        "Can you show this cat on the beach, wearing a red hat?",
        "the bearer of good news",
        "http://127.0.0.1:8000/v1/chat/completions",
        "sk-short",
        "",
    ],
)
def test_redact_leaves_ordinary_text(text: str) -> None:
    assert redact(text) == text


def test_redact_literal_secrets_in_every_form() -> None:
    secret = 'tok/with+odd"chars'
    text = " | ".join([
        f"raw {secret}",
        f"json {json.dumps(secret)}",
        f"url {urllib.parse.quote(secret, safe='')}",
        f"form {urllib.parse.quote_plus(secret)}",
    ])
    out = redact(text, [secret, ""])
    assert secret not in out and json.dumps(secret)[1:-1] not in out
    assert urllib.parse.quote(secret, safe="") not in out and urllib.parse.quote_plus(secret) not in out
    assert out.count(REDACTED) == 4


def test_redact_longest_secret_first_and_literal_only_mode() -> None:
    assert redact("value abcdef-123456 end", ["abcdef", "abcdef-123456"]) == "value [REDACTED] end"
    # shapes=False: only the literal values, so prose that looks like a credential is untouched
    text = "password: cat; key hunter2hunter2"
    assert redact(text, ["hunter2hunter2"], shapes=False) == "password: cat; key [REDACTED]"
    assert redact(text, ["hunter2hunter2"]) == "password: [REDACTED]; key [REDACTED]"


def test_secret_values_from_env() -> None:
    env = {
        "CAFE_LLM_API_KEY": "sk-abcdefgh12345",
        "HF_TOKEN": "hf_abcdefghijklmnop",
        "db_password": "correct horse battery",
        "MY_SECRET": "sk-abcdefgh12345",  # duplicate value, listed once
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "HF_HUB_DISABLE_TOKEN": "1",  # too short to be a secret
        "PATH": "/usr/bin:/bin:/usr/local/bin",
        "HOME": "/root/with/a/long/path",
    }
    values = secret_values_from_env(env)
    assert values == sorted(["sk-abcdefgh12345", "hf_abcdefghijklmnop", "correct horse battery", AWS_SECRET])
    assert secret_values_from_env(env, min_length=1)[0] == "1"


def test_secret_values_from_env_reads_os_environ(monkeypatch) -> None:
    monkeypatch.setenv("TEST_REDACT_TOKEN", "tok-0123456789")
    assert "tok-0123456789" in secret_values_from_env()
    assert redact("echo tok-0123456789", secret_values_from_env()) == "echo [REDACTED]"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<Model object at 0x7f3a2b1c9d00> failed", "<Model object> failed"),
        ("ptr 0xdeadbeef01", "ptr 0x?"),
        ("status 0x1f ok", "status 0x1f ok"),  # short hex is data, not an address
        ("trace 123e4567-e89b-12d3-a456-426614174000 end", "trace [ID] end"),
        ('"id": "chatcmpl-9a8b7c6d5e4f"', '"id": "[ID]"'),
        ("request req_0123456789abcdef failed", "request [ID] failed"),
        ("at 2025-03-04T05:06:07.123Z and 2025-03-04 05:06:07+01:00", "at [TIME] and [TIME]"),
        ("took 1.234s, then 30.5 ms", "took [DURATION], then [DURATION]"),
        ("max_tokens must be <= 4096 (got 5000)", "max_tokens must be <= 4096 (got 5000)"),
        ("[Errno 111] Connection refused", "[Errno 111] Connection refused"),
    ],
)
def test_stable_detail(text: str, expected: str) -> None:
    assert stable_detail(text) == expected
    assert stable_detail(expected) == expected
