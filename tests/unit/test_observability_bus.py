"""The ObservabilityBus: logs, spans, counters and histograms, and failing sinks."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import pytest

from llmgine_celery.bus.runtime import call_handler
from llmgine_celery.observability import context, records
from llmgine_celery.observability.bus import ConsoleSink, LogLevel, ObservabilityBus, Record, Sink


class Keep(Sink):
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.counted: list[tuple[str, float, dict[str, str]]] = []
        self.observed: list[tuple[str, float, dict[str, str]]] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def count(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        self.counted.append((name, value, dict(labels)))

    def observe(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        self.observed.append((name, value, dict(labels)))


class Broken(Sink):
    def emit(self, record: Record) -> None:
        raise RuntimeError("disk full")


def test_a_log_outside_any_handler_carries_only_its_fields() -> None:
    keep = Keep()
    ObservabilityBus("svc", [keep]).log(LogLevel.INFO, "hello", user="u1")
    assert keep.records[0].event == "hello" and keep.records[0].fields == {"user": "u1"}


def test_spans_nest_in_one_trace_and_logs_inside_carry_the_span() -> None:
    keep = Keep()
    bus = ObservabilityBus("svc", [keep])
    with bus.span("outer", model="m") as outer, bus.span("inner") as inner:
        bus.log(LogLevel.INFO, "inside")
    inside, inner_end, outer_end = keep.records
    assert inside.fields["trace_id"] == outer.trace_id == inner.trace_id
    assert inside.fields["span_id"] == inner.span_id != outer.span_id
    assert inner_end.event == outer_end.event == records.SPAN
    assert (
        inner_end.fields["span"] == "inner" and inner_end.fields["parent_span_id"] == outer.span_id
    )
    assert outer_end.fields["model"] == "m" and outer_end.fields["outcome"] == "ok"
    assert "parent_span_id" not in outer_end.fields
    assert context.current() is None  # left when the blocks end


def test_a_span_that_raises_records_the_error_and_reraises() -> None:
    keep = Keep()
    bus = ObservabilityBus("svc", [keep])
    with pytest.raises(KeyError), bus.span("lookup"):
        raise KeyError("k")
    (end,) = keep.records
    assert end.level == LogLevel.ERROR
    assert end.fields["outcome"] == "error" and end.fields["exception"] == "KeyError"
    assert end.fields["duration_ms"] >= 0


def test_counters_and_histograms_reach_every_sink() -> None:
    keep = Keep()
    bus = ObservabilityBus("svc", [keep])
    bus.count("tokens_total", 12, model="m")
    bus.observe("latency_seconds", 0.25, model="m")
    assert keep.counted == [("tokens_total", 12, {"model": "m"})]
    assert keep.observed == [("latency_seconds", 0.25, {"model": "m"})]


def test_a_failing_sink_is_reported_once_and_the_others_still_get_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keep = Keep()
    bus = ObservabilityBus("svc", [Broken(), keep])
    with caplog.at_level(logging.ERROR, "llmgine_celery.observability"):
        for n in range(3):
            bus.log(LogLevel.INFO, "line", n=n)
    assert [r.fields["n"] for r in keep.records] == [0, 1, 2]
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1


def test_the_console_shows_lifecycle_records_only_when_asked() -> None:
    quiet, loud = io.StringIO(), io.StringIO()
    bus = ObservabilityBus("svc", [ConsoleSink(quiet), ConsoleSink(loud, lifecycle=True)])
    bus.emit(Record(LogLevel.INFO, records.COMMAND_SENT, {"command_id": "c1"}))
    bus.emit(Record(LogLevel.WARNING, records.DEAD_LETTER, {"dead_letter_id": "d1"}))
    bus.log(LogLevel.INFO, "user line")
    assert "command.sent" not in quiet.getvalue() and "user line" in quiet.getvalue()
    assert "dead_letter dead_letter_id=d1" in quiet.getvalue()  # warnings always show
    assert "command.sent command_id=c1" in loud.getvalue()


def test_configure_replaces_only_the_default_console_sink() -> None:
    keep, added = Keep(), Keep()
    bus = ObservabilityBus("svc")
    bus.add_sink(added)
    bus.configure([keep])
    bus.log(LogLevel.INFO, "x")
    assert len(keep.records) == len(added.records) == 1


def test_an_async_handler_runs_in_the_callers_correlation() -> None:
    here = context.Correlation(trace_id="t" * 32, span_id="s" * 16, causation_id="cmd-1")

    async def handler(message: str) -> context.Correlation | None:
        return context.current()

    with context.correlated(here):
        seen = call_handler(handler, "m")
    assert seen == here
