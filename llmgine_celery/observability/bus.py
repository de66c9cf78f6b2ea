"""The ObservabilityBus: structured records fanned out to sinks."""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from llmgine_celery.observability import context, records
from llmgine_celery.observability.process import current_pid

logger = logging.getLogger("llmgine_celery.observability")


class LogLevel(enum.IntEnum):
    """Log levels, numerically equal to :mod:`logging`'s."""

    DEBUG = logging.DEBUG
    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR
    CRITICAL = logging.CRITICAL


class Record:
    """One normalised observability record.

    ``fields`` are given, or made by ``build`` on first use. The task lifecycle's
    records are built that way: the task's thread only notes what it must (times,
    ids, the outcome), and the sinks' writer thread, which reads the fields,
    formats them there. A sink that never looks at a record's fields (the console
    sink with lifecycle records off) never has them made.
    """

    __slots__ = ("_build", "_fields", "created", "event", "level", "pid")

    def __init__(
        self,
        level: LogLevel,
        event: str,
        fields: dict[str, Any] | None = None,
        created: float | None = None,
        pid: int | None = None,
        *,
        build: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.level = level
        self.event = event
        self._fields = fields if fields is not None or build is not None else {}
        self._build = build
        #: seconds since the epoch; formatted as ``ts`` only where a sink writes it
        self.created = time.time() if created is None else created
        self.pid = current_pid() if pid is None else pid

    @property
    def fields(self) -> dict[str, Any]:
        """The record's fields (made now if they were left to ``build``)."""
        found = self._fields
        if found is None:
            found = self._fields = _built(self.event, self._build)
        return found

    @fields.setter
    def fields(self, value: dict[str, Any]) -> None:
        self._fields = value

    @property
    def ts(self) -> str:
        """``created`` in ISO 8601, UTC (as ``datetime.isoformat`` writes it)."""
        return iso_utc(self.created)

    def __repr__(self) -> str:
        return f"Record({self.level.name}, {self.event!r}, {self.fields!r})"


def _built(event: str, build: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    """What ``build`` makes; a failure is a field of its own, not a broken sink."""
    if build is None:
        return {}
    try:
        return build()
    except Exception as exc:  # two threads may build at once: both get equal fields
        logger.exception("fields of record %s could not be built", event)
        return {"error": f"fields could not be built: {type(exc).__name__}: {exc}"}


class _SecondPrefix(threading.local):
    """The ISO text of the last whole second formatted on this thread."""

    second = -1
    text = ""


_prefix = _SecondPrefix()


def iso_utc(created: float) -> str:
    """``created`` (seconds since the epoch) in ISO 8601, UTC, to the microsecond.

    The text of ``datetime.fromtimestamp(created, UTC).isoformat()``; records of
    one second share the date and time, so that part is formatted once.
    """
    # rounded as datetime rounds: the fraction alone, half to even
    fraction_of_second, whole = math.modf(created)
    fraction = round(fraction_of_second * 1_000_000)
    second = int(whole)
    if fraction >= 1_000_000:
        second, fraction = second + 1, fraction - 1_000_000
    elif fraction < 0:  # before 1970
        second, fraction = second - 1, fraction + 1_000_000
    cached = _prefix
    if second != cached.second:
        cached.text = datetime.fromtimestamp(second, UTC).isoformat()[:-6]  # no "+00:00"
        cached.second = second
    if fraction:
        return f"{cached.text}.{fraction:06d}+00:00"
    return f"{cached.text}+00:00"


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
    """Human-readable lines on a stream (stderr by default).

    Shows what applications log; of the framework's own lifecycle records (one
    per send, run, result...) only warnings and errors (failures, retries, dead
    letters), unless ``lifecycle=True``.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        level: LogLevel = LogLevel.INFO,
        *,
        lifecycle: bool = False,
    ) -> None:
        self._stream = stream
        self._level = level
        self._lifecycle = lifecycle

    def emit(self, record: Record) -> None:
        if record.level < self._level:
            return
        quiet = record.level < LogLevel.WARNING and record.event in records.LIFECYCLE
        if quiet and not self._lifecycle:
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
        default = ConsoleSink()
        self._default: Sink | None = default if sinks is None else None
        self._sinks: list[Sink] = list(sinks) if sinks is not None else [default]
        self._reported: set[int] = set()

    def add_sink(self, sink: Sink) -> None:
        """Send later records to ``sink`` too."""
        self._sinks.append(sink)

    def configure(self, sinks: list[Sink]) -> None:
        """Use ``sinks`` instead of the default console sink; added sinks stay."""
        self._sinks = [s for s in self._sinks if s is not self._default] + sinks
        self._default = None

    def log(self, level: LogLevel | int, message: str, **fields: Any) -> None:
        """Record a structured log line, as in the LLMgine seed.

        Inside a handler (or a span) the line carries its trace and span ids.
        """
        here = context.current()
        if here is not None:
            fields.setdefault("trace_id", here.trace_id)
            fields.setdefault("span_id", here.span_id)
            if here.causation_id is not None:
                fields.setdefault("causation_id", here.causation_id)
        self.emit(Record(level=LogLevel(level), event=message, fields=fields))

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to the counter ``name`` (never put an id in a label)."""
        self._each(lambda sink: sink.count(name, value, labels))

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record ``value`` in the histogram ``name``."""
        self._each(lambda sink: sink.observe(name, value, labels))

    @contextlib.contextmanager
    def span(self, name: str, **fields: Any) -> Iterator[context.Correlation]:
        """Time the block as a span of the current trace (a new trace outside any).

        Records one ``span`` record when the block ends, with its duration and
        outcome; what the block sends or logs carries the span's ids.
        """
        parent = context.current()
        here = (
            parent.child()
            if parent is not None
            else context.Correlation(trace_id=context.new_trace_id(), span_id=context.new_span_id())
        )
        started = time.perf_counter()
        level, extra = LogLevel.INFO, dict[str, Any](outcome="ok")
        try:
            with context.correlated(here):
                yield here
        except BaseException as exc:
            level = LogLevel.ERROR
            extra = {"outcome": "error", "exception": type(exc).__name__, "error": str(exc)}
            raise
        finally:
            extra["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
            ids = {"trace_id": here.trace_id, "span_id": here.span_id}
            if here.parent_span_id is not None:
                ids["parent_span_id"] = here.parent_span_id
            self.emit(Record(level, records.SPAN, {"span": name, **ids, **fields, **extra}))

    def emit(self, record: Record) -> None:
        """Give ``record`` to every sink; no sink can break the caller."""
        for sink in self._sinks:  # the hot path: no closure per record
            try:
                sink.emit(record)
            except Exception:
                self._failed(sink)

    def _each(self, call: Callable[[Sink], None]) -> None:
        for sink in self._sinks:
            try:
                call(sink)
            except Exception:
                self._failed(sink)

    def _failed(self, sink: Sink) -> None:
        # an observer must never break the flow: told once, then hidden
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
