"""The ObservabilityBus: structured records fanned out to sinks."""

from __future__ import annotations

import enum
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from collections.abc import Mapping
from typing import Any, TextIO

logger = logging.getLogger("llmgine_celery.observability")


class LogLevel(enum.IntEnum):
    """Log levels, numerically equal to :mod:`logging`'s."""

    DEBUG = logging.DEBUG
    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR
    CRITICAL = logging.CRITICAL


@dataclass
class Record:
    """One normalised observability record."""

    level: LogLevel
    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    ts: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    pid: int = field(default_factory=os.getpid)


class Sink:
    """Where records and measurements go: a base class of documented no-op hooks."""

    def emit(self, record: Record) -> None:
        """Handle one record (every record, whatever its level: filter here)."""

    def count(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """Add ``value`` to the counter ``name`` with ``labels``."""

    def observe(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """Record ``value`` in the histogram ``name`` with ``labels``."""

    def close(self) -> None:
        """Release what the sink holds."""


class ConsoleSink(Sink):
    """Human-readable lines on a stream (stderr by default)."""

    def __init__(self, stream: TextIO | None = None, level: LogLevel = LogLevel.INFO) -> None:
        self._stream = stream
        self._level = level

    def emit(self, record: Record) -> None:
        if record.level < self._level:
            return
        stream = self._stream or sys.stderr
        extras = " ".join(f"{k}={v}" for k, v in record.fields.items() if v is not None)
        line = f"{record.ts} {record.level.name:<8} {record.event}"
        stream.write(f"{line} {extras}\n" if extras else f"{line}\n")
        stream.flush()


class ObservabilityBus:
    """Fans records out to sinks; a sink that raises is reported once and skipped."""

    def __init__(self, service: str, sinks: list[Sink] | None = None) -> None:
        self.service = service
        self.hostname = socket.gethostname()
        self._sinks: list[Sink] = list(sinks) if sinks is not None else [ConsoleSink()]
        self._reported: set[int] = set()

    def add_sink(self, sink: Sink) -> None:
        """Send later records to ``sink`` too."""
        self._sinks.append(sink)

    def log(self, level: LogLevel | int, message: str, **fields: Any) -> None:
        """Record a structured log line, as in the LLMgine seed."""
        self.emit(Record(level=LogLevel(level), event=message, fields=fields))

    def emit(self, record: Record) -> None:
        """Give ``record`` to every sink; no sink can break the caller."""
        for sink in self._sinks:
            try:
                sink.emit(record)
            except Exception:  # an observer must never break the flow
                if id(sink) not in self._reported:
                    self._reported.add(id(sink))
                    logger.exception("observability sink %r failed; later failures hidden", sink)

    def close(self) -> None:
        """Close every sink."""
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("closing observability sink %r failed", sink)
