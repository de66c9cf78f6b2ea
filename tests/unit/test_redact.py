"""Redaction of log data: sensitive keys at any depth, secret values, URL passwords."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest

from llmgine_celery.observability.redact import Redactor, is_sensitive_key, redact

PASSWORD = "s3cr3t-pa55"


@pytest.mark.parametrize(
    "key",
    [
        *("password", "PASSWORD", "db_password", "passwd", "userPassword", "secret"),
        *("client_secret", "AWS_SECRET_ACCESS_KEY", "credentials", "private_key"),
        *("privateKey", "api_key", "apikey", "api-key", "openai_api_key", "X-Api-Key"),
        *("APIKey", "apiKey", "OPENAI_API_KEY", "token", "access_token", "refresh_token"),
        *("id_token", "accessToken", "X-Auth-Token", "auth", "Authorization"),
        *("HTTP_AUTHORIZATION", "proxy-authorization", "cookie", "Set-Cookie"),
        *("cookies", "dsn", "SENTRY_DSN", "sentry.dsn", "access_key"),
    ],
)
def test_credential_keys_are_sensitive(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize(
    "key",
    [
        *("tokens", "max_tokens", "prompt_tokens", "completion_tokens", "total_tokens"),
        *("token_count", "tokenCount", "token_type", "session_id", "task_id", "key"),
        *("cache_key", "keys", "author", "authority", "oauth_provider", "cookie_name"),
        *("dsn_host", "api_key_id", "", "_", "queue"),
    ],
)
def test_ordinary_keys_are_not(key: str) -> None:
    assert not is_sensitive_key(key)


def test_sensitive_values_are_hidden_at_any_depth() -> None:
    data = {
        "usage": {"tokens": 42, "max_tokens": 512, "prompt_tokens": 7},
        "calls": [{"request": {"headers": {"Authorization": "Bearer abc", "X-Trace": "t1"}}}],
        "llm": ({"openai_api_key": "sk-123", "model": "gpt"},),
        "credentials": {"user": "u", "password": "p"},
        "access_token": None,
        "refresh_token": "",
    }
    assert redact(data) == {
        "usage": {"tokens": 42, "max_tokens": 512, "prompt_tokens": 7},
        "calls": [{"request": {"headers": {"Authorization": "***", "X-Trace": "t1"}}}],
        "llm": [{"openai_api_key": "***", "model": "gpt"}],
        "credentials": "***",
        "access_token": None,  # shows that none was set, and hides nothing
        "refresh_token": "***",
    }


def test_input_is_not_modified() -> None:
    data = {"nested": {"password": "p", "items": [1, 2]}}
    copy = redact(data)
    assert data == {"nested": {"password": "p", "items": [1, 2]}}
    assert isinstance(copy, dict)
    assert copy["nested"] is not data["nested"]


def test_known_secrets_are_hidden_inside_strings_and_keys() -> None:
    dsn = "https://abc123@o1.ingest.sentry.io/42"
    data = {
        "msg": f"login with {PASSWORD} failed; dsn={dsn}",
        PASSWORD: "as a key",
        "urlquoted": "?pw=p%40ss%2Fword",
    }
    out = redact(data, secrets=[PASSWORD, dsn, "p@ss/word", "", None])
    assert out == {
        "msg": "login with *** failed; dsn=***",
        "***": "as a key",
        "urlquoted": "?pw=***",
    }


def test_the_longest_secret_wins() -> None:
    assert redact("abcdef", secrets=["abc", "abcdef"]) == "***"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        ("redis://:p/a?s#s@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "cannot reach amqp://user:pw@rabbit:5672// (refused); retry redis://:x@r/0.",
            "cannot reach amqp://user:***@rabbit:5672// (refused); retry redis://:***@r/0.",
        ),
        ("url='https://me:p@ss@example.com/x'", "url='https://me:***@example.com/x'"),
        ("headers: Authorization: Bearer eyJhbGci.x-y_z=", "headers: Authorization: Bearer ***"),
        ("the bearer of bad news", "the bearer of bad news"),
        (
            "no password: https://user@example.com:8080/a",
            "no password: https://user@example.com:8080/a",
        ),
        ("plain text with a:b@c but no scheme", "plain text with a:b@c but no scheme"),
    ],
)
def test_url_passwords_and_bearer_tokens_in_text(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_cycles_and_deep_nesting_are_cut_not_fatal() -> None:
    cyclic: dict[str, Any] = {"name": "a"}
    cyclic["self"] = cyclic
    loop: list[Any] = [1]
    loop.append(loop)
    assert redact(cyclic) == {"name": "a", "self": "<cycle>"}
    assert redact(loop) == [1, "<cycle>"]

    deep: list[Any] = []
    node = deep
    for _ in range(10_000):
        node.append([])
        node = node[0]
    out = redact(deep)
    depth = 0
    while isinstance(out, list) and out:
        out, depth = out[0], depth + 1
    assert (out, depth) == ("<max depth>", 20)


@dataclass
class _Node:
    name: str
    child: Any = None


def test_a_cycle_through_dataclasses_is_cut() -> None:
    node = _Node("a")
    node.child = [node]
    assert redact(node) == {"name": "a", "child": ["<cycle>"]}


def test_shared_references_are_not_cycles() -> None:
    shared = {"x": 1}
    assert redact([shared, shared]) == [{"x": 1}, {"x": 1}]


def test_long_strings_and_big_containers_are_capped() -> None:
    redactor = Redactor(max_str=10, max_items=3)
    assert redactor("x" * 25) == "xxxxxxxxxx…[+15 chars]"
    assert redactor(list(range(5))) == [0, 1, 2, "…[+2 items]"]
    assert redactor({str(i): i for i in range(5)}) == {"0": 0, "1": 1, "2": 2, "…": "+2 keys"}


def test_secrets_are_hidden_before_the_cap_cuts_them() -> None:
    assert Redactor([PASSWORD], max_str=12)(f"pw is {PASSWORD}!") == "pw is ***!"
    assert Redactor([PASSWORD], max_str=8)(f"pw is {PASSWORD}!") == "pw is **…[+2 chars]"


@dataclass
class _Command:
    prompt: str
    api_key: str


class _Opaque:
    def __repr__(self) -> str:
        return f"<Opaque {PASSWORD}>"


class _Broken:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_other_objects_become_json_safe_strings() -> None:
    data = {
        "command": _Command(prompt="hi", api_key="sk-1"),
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "error": ValueError(f"bad password {PASSWORD}"),
        "opaque": _Opaque(),
        "broken": _Broken(),
        "blob": b"\x00abc",
        "tags": frozenset({"a"}),
        (1, 2): "tuple key",
        "nan": math.nan,
        "huge": 10**5000,
    }
    out = redact(data, secrets=[PASSWORD])
    assert out == {
        "command": {"prompt": "hi", "api_key": "***"},
        "when": "2024-01-02T03:04:05+00:00",
        "error": "ValueError: bad password ***",
        "opaque": "<Opaque ***>",
        "broken": "<unrepresentable _Broken>",
        "blob": "b'\\x00abc'",
        "tags": ["a"],
        "(1, 2)": "tuple key",
        "nan": "nan",
        "huge": "<int of 16610 bits>",
    }
    json.dumps(out, allow_nan=False)


def test_a_hostile_container_is_hidden_not_raised() -> None:
    class Hostile(dict[str, int]):
        def items(self) -> Any:
            raise RuntimeError("boom")

    assert redact({"ok": Hostile(a=1)}) == "<unredactable>"
