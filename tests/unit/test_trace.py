"""The causal tree of ``llmgine-celery trace``, built from synthetic records."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from llmgine_celery.observability.trace import Node, Run, TraceIndex, build_trace
from llmgine_celery.observability.trace_render import render, to_json

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
TRACE = "a" * 32


@dataclass
class Log:
    """Records as the signal receivers write them, with a clock in milliseconds."""

    records: list[dict[str, Any]] = field(default_factory=list)
    ms: float = 0.0

    def add(self, event: str, where: tuple[str, str, int], **fields: Any) -> dict[str, Any]:
        self.ms += 1
        service, host, pid = where
        record = {
            "ts": (T0 + timedelta(milliseconds=self.ms)).isoformat(),
            "level": "INFO",
            "event": event,
            "service": service,
            "hostname": host,
            "pid": pid,
            "trace_id": TRACE,
            **fields,
        }
        self.records.append(record)
        return record

    def command(
        self, cid: str, ctype: str, by: tuple[str, str, int], on: tuple[str, str, int], **kw: Any
    ) -> str:
        """A command sent by ``by`` and run on ``on``; returns the run's span id."""
        span = f"span-{cid}"
        ids = {"task_id": cid, "command_id": cid, "command_type": ctype}
        sent_extra = {k: kw[k] for k in ("causation_id", "parent_span_id") if k in kw}
        self.add("command.sent", by, **ids, queue="llmgine.commands", **sent_extra)
        run = {**ids, "span_id": span, "retries": 0, "worker": f"celery@{on[1]}"}
        self.add("command.started", on, **run, queue_wait_ms=2.5)
        outcome = kw.get("outcome", "success")
        result = {"outcome": outcome, "duration_ms": 10.0, "error": kw.get("error")}
        self.add("command.result", on, **run, **{k: v for k, v in result.items() if v})
        return span

    def published(self, eid: str, etype: str, by: tuple[str, str, int], **kw: Any) -> None:
        self.add("event.published", by, event_id=eid, event_type=etype, **kw)

    def handler(
        self, eid: str, group: str, name: str, on: tuple[str, str, int], ends: list[str]
    ) -> list[str]:
        """Attempts of one handler, ending as ``ends`` says; returns their span ids."""
        spans = []
        for retries, end in enumerate(ends):
            span = f"span-{eid}-{group}-{name}-{retries}"
            spans.append(span)
            ids = {
                "task_id": f"{eid}:{group}:{name}",
                "event_id": eid,
                "group": group,
                "handler": name,
                "retries": retries,
                "span_id": span,
            }
            self.add("handler.started", on, **ids, queue_wait_ms=1.0)
            error = {"error": f"boom {retries}", "exception": "RuntimeError"}
            self.add(
                f"handler.{end}",
                on,
                **ids,
                duration_ms=3.0,
                **(error if end != "succeeded" else {}),
            )
        return spans


WEB = ("web", "web-host", 100)
WORKER = ("app", "worker-host", 200)
ALPHA = ("alpha", "alpha-host", 300)
BETA = ("beta", "beta-host", 400)


def scenario() -> Log:
    """C1 publishes E1; alpha handles it (one handler retried then dead-lettered);
    beta's handler publishes E2 and executes C2, which publishes E3."""
    log = Log()
    c1_span = log.command("C1", "Shout", WEB, WORKER)
    log.published("E1", "Said", WORKER, causation_id="C1", parent_span_id=c1_span)
    log.handler("E1", "alpha", "said", ALPHA, ["succeeded"])
    log.handler("E1", "alpha", "flaky", ALPHA, ["retried", "retried", "failed"])
    log.add(
        "dead_letter",
        ALPHA,
        event_id="E1",
        group="alpha",
        handler="flaky",
        kind="handler_failed",
        reason="handler flaky of group alpha failed 3 times",
    )
    (beta_span,) = log.handler("E1", "beta", "chain", BETA, ["succeeded"])
    log.published("E2", "Chained", BETA, causation_id="E1", parent_span_id=beta_span)
    c2_span = log.command("C2", "Nested", BETA, WORKER, causation_id="E1", parent_span_id=beta_span)
    log.published("E3", "Done", WORKER, causation_id="C2", parent_span_id=c2_span)
    return log


def tree(records: list[dict[str, Any]], root: str) -> Node:
    index = TraceIndex(records)
    (key,) = index.resolve(root)
    return build_trace(index, key).root


def run_of(node: Node, group: str, handler: str) -> Run:
    (run,) = [r for r in node.runs if (r.group, r.handler) == (group, handler)]
    return run


def test_a_command_shows_its_sender_run_events_and_their_handler_runs() -> None:
    root = tree(scenario().records, "C1")

    assert (root.kind, root.id, root.type, root.trace_id) == ("command", "C1", "Shout", TRACE)
    assert root.sent is not None and root.sent["service"] == "web"
    (run,) = root.runs
    (attempt,) = run.attempts
    assert attempt.status == "success"
    assert (attempt.get("hostname"), attempt.get("pid")) == ("worker-host", 200)
    assert (attempt.get("duration_ms"), attempt.get("queue_wait_ms")) == (10.0, 2.5)
    (event,) = run.caused
    assert (event.kind, event.id, event.type, event.cause) == ("event", "E1", "Said", "C1")
    assert [(r.group, r.handler) for r in event.runs] == [
        ("alpha", "said"),
        ("alpha", "flaky"),
        ("beta", "chain"),
    ]
    assert run_of(event, "alpha", "said").status == "succeeded"


def test_a_handler_retried_then_failed_and_dead_lettered() -> None:
    root = tree(scenario().records, "C1")
    flaky = run_of(root.runs[0].caused[0], "alpha", "flaky")

    assert [a.status for a in flaky.attempts] == ["retried", "retried", "failed"]
    assert [a.get("retries") for a in flaky.attempts] == [0, 1, 2]
    assert flaky.attempts[-1].get("error") == "boom 2"
    assert [d["kind"] for d in flaky.dead_letters] == ["handler_failed"]
    text = render(build_trace(TraceIndex(scenario().records), ("command", "C1")))
    assert "alpha/flaky: failed after 3 attempts, dead-lettered" in text
    assert "attempt 3: failed" in text and "boom 2" in text
    assert "dead_letter" in text and "failed 3 times" in text


def test_messages_sent_by_an_event_handler_hang_under_its_run() -> None:
    root = tree(scenario().records, "C1")
    chain = run_of(root.runs[0].caused[0], "beta", "chain")

    assert [(n.kind, n.id) for n in chain.caused] == [("event", "E2"), ("command", "C2")]
    nested = chain.caused[1]
    assert nested.cause == "E1" and nested.type == "Nested"
    assert [(n.kind, n.id) for n in nested.runs[0].caused] == [("event", "E3")]
    assert root.runs[0].caused[0].caused == []  # nothing left unattributed


def test_without_span_ids_a_caused_message_hangs_under_its_cause() -> None:
    records = [
        {k: v for k, v in r.items() if k not in {"span_id", "parent_span_id"}}
        for r in scenario().records
    ]
    event = tree(records, "C1").runs[0].caused[0]  # a command's only run still takes it

    assert [(n.kind, n.id) for n in event.caused] == [("event", "E2"), ("command", "C2")]
    assert all(r.caused == [] for r in event.runs)


def test_input_order_does_not_change_the_tree() -> None:
    records = scenario().records
    expected = to_json(build_trace(TraceIndex(records), ("command", "C1")))
    shuffled = list(records)
    random.Random(4).shuffle(shuffled)

    assert to_json(build_trace(TraceIndex(shuffled), ("command", "C1"))) == expected
    assert json.loads(json.dumps(expected)) == expected  # plain JSON data


def test_runs_and_caused_messages_are_in_time_order() -> None:
    log = scenario()
    log.published("E0", "Late", WORKER, causation_id="C1", parent_span_id="span-C1")
    root = tree(log.records, "C1")

    assert [n.id for n in root.runs[0].caused] == ["E1", "E0"]
    starts = [a.ts for r in root.runs[0].caused[0].runs for a in r.attempts[:1]]
    assert starts == sorted(starts)


def test_the_producer_log_missing_still_shows_the_worker_side() -> None:
    records = [r for r in scenario().records if r["service"] != "web"]
    root = tree(records, "C1")

    assert root.sent is None and root.type == "Shout"
    assert root.runs[0].attempts[0].status == "success"
    assert root.runs[0].caused[0].id == "E1"
    text = render(build_trace(TraceIndex(records), ("command", "C1")))
    assert "sent: no record" in text and "worker-host pid 200" in text


def test_an_event_published_record_missing_is_found_through_its_handler_records() -> None:
    log = scenario()
    records = [
        r for r in log.records if r.get("event_id") != "E1" or r["event"] != "event.published"
    ]
    for r in records:  # as the worker writes them: the event's cause comes in the headers
        if r.get("event_id") == "E1":
            r["causation_id"] = "C1"
    event = tree(records, "C1").runs[0].caused
    assert [n.id for n in event] == ["E1"] and event[0].sent is None


def test_an_event_id_is_a_root_too_and_names_its_cause() -> None:
    index = TraceIndex(scenario().records)
    assert index.resolve("E1") == [("event", "E1")]
    assert index.resolve("E1:alpha:flaky") == [("event", "E1")]  # a handler task id
    trace = build_trace(index, ("event", "E1"))

    assert trace.root.cause == "C1"
    assert "caused by command C1" in render(trace)
    assert trace.detached == []  # its cause is logged: not a message of unknown cause


def test_unknown_and_prefix_ids() -> None:
    log = Log()
    log.command("0123abcd", "A", WEB, WORKER)
    log.command("0123ffff", "B", WEB, WORKER)
    index = TraceIndex(log.records)

    assert index.resolve("nope") == []
    assert index.resolve("0123a") == [("command", "0123abcd")]
    assert index.resolve("0123") == [("command", "0123abcd"), ("command", "0123ffff")]
    assert index.resolve("012") == []  # too short to guess


def test_duplicate_records_count_once() -> None:
    records = scenario().records
    once = to_json(build_trace(TraceIndex(records), ("command", "C1")))
    twice = to_json(
        build_trace(TraceIndex(records + [dict(r) for r in records]), ("command", "C1"))
    )
    assert twice == once


def test_causation_cycles_do_not_loop() -> None:
    log = Log()
    log.published("X", "Ping", WORKER, causation_id="Y")
    log.published("Y", "Pong", WORKER, causation_id="X")
    log.published("Z", "Self", WORKER, causation_id="Z")
    index = TraceIndex(log.records)
    trace = build_trace(index, ("event", "X"))

    (child,) = trace.root.caused
    assert child.id == "Y" and [n.id for n in child.caused] == ["X"]
    assert child.caused[0].repeated
    assert "shown above" in render(trace)
    assert build_trace(index, ("event", "Z")).root.caused == []


def test_messages_of_the_trace_with_an_unknown_cause_are_listed_apart() -> None:
    log = scenario()
    log.published("LOST", "Orphan", BETA, causation_id="never-logged")
    trace = build_trace(TraceIndex(log.records), ("command", "C1"))

    assert [n.id for n in trace.detached] == ["LOST"]
    assert "cause not in these logs" in render(trace)


def test_concurrent_copies_of_a_command_pair_by_process() -> None:
    log = Log()
    ids = {"task_id": "C", "command_id": "C", "command_type": "Slow", "retries": 0}
    log.add("command.started", ("app", "h1", 1), **ids)
    log.add("command.started", ("app", "h2", 2), **ids)
    log.add("command.result", ("app", "h1", 1), **ids, outcome="success", duration_ms=5.0)
    log.add("command.result", ("app", "h2", 2), **ids, outcome="failure", error="no")
    (run,) = tree(log.records, "C").runs

    assert [(a.get("hostname"), a.status) for a in run.attempts] == [
        ("h1", "success"),
        ("h2", "failure"),
    ]
    assert "failure after 2 attempts" in render(
        build_trace(TraceIndex(log.records), ("command", "C"))
    )


def test_an_end_without_its_start_is_still_an_attempt() -> None:
    log = Log()
    ids = {"task_id": "E:g:h", "event_id": "E", "group": "g", "handler": "h", "retries": 0}
    log.add("handler.succeeded", ALPHA, **ids, duration_ms=1.0)
    log.add("handler.started", ALPHA, **{**ids, "retries": 1})
    (run,) = tree(log.records, "E").runs

    assert [a.status for a in run.attempts] == ["succeeded", "running"]


def test_what_a_handler_logged_shows_under_its_attempt() -> None:
    log = scenario()
    log.add("answering", WORKER, span_id="span-C1", prompt="hi there", causation_id="C1")
    log.add("span", WORKER, span="llm call", span_id="inner", parent_span_id="span-C1")
    log.add("thinking", WORKER, span_id="span-E1-alpha-flaky-1", step=2)
    log.add("elsewhere", WORKER, span_id="some-other-span")
    trace = build_trace(TraceIndex(log.records), ("command", "C1"))
    (attempt,) = trace.root.runs[0].attempts

    assert [r["event"] for r in attempt.logs] == ["answering", "span"]
    flaky = run_of(trace.root.runs[0].caused[0], "alpha", "flaky")
    assert [[r["event"] for r in a.logs] for a in flaky.attempts] == [[], ["thinking"], []]
    text = render(trace)
    assert "log INFO answering at +" in text and 'prompt="hi there"' in text
    assert "causation_id" not in text and "elsewhere" not in text
    assert to_json(trace)["root"]["runs"][0]["attempts"][0]["logs"][0]["prompt"] == "hi there"


def test_records_trace_does_not_use_are_ignored() -> None:
    log = scenario()
    log.add("worker.ready", WORKER, worker="celery@worker-host")
    log.add("span", WORKER, span="work", command_id="C1")
    log.add("noted: hello", WORKER, command_id="C1")
    assert to_json(build_trace(TraceIndex(log.records), ("command", "C1"))) == to_json(
        build_trace(TraceIndex(scenario().records), ("command", "C1"))
    )
