"""TaskObserver: Celery task signals of llmgine tasks become the documented records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from celery import signals as celery_signals

from llmgine_celery.bus import results, topology
from llmgine_celery.bus.correlation import from_headers, outgoing_headers
from llmgine_celery.observability import context, records, signals
from llmgine_celery.observability.bus import ObservabilityBus, Record, Sink
from llmgine_celery.observability.observer import TaskObserver

HANDLER_TASK = "llmgine.event.listeners.heard"


class Keep(Sink):
    def __init__(self) -> None:
        self.records: list[Record] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)


@dataclass
class Request:
    """The parts of a Celery task request the observer reads."""

    id: str
    retries: int = 0
    hostname: str = "w1@host"
    delivery_info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)


def observer() -> tuple[TaskObserver, Keep]:
    keep = Keep()
    return (
        TaskObserver(
            ObservabilityBus("svc", [keep]),
            command_prefix=topology.COMMAND_TASK_PREFIX,
            handler_names={HANDLER_TASK: ("listeners", "heard")},
            correlation_from=from_headers,
            header_names=topology.CORRELATION_HEADERS,
        ),
        keep,
    )


def command_request(command_id: str, trace_id: str) -> Request:
    return Request(
        id=command_id,
        delivery_info={"routing_key": topology.COMMAND_QUEUE},
        headers={  # as a command's message: its id is the task id, no header of its own
            topology.HEADER_TRACE_ID: trace_id,
            topology.HEADER_SESSION_ID: "s1",
            topology.HEADER_PARENT_SPAN_ID: "p" * 16,
        },
    )


def test_a_command_run_is_started_then_result_with_its_ids_and_trace() -> None:
    watch, keep = observer()
    request = command_request("c1", "a" * 32)
    watch.started("llmgine.command.Ask", request)
    inside = context.current()
    watch.succeeded("llmgine.command.Ask", request, {"success": True, "command_id": "c1"})
    watch.ended(request)
    started, result = keep.records
    assert (started.event, result.event) == (records.COMMAND_STARTED, records.COMMAND_RESULT)
    for record in (started, result):
        assert record.fields["command_id"] == record.fields["task_id"] == "c1"
        assert record.fields["command_type"] == "Ask"
        assert record.fields["trace_id"] == "a" * 32
        assert record.fields["session_id"] == "s1"
        assert record.fields["queue"] == topology.COMMAND_QUEUE
        assert record.fields["parent_span_id"] == "p" * 16
    assert result.fields["outcome"] == "success" and result.fields["state"] == "succeeded"
    assert result.fields["duration_ms"] >= 0
    assert inside is not None and inside.causation_id == "c1" and inside.trace_id == "a" * 32
    assert context.current() is None


def test_what_a_handler_sends_joins_its_trace_with_it_as_cause() -> None:
    watch, _ = observer()
    request = command_request("c2", "b" * 32)
    watch.started("llmgine.command.Ask", request)
    sent = outgoing_headers()
    here = context.current()
    watch.ended(request)
    assert here is not None
    assert sent == {
        topology.HEADER_TRACE_ID: "b" * 32,
        topology.HEADER_PARENT_SPAN_ID: here.span_id,
        topology.HEADER_CAUSATION_ID: "c2",
    }
    fresh = outgoing_headers()  # outside any handler: a new trace
    assert fresh[topology.HEADER_TRACE_ID] != "b" * 32 and len(fresh) == 1


def test_failure_results_are_told_apart_by_outcome() -> None:
    watch, keep = observer()
    cases = {
        "failure": {"success": False, "error": "RuntimeError: x", "metadata": {}},
        "no_handler": {
            "success": False,
            "error": "no handler",
            "metadata": {"reason": "no_handler"},
        },
        "invalid": {"success": False, "error": "bad", "metadata": {"reason": "invalid_message"}},
    }
    for n, result in enumerate(cases.values()):
        request = command_request(f"c{n}", "c" * 32)
        watch.started("llmgine.command.Ask", request)
        watch.succeeded("llmgine.command.Ask", request, result)
        watch.ended(request)
    outcomes = [r.fields["outcome"] for r in keep.records if r.event == records.COMMAND_RESULT]
    assert outcomes == list(cases)


def test_a_result_stored_as_text_is_told_by_the_outcome_its_task_left() -> None:
    watch, keep = observer()
    request = command_request("c9", "d" * 32)
    watch.started("llmgine.command.Ask", request)
    failed = results.no_handler("c9", "Ask")
    request.llmgine_outcome = results.outcome_of(failed)  # type: ignore[attr-defined]
    watch.succeeded("llmgine.command.Ask", request, results.to_text(failed))
    watch.ended(request)
    result = keep.records[-1]
    assert result.fields["outcome"] == "no_handler" and result.fields["error"] == failed.error


def test_handler_runs_name_group_handler_and_event() -> None:
    watch, keep = observer()
    headers = {topology.HEADER_EVENT_ID: "e1", topology.HEADER_MESSAGE_TYPE: "Answered"}
    first = Request(id="e1:listeners:heard", headers=headers)
    watch.started(HANDLER_TASK, first)
    watch.retried(HANDLER_TASK, first, ValueError("flaky"))
    watch.ended(first)
    again = Request(id="e1:listeners:heard", retries=1, headers=headers)
    watch.started(HANDLER_TASK, again)
    watch.failed(HANDLER_TASK, again, ValueError("flaky"))
    watch.ended(again)
    names = [r.event for r in keep.records]
    assert names == [
        records.HANDLER_STARTED,
        records.HANDLER_RETRIED,
        records.HANDLER_STARTED,
        records.HANDLER_FAILED,
    ]
    for record in keep.records:
        assert record.fields["event_id"] == "e1" and record.fields["event_type"] == "Answered"
        assert (record.fields["group"], record.fields["handler"]) == ("listeners", "heard")
    retried, failed = keep.records[1], keep.records[3]
    assert retried.fields["exception"] == "ValueError" and retried.fields["retries"] == 0
    assert failed.fields["retries"] == 1 and failed.fields["state"] == "failed"


def test_a_skipped_copy_is_recorded_as_skipped() -> None:
    watch, keep = observer()
    request = Request(id="e2:listeners:heard", headers={topology.HEADER_EVENT_ID: "e2"})
    watch.started(HANDLER_TASK, request)
    request.llmgine_skipped = True  # type: ignore[attr-defined]
    watch.succeeded(HANDLER_TASK, request, None)
    assert keep.records[-1].event == records.HANDLER_SKIPPED


def test_other_tasks_keep_the_generic_names() -> None:
    watch, keep = observer()
    request = Request(id="t1")
    watch.sent("app.cleanup", {"id": "t1"}, "celery")
    watch.started("app.cleanup", request)
    watch.succeeded("app.cleanup", request, 3)
    watch.ended(request)
    assert [r.event for r in keep.records] == [
        records.TASK_SENT,
        records.TASK_STARTED,
        records.TASK_SUCCEEDED,
    ]
    assert "command_id" not in keep.records[1].fields


def test_queue_wait_counts_from_the_send_or_from_a_retrys_eta() -> None:
    watch, keep = observer()
    now = time.time()
    sent = command_request("c9", "d" * 32)
    sent.headers[topology.HEADER_SENT_AT] = now - 2.0
    watch.started("llmgine.command.Ask", sent)
    watch.ended(sent)
    retry = command_request("c9", "d" * 32)
    retry.headers[topology.HEADER_SENT_AT] = now - 2.0
    retry.eta = datetime.fromtimestamp(now - 0.5, UTC).isoformat()  # type: ignore[attr-defined]
    watch.started("llmgine.command.Ask", retry)
    watch.ended(retry)
    first, second = (r.fields["queue_wait_ms"] for r in keep.records)
    assert 2000 <= first < 3000  # waited since it was sent
    assert 500 <= second < 1500  # the backoff before the ETA is no wait


def test_every_publish_is_stamped_with_its_own_send_time() -> None:
    headers: dict[str, Any] = {topology.HEADER_SENT_AT: 1.0}  # a retry keeps the first stamp
    signals.observe(object.__new__(type("App", (), {})), observer()[0], topology.HEADER_SENT_AT)
    before = time.time()
    celery_signals.before_task_publish.send(sender="llmgine.command.Ask", headers=headers, body=())
    assert headers[topology.HEADER_SENT_AT] >= before


def test_a_sent_record_is_dated_when_the_message_was_stamped_not_after_the_publish() -> None:
    watch, keep = observer()
    stamped = time.time() - 5.0  # as if the publish itself had taken five seconds
    watch.sent("llmgine.command.Ask", {"id": "c7", topology.HEADER_SENT_AT: stamped}, "q")
    (sent,) = keep.records
    assert datetime.fromisoformat(sent.ts).timestamp() == pytest.approx(stamped, abs=1e-3)
