"""MetricsSink maps records to celery-exporter's and llmgine's series, and user metrics.

Mapping tests give the sink its own registry (in-memory values). Anything that
puts a process in multiprocess mode runs in a subprocess, so this test process
keeps prometheus-client as it found it.
"""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import values as prometheus_values

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability import records
from llmgine_celery.observability.bus import LogLevel, ObservabilityBus, Record
from llmgine_celery.observability.metrics import (
    QUEUE_WAIT_BUCKETS,
    RUNTIME_BUCKETS,
    TASK_COUNTERS,
    MetricsSink,
)

REPO = Path(__file__).resolve().parents[2]
HOST = "testhost"
TASK = {"task_name": "llmgine.command.Ask", "queue": "llmgine.commands"}
LABELS = {"name": TASK["task_name"], "hostname": HOST, "queue_name": TASK["queue"]}


def record(event: str, **fields: Any) -> Record:
    return Record(LogLevel.INFO, event, fields)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    # Another test may have put this process in multiprocess mode (any app with
    # metrics on does): values would then be shared through its folder's files.
    monkeypatch.setattr(prometheus_values, "ValueClass", prometheus_values.MutexValue)
    return CollectorRegistry()


@pytest.fixture
def sink(registry: CollectorRegistry) -> MetricsSink:
    return MetricsSink(registry, hostname=HOST)


def value(registry: CollectorRegistry, metric: str, /, **labels: str) -> float | None:
    return registry.get_sample_value(metric, labels)


def buckets(registry: CollectorRegistry, name: str) -> list[str]:
    return [
        s.labels["le"]
        for metric in registry.collect()
        for s in metric.samples
        if s.name == f"{name}_bucket"
    ]


# -- celery-exporter's series ------------------------------------------------------


@pytest.mark.parametrize("state", sorted(TASK_COUNTERS))
def test_each_state_counts_on_its_own_counter(
    sink: MetricsSink, registry: CollectorRegistry, state: str
) -> None:
    for _ in range(2):
        sink.emit(record("task.any", state=state, exception="KeyError", **TASK))
    for other, name in TASK_COUNTERS.items():
        labels = {**LABELS, "exception": "KeyError"} if other == "failed" else LABELS
        expected = 2.0 if other == state else None
        if other != state and state != "sent" and other != "sent":
            # celery-exporter's zero series: every worker-side stage shows once a task is seen
            labels = {**LABELS, "exception": ""} if other == "failed" else LABELS
            expected = 0.0
        assert value(registry, f"{name}_total", **labels) == expected, other


def test_a_failure_without_exception_type_is_unknown_exception(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    sink.emit(record(records.TASK_FAILED, state="failed", **TASK))
    labels = {**LABELS, "exception": "UnknownException"}
    assert value(registry, "celery_task_failed_total", **labels) == 1.0


def test_unknown_and_missing_states_count_nothing(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    sink.emit(record(records.TASK_UNKNOWN, state="unknown", **TASK))
    sink.emit(record("a log line", text="hello"))
    sink.emit(record(records.SPAN, span="work", duration_ms=3.0))
    assert [m.name for m in registry.collect() if m.samples] == []


def test_runtime_comes_from_succeeded_runs_in_seconds(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    durations = [12.0, 2500.0]
    for ms in durations:
        sink.emit(record(records.TASK_SUCCEEDED, state="succeeded", duration_ms=ms, **TASK))
    # as celery-exporter: a failed run's time is not a runtime sample
    sink.emit(record(records.TASK_FAILED, state="failed", duration_ms=99.0, **TASK))
    assert value(registry, "celery_task_runtime_count", **LABELS) == len(durations)
    assert value(registry, "celery_task_runtime_sum", **LABELS) == pytest.approx(
        sum(durations) / 1000
    )
    assert buckets(registry, "celery_task_runtime") == [_le(b) for b in RUNTIME_BUCKETS]


def test_queue_wait_comes_from_started_runs_with_celery_exporters_buckets(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    sink.emit(record(records.TASK_STARTED, state="started", queue_wait_ms=700.0, **TASK))
    sink.emit(record(records.TASK_STARTED, state="started", **TASK))  # no wait known
    assert value(registry, "celery_task_queue_wait_time_count", **LABELS) == 1.0
    assert value(registry, "celery_task_queue_wait_time_sum", **LABELS) == pytest.approx(0.7)
    le = buckets(registry, "celery_task_queue_wait_time")
    assert le == [_le(b) for b in QUEUE_WAIT_BUCKETS]
    assert "0.05" in le and "1800.0" in le  # celery-exporter's 50 ms to 30 min


def test_hostname_is_the_host_part_of_the_worker_node(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    sink.emit(record(records.TASK_STARTED, state="started", worker="celery@box-7", **TASK))
    labels = {**LABELS, "hostname": "box-7"}
    assert value(registry, "celery_task_started_total", **labels) == 1.0


def test_the_default_hostname_is_this_machine(registry: CollectorRegistry) -> None:
    MetricsSink(registry).emit(record(records.TASK_SENT, state="sent", **TASK))
    labels = {**LABELS, "hostname": socket.gethostname()}
    assert value(registry, "celery_task_sent_total", **labels) == 1.0


def test_worker_up_follows_ready_and_stopping(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    sink.emit(record(records.WORKER_READY, worker="w1@box-1"))
    assert value(registry, "celery_worker_up", hostname="box-1") == 1.0
    sink.emit(record(records.WORKER_STOPPING, worker="w1@box-1"))
    assert value(registry, "celery_worker_up", hostname="box-1") == 0.0


def test_active_tasks_count_runs_started_here_and_not_over(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    def active() -> float | None:
        return value(registry, "celery_worker_tasks_active", hostname=HOST)

    sink.emit(record(records.TASK_STARTED, state="started", task_id="a", **TASK))
    sink.emit(record(records.TASK_STARTED, state="started", task_id="b", **TASK))
    sink.emit(record(records.TASK_STARTED, state="started", task_id="b", **TASK))
    assert active() == 2.0
    sink.emit(record(records.TASK_RETRIED, state="retried", task_id="a", **TASK))
    sink.emit(record(records.TASK_SUCCEEDED, state="succeeded", task_id="b", **TASK))
    assert active() == 0.0
    # runs this process never saw start (a skipped copy, a revoke) change nothing
    sink.emit(record(records.HANDLER_SKIPPED, state="succeeded", task_id="c", **TASK))
    sink.emit(record(records.TASK_REVOKED, state="revoked", task_id="d", **TASK))
    assert active() == 0.0


# -- llmgine's series -------------------------------------------------------------


def test_commands_count_by_outcome_and_time_their_handlers(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    outcomes = ["success", "success", "failure", "error"]
    for outcome in outcomes:
        sink.emit(
            record(
                records.COMMAND_RESULT,
                state="succeeded",
                command_type="Ask",
                outcome=outcome,
                duration_ms=250.0,
                **TASK,
            )
        )
    for outcome in set(outcomes):
        counted = value(registry, "llmgine_command_total", command_type="Ask", outcome=outcome)
        assert counted == outcomes.count(outcome)
    seconds = value(registry, "llmgine_command_duration_seconds_sum", command_type="Ask")
    assert seconds == pytest.approx(0.25 * len(outcomes))


def test_published_events_count_by_type(sink: MetricsSink, registry: CollectorRegistry) -> None:
    for event_type in ["Answered", "Answered", "Doomed"]:
        sink.emit(
            record(records.EVENT_PUBLISHED, event_type=event_type, event_id=str(uuid.uuid4()))
        )
    assert value(registry, "llmgine_event_published_total", event_type="Answered") == 2.0
    assert value(registry, "llmgine_event_published_total", event_type="Doomed") == 1.0


def test_handler_runs_count_by_outcome_and_time_all_but_skips(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    who = {"event_type": "Doomed", "group": "listeners", "handler": "doomed"}
    runs = [
        (records.HANDLER_RETRIED, "retried", 100.0),
        (records.HANDLER_RETRIED, "retried", 200.0),
        (records.HANDLER_FAILED, "failed", 300.0),
        (records.HANDLER_SUCCEEDED, "succeeded", 400.0),
        (records.HANDLER_SKIPPED, "skipped", 5.0),
    ]
    for event, _, ms in runs:
        sink.emit(record(event, duration_ms=ms, **who))
    for outcome in {o for _, o, _ in runs}:
        expected = sum(1 for _, o, _ in runs if o == outcome)
        assert value(registry, "llmgine_event_handler_total", outcome=outcome, **who) == expected
    timed = [ms for _, outcome, ms in runs if outcome != "skipped"]
    name = "llmgine_event_handler_duration_seconds"
    assert value(registry, f"{name}_count", **who) == len(timed)
    assert value(registry, f"{name}_sum", **who) == pytest.approx(sum(timed) / 1000)


def test_dead_letters_count_by_kind(sink: MetricsSink, registry: CollectorRegistry) -> None:
    for kind in ["handler", "handler", "malformed"]:
        sink.emit(record(records.DEAD_LETTER, kind=kind, reason="x"))
    assert value(registry, "llmgine_dead_letter_total", kind="handler") == 2.0
    assert value(registry, "llmgine_dead_letter_total", kind="malformed") == 1.0


def test_no_id_is_ever_a_label(sink: MetricsSink, registry: CollectorRegistry) -> None:
    ids = {
        key: str(uuid.uuid4())
        for key in ("task_id", "command_id", "event_id", "session_id", "trace_id", "span_id")
    }
    ids.update(parent_span_id=str(uuid.uuid4()), causation_id=str(uuid.uuid4()))
    handler = {"event_type": "Answered", "group": "g", "handler": "heard"}
    lifecycle = [
        record(records.COMMAND_SENT, state="sent", **TASK),
        record(records.TASK_RECEIVED, state="received", **TASK),
        record(records.COMMAND_STARTED, state="started", queue_wait_ms=3.0, **TASK),
        record(records.EVENT_PUBLISHED, event_type="Answered"),
        record(records.HANDLER_STARTED, state="started", **handler),
        record(records.HANDLER_RETRIED, state="retried", duration_ms=2.0, **handler),
        record(records.HANDLER_FAILED, state="failed", exception="E", duration_ms=2.0, **handler),
        record(records.DEAD_LETTER, kind="handler", reason="failed", **handler),
        record(
            records.COMMAND_RESULT, state="succeeded", command_type="Ask", outcome="success", **TASK
        ),
        record(records.TASK_REVOKED, state="revoked", **TASK),
        record(records.TASK_REJECTED, state="rejected", **TASK),
        record(records.WORKER_READY, worker="celery@box"),
    ]
    for each in lifecycle:
        each.fields.update(ids)
        sink.emit(each)
    label_values = {
        v for metric in registry.collect() for s in metric.samples for v in s.labels.values()
    }
    assert len(label_values) > 5  # the records did make series
    assert label_values.isdisjoint(ids.values())


# -- user metrics (ObservabilityBus.count / observe) -------------------------------


def test_user_counters_and_histograms_are_made_on_first_use(
    sink: MetricsSink, registry: CollectorRegistry
) -> None:
    sink.count("tokens", 10, {"model": "m1"})
    sink.count("tokens_total", 5, {"model": "m1"})  # the same counter
    sink.observe("prompt_seconds", 1.5, {})
    sink.observe("prompt_seconds", 0.5, {})
    assert value(registry, "tokens_total", model="m1") == 15.0
    assert value(registry, "prompt_seconds_count") == 2.0
    assert value(registry, "prompt_seconds_sum") == 2.0


def test_user_label_names_are_fixed_by_the_first_call(sink: MetricsSink) -> None:
    sink.count("calls", 1, {"model": "m1", "tool": "t"})
    sink.count("calls", 1, {"tool": "t", "model": "m2"})  # order does not matter
    with pytest.raises(ConfigurationError, match=r"'calls'.*\['model', 'tool'\].*\['model'\]"):
        sink.count("calls", 1, {"model": "m1"})
    with pytest.raises(ConfigurationError, match="'calls' is a counter"):
        sink.observe("calls", 1, {"model": "m1", "tool": "t"})


def test_the_bus_reports_a_label_mismatch_once_and_keeps_counting(
    sink: MetricsSink, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    bus = ObservabilityBus("svc", [sink])
    bus.count("tool_calls", tool="search")
    with caplog.at_level(logging.ERROR, "llmgine_celery.observability"):
        bus.count("tool_calls", model="m")
        bus.count("tool_calls", model="m")
    bus.count("tool_calls", 2, tool="search")
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert "tool_calls" in caplog.text and "['tool']" in caplog.text
    assert value(registry, "tool_calls_total", tool="search") == 3.0


@pytest.mark.parametrize(
    ("kind", "name", "labels", "complaint"),
    [
        ("count", "bad-name", {}, "metric name 'bad-name'"),
        ("count", "", {}, "metric name ''"),
        ("count", "ok", {"bad label": "x"}, "label name 'bad label'"),
        ("count", "ok", {"__reserved": "x"}, "label name '__reserved'"),
        ("observe", "ok_hist", {"le": "1"}, "label name 'le'"),
        ("count", "llmgine_command", {"command_type": "x", "outcome": "y"}, "llmgine's own"),
        ("observe", "celery_task_runtime", {}, "llmgine's own"),
    ],
)
def test_user_metrics_refuse_bad_and_reserved_names(
    sink: MetricsSink, kind: str, name: str, labels: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        getattr(sink, kind)(name, 1, labels)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(float(bound))
