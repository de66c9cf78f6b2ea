"""JsonlSink: one redacted JSON object per line, appended by many processes.

Fields: ``ts`` (ISO UTC), ``level`` (name), ``event``, ``service``, ``hostname``,
``pid``; then the DESIGN section 5 keys the record carries, in their documented
order; then its other fields (``messaging.*`` and the rest) as given. Absent keys
are omitted, not written as null, to keep lines short. A field named like a core
key is kept as ``field.<name>``. Everything passes through :class:`Redactor`.

A line never exceeds ``MAX_LINE_BYTES``: the largest values are shortened and the
line gets ``"truncated": true``. So a line is never split by a log shipper with a
line limit, and it always goes out in one write (see :mod:`.appendfile`).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic_core import PydanticSerializationError, to_json

from llmgine_celery.observability.appendfile import AppendFile, Rotation
from llmgine_celery.observability.bus import LogLevel, Record, Sink
from llmgine_celery.observability.redact import JsonValue, Redactor

MAX_LINE_BYTES = 64 * 1024
#: bytes of whole lines ``emit_many`` joins into one write
MAX_WRITE_BYTES = 1024 * 1024
CORE_KEYS = ("ts", "level", "event", "service", "hostname", "pid")
_CORE = frozenset(CORE_KEYS)
STANDARD_KEYS = (
    *("task_id", "task_name", "queue", "retries", "command_id", "event_id", "session_id"),
    *("trace_id", "span_id", "duration_ms", "queue_wait_ms", "exception"),
)


class JsonlSink(Sink):
    """Appends records to ``<log_dir>/<service>.jsonl``, rotated by size."""

    def __init__(
        self,
        log_dir: Path | str,
        service: str,
        *,
        secrets: Iterable[str | None] = (),
        level: LogLevel = LogLevel.INFO,
        rotation: Rotation | None = None,
    ) -> None:
        self._file = AppendFile(Path(log_dir) / f"{service}.jsonl", rotation)
        self._service = service
        self._hostname = socket.gethostname()
        self._redact = Redactor(secrets)
        self._shown_service = self._redact.text(service)
        self._shown_hostname = self._redact.text(self._hostname)
        self._level = level

    @property
    def path(self) -> Path:
        """The current file; backups are ``<path>.1`` (newest) to ``<path>.<backups>``."""
        return self._file.path

    def wants(self, record: Record) -> bool:
        """Whether ``record`` is at this sink's level (checked before queuing it)."""
        return record.level >= self._level

    def emit(self, record: Record) -> None:
        """Append ``record`` as one line."""
        if record.level >= self._level:
            self._file.write(self.encode(record))

    def emit_many(self, batch: Sequence[Record]) -> None:
        """Append the records of ``batch`` at this level, whole lines in few writes."""
        chunk: list[bytes] = []
        size = 0
        for record in batch:
            if record.level < self._level:
                continue
            line = self.encode(record)
            if chunk and size + len(line) > MAX_WRITE_BYTES:
                self._file.write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._file.write(b"".join(chunk))

    def encode(self, record: Record) -> bytes:
        """``record`` as one redacted JSON line of at most ``MAX_LINE_BYTES``."""
        # ts, level and pid are made here; service and hostname were redacted once
        line: dict[str, JsonValue] = {
            "ts": record.ts,
            "level": record.level.name,
            "event": self._redact.cached_text(record.event),
            "service": self._shown_service,
            "hostname": self._shown_hostname,
            "pid": record.pid,
        }
        redacted = self._redact(record.fields)
        assert isinstance(redacted, dict)  # a dict with str keys stays a dict
        for key in STANDARD_KEYS:  # the standard keys first, in their order
            if key in redacted:
                line[key] = redacted[key]
        for key, value in redacted.items():
            if key in _CORE:
                line[f"field.{key}"] = value
            elif key not in line:
                line[key] = value
        return _fit(line, MAX_LINE_BYTES - 1) + b"\n"

    def close(self) -> None:
        """Close the file; a later ``emit`` reopens it."""
        self._file.close()


def _dumps(value: JsonValue) -> bytes:
    try:  # pydantic-core's encoder: a fifth of json.dumps' time per line
        return to_json(value)
    except PydanticSerializationError:  # a lone surrogate, say: the careful way
        # redacted data is JSON-safe already; default=str is a last guard, never a path
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        return text.encode("utf-8", "replace")  # a lone surrogate becomes '?'


def _fit(obj: dict[str, JsonValue], cap: int) -> bytes:
    """``obj`` encoded in at most ``cap`` bytes, shortening the largest values."""
    line = _dumps(obj)
    if len(line) <= cap:
        return line
    obj = {**obj, "truncated": True}
    sizes = {key: len(_dumps(value)) for key, value in obj.items()}
    left = cap - len(_dumps(dict.fromkeys(obj, 0))) + len(obj)  # bytes for the values
    fitted: dict[str, JsonValue] = {}
    # water-filling: small values keep their size, large ones share what remains
    for i, key in enumerate(sorted(obj, key=sizes.__getitem__)):
        share = left // (len(obj) - i)
        value = obj[key]
        if sizes[key] > share:
            text = value if isinstance(value, str) else _dumps(value).decode()
            value = _shorten(text, share)
        fitted[key] = value
        left -= len(_dumps(value))
    line = _dumps({key: fitted[key] for key in obj})
    if len(line) <= cap:
        return line
    # only when the key names alone overflow the cap: still write a valid line
    return _dumps({"ts": obj.get("ts"), "event": "record too large", "truncated": True})


def _shorten(text: str, budget: int) -> str:
    """A prefix of ``text`` (marked with '…') whose JSON encoding fits in ``budget`` bytes."""
    cut = min(len(text), budget)
    while cut > 0:
        short = f"{text[:cut]}…"
        size = len(_dumps(short))
        if size <= budget:
            return short
        cut = min(cut - 1, cut * budget // size)  # escaping can grow a character 6x
    return ""
