"""Redaction of secrets in log data: by key name, by known secret values, in URLs.

Key rule. A key is split into words at ``_``, ``-``, ``.``, spaces and camelCase
humps, and lower-cased. Its value is replaced by ``***`` when

* any word is a secret word (password, passwd, passphrase, secret(s),
  credential(s), apikey, privatekey): ``db_password``, ``secret_access_key``; or
* the key *ends* with a credential noun (token, auth, authorization, cookie(s),
  dsn) or pair (api key, private key, access key): ``access_token``,
  ``X-Auth-Token``, ``Set-Cookie``, ``openai_api_key``, ``apiKey``, ``SENTRY_DSN``.

"Ends with" is what keeps LLM accounting readable: ``tokens``, ``max_tokens``,
``prompt_tokens`` and ``token_count`` are counts, not credentials. A ``None``
value stays ``None``: it hides nothing and shows that a credential is missing.

Text rule. In every string (and every key), each known secret value, also in its
URL-quoted form, becomes ``***``, as do URL userinfo passwords
(``amqp://user:***@host``) and ``Bearer`` credentials.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Set
from pathlib import PurePath
from typing import Any, TypeAlias
from urllib.parse import quote

from llmgine_celery.settings import redact_url

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"

MASK = "***"
#: distinct keys a Redactor remembers the redaction of
KEY_CACHE_SIZE = 4096
#: short strings (up to TEXT_CACHE_CHARS) a Redactor remembers the redaction of
TEXT_CACHE_SIZE = 1024
TEXT_CACHE_CHARS = 80

_SECRET_WORDS = frozenset(
    {"password", "passwords", "passwd", "passphrase", "secret", "secrets"}
    | {"credential", "credentials", "apikey", "privatekey"}
)
_CREDENTIAL_NOUNS = frozenset({"token", "auth", "authorization", "cookie", "cookies", "dsn"})
_CREDENTIAL_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key")})

_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATOR = re.compile(r"[\s_.\-]+")
# The greedy password run stops at whitespace or quotes, so it ends at the last '@'
# of the URL: an unencoded '@' in a password is still hidden, as in redact_url.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"<>]*:)[^\s'\"<>]*@")
# 8+ characters: real tokens are long, and "the bearer of" must stay prose
_BEARER = re.compile(r"(\b[Bb]earer\s+)[A-Za-z0-9._~+/=-]{8,}")
_SPACE = re.compile(r"\s")


@functools.lru_cache(maxsize=4096)
def is_sensitive_key(key: str) -> bool:
    """True when values under ``key`` are credentials (see the module docstring)."""
    words = [w for w in _SEPARATOR.split(_HUMP.sub("_", key).lower()) if w]
    if not words:
        return False
    if _SECRET_WORDS.intersection(words) or words[-1] in _CREDENTIAL_NOUNS:
        return True
    return tuple(words[-2:]) in _CREDENTIAL_PAIRS


class Redactor:
    """Redaction bound to a set of secret values; build once, call per record."""

    def __init__(
        self,
        secrets: Iterable[str | None] = (),
        *,
        max_depth: int = 20,
        max_str: int = 16_384,
        max_items: int = 1_000,
    ) -> None:
        variants = {v for s in secrets if s for v in (s, quote(s, safe=""))}
        # longest first, so a secret containing another is hidden whole
        alternatives = sorted(variants, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, alternatives))) if variants else None
        # substrings without which no rule below applies: most strings have none
        self._needles = (*alternatives, "://", "earer")
        self.max_depth = max_depth
        self.max_str = max_str
        self.max_items = max_items
        #: redacted form and sensitivity of keys seen: records reuse a few dozen names
        self._keys: dict[str, tuple[str, bool]] = {}
        #: redacted short strings seen: task names, queues, types repeat in every record
        self._texts: dict[str, str] = {}

    def __call__(self, value: object) -> JsonValue:
        """A redacted, JSON-safe deep copy of ``value``; never raises."""
        try:
            if type(value) is dict:  # a record's fields: skip the generic dispatch
                return self._mapping(value, 0, {id(value)})
            return self._value(value, 0, set())
        except Exception:  # a hostile __iter__/__eq__: hide the value rather than fail
            return "<unredactable>"

    def text(self, text: str) -> str:
        """``text`` with secrets, URL passwords and bearer tokens hidden, then capped."""
        if not self._suspect(text):  # the common case: an id, a name, prose
            if len(text) > self.max_str:
                return f"{text[: self.max_str]}…[+{len(text) - self.max_str} chars]"
            return text
        if self._secrets is not None and self._secrets.search(text) is not None:
            text = self._secrets.sub(MASK, text)
        if "://" in text:
            text = redact_url(text) if _SPACE.search(text) is None else text
            text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
        if _BEARER.search(text):  # sub() with a template is slow even with no match
            text = _BEARER.sub(rf"\1{MASK}", text)
        if len(text) > self.max_str:  # cut after redacting, so no half secret survives
            text = f"{text[: self.max_str]}…[+{len(text) - self.max_str} chars]"
        return text

    def _suspect(self, text: str) -> bool:
        # C substring searches: cheaper than one regex of them all (and than any())
        for needle in self._needles:  # noqa: SIM110
            if needle in text:
                return True
        return False

    def _value(self, value: object, depth: int, path: set[int]) -> JsonValue:
        kind = type(value)  # exact types first: most values of a record are plain
        if kind is str:
            return self._short_text(value)  # type: ignore[arg-type]
        if value is None or kind is bool or (kind is int and value.bit_length() <= 256):  # type: ignore[attr-defined]
            return value  # type: ignore[return-value]
        if value is None or isinstance(value, str | bool | int | float):
            return self._scalar(value)
        if depth >= self.max_depth:
            return "<max depth>"
        marker = id(value)  # the object on the current path, so shared values are no cycle
        if marker in path:
            return "<cycle>"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping | list | tuple | Set):
            path.add(marker)
            try:
                return self._container(value, depth, path)
            finally:
                path.discard(marker)
        return self.text(_describe(value))

    def _scalar(self, value: str | bool | int | float | None) -> JsonValue:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # NaN and Infinity are not JSON
        if isinstance(value, int) and value.bit_length() > 256:
            return f"<int of {value.bit_length()} bits>"  # str() of huge ints raises
        return value

    def _container(self, value: Any, depth: int, path: set[int]) -> JsonValue:
        if isinstance(value, Mapping):
            return self._mapping(value, depth, path)
        items: list[JsonValue] = []
        for i, item in enumerate(value):
            if i == self.max_items:
                items.append(f"…[+{len(value) - i} items]")
                break
            items.append(self._value(item, depth + 1, path))
        return items

    def _mapping(self, value: Mapping[Any, Any], depth: int, path: set[int]) -> JsonValue:
        # the hot path of every record: plain values are handled inline
        out: dict[str, JsonValue] = {}
        pairs: Iterable[tuple[Any, Any]] = value.items()
        extra = len(value) - self.max_items
        if extra > 0:
            pairs = list(pairs)[: self.max_items]
        keys, texts = self._keys, self._texts
        for key, item in pairs:
            known = keys.get(key) if type(key) is str else None
            shown, sensitive = known or self._key(key if isinstance(key, str) else _describe(key))
            kind = type(item)
            if sensitive:
                # None stays visible: "no API key was set" is worth seeing in a log
                out[shown] = None if item is None else MASK
            elif kind is str:  # most values: ids, names, states
                out[shown] = texts.get(item) or self._short_text(item)
            elif (
                item is None
                or kind is bool
                or (kind is int and item.bit_length() <= 256)
                or (kind is float and math.isfinite(item))
            ):
                out[shown] = item
            else:
                out[shown] = self._value(item, depth + 1, path)
        if extra > 0:
            out["…"] = f"+{extra} keys"
        return out

    def cached_text(self, text: str) -> str:
        """``text(text)``, remembered for short strings (names that recur in every record)."""
        return self._texts.get(text) or self._short_text(text)

    def _short_text(self, text: str) -> str:
        if len(text) > TEXT_CACHE_CHARS:
            return self.text(text)
        known = self._texts.get(text)
        if known is None:
            if len(self._texts) >= TEXT_CACHE_SIZE:
                self._texts.clear()  # unique ids churn it; the repeated strings come back
            known = self._texts[text] = self.text(text)
        return known

    def _key(self, name: str) -> tuple[str, bool]:
        known = self._keys.get(name)
        if known is None:
            known = (self.text(name), is_sensitive_key(name))
            if len(self._keys) < KEY_CACHE_SIZE:
                self._keys[name] = known
        return known


def _describe(value: object) -> str:
    """A readable string for a value JSON has no type for."""
    try:
        if isinstance(value, enum.Enum):
            return str(value.value)
        if isinstance(value, dt.datetime | dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, uuid.UUID | PurePath):
            return str(value)
        if isinstance(value, BaseException):
            return f"{type(value).__name__}: {value}"
        if isinstance(value, bytes | bytearray | memoryview):
            return repr(bytes(value[:4096]))
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def redact(value: object, secrets: Iterable[str | None] = ()) -> JsonValue:
    """A JSON-safe deep copy of ``value`` with credentials replaced by ``***``."""
    return Redactor(secrets)(value)
