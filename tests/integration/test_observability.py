"""Records in the JSONL logs of a producer and real workers: lifecycle and correlation.

A producer in this process and a worker process write to one log folder; the
test reads the lines back and checks that each thing that happened made its
record, that a command's records on both sides share its ids and trace, and
that an event published by a handler carries the command as its cause.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmgine_celery import ApplicationConfig, Settings
from llmgine_celery.bus import topology
from llmgine_celery.messages.envelope import encode
from tests.integration.obs_apps import (
    APP_NAME,
    LISTENERS,
    PREFORK_QUEUE,
    ROUTED_NAME,
    Ask,
    Doomed,
    Fail,
    ObsApp,
    RoutedObsApp,
)
from tests.support import (
    DEPLOYMENTS,
    REPO,
    WorkerProcess,
    clean_env,
    execute_once,
    producer_settings,
    start_worker,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.integration

WAIT = 30.0


@dataclass
class Logged:
    """A producer and a worker writing JSONL into one folder."""

    broker_name: str
    app: ObsApp
    worker: WorkerProcess
    logs: Path

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (each line must be a whole JSON object)."""
        found = []
        for path in sorted(self.logs.glob("*.jsonl*")):
            for line in path.read_text().splitlines():
                found.append(json.loads(line))
        return found

    def where(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records() if all(r.get(k) == v for k, v in match.items())]

    def one(self, **match: Any) -> dict[str, Any]:
        """The one record matching ``match``, once it is there."""
        found = wait_for(lambda: self.where(**match), WAIT, what=f"a record {match}")
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def logged(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Logged]:
    broker_name = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    tmp = tmp_path_factory.mktemp(f"obs-{broker_name}")
    logs = tmp / "logs"
    base = producer_settings(broker_name, tmp)
    settings = Settings(**{**base.model_dump(), "broker_url": broker, "result_backend": backend,
                           "log_dir": logs, "metrics": False})  # fmt: skip
    app = ObsApp(ApplicationConfig(name=APP_NAME, settings=settings))
    app.declare()
    with app.celery.connection_for_write() as conn:
        names = [topology.COMMAND_QUEUE, topology.group_queue_name(LISTENERS),
                 topology.handler_queue_name(LISTENERS), topology.DEAD_LETTER_QUEUE]  # fmt: skip
        for name in names:
            conn.default_channel.queue_purge(name)
    worker = start_worker(
        "tests.integration.obs_apps:celery",
        broker,
        backend,
        log_dir=tmp,
        env={
            "LLMGINE_LOG_DIR": str(logs),
            "LLMGINE_METRICS": "false",
            "LLMGINE_COMMAND_EVENTS": "true",
        },
    )
    try:
        yield Logged(broker_name, app, worker, logs)
    finally:
        worker.stop()
        asyncio.run(app.shutdown())


def execute(app: ObsApp, command: Any) -> Any:
    return execute_once(app, command, WAIT)


def test_a_command_and_its_handler_run_share_ids_and_trace_across_processes(
    logged: Logged,
) -> None:
    command = Ask(prompt="hello", api_key="sk-very-secret", session_id="s-obs")
    result = execute(logged.app, command)
    assert result.success, result.error
    worker_pid = result.result

    sent = logged.one(event="command.sent", command_id=command.id)
    started = logged.one(event="command.started", command_id=command.id)
    finished = logged.one(event="command.result", command_id=command.id)
    assert sent["pid"] != worker_pid and started["pid"] == worker_pid == finished["pid"]
    for record in (sent, started, finished):
        assert record["task_id"] == command.id
        assert record["task_name"] == "llmgine.command.Ask"
        assert record["command_type"] == "Ask"
        assert record["session_id"] == "s-obs"
        assert record["service"] == APP_NAME
    assert len({sent["trace_id"], started["trace_id"], finished["trace_id"]}) == 1
    assert len(sent["trace_id"]) == 32
    assert finished["outcome"] == "success" and finished["duration_ms"] > 0
    assert started["queue"] == finished["queue"] == topology.COMMAND_QUEUE
    assert started["queue_wait_ms"] >= 0

    # the handler's own log line, on the handler loop, joins the command's span
    said = logged.one(event="answering", prompt="hello")
    assert said["trace_id"] == sent["trace_id"] and said["span_id"] == started["span_id"]
    assert said["causation_id"] == command.id

    # the event the handler published names the command as its cause, same trace
    published = logged.one(event="event.published", causation_id=command.id, event_type="Answered")
    assert published["event_type"] == "Answered"
    assert published["trace_id"] == sent["trace_id"]
    assert published["parent_span_id"] == started["span_id"]
    assert published["pid"] == worker_pid
    handled = logged.one(event="handler.succeeded", event_id=published["event_id"])
    assert handled["group"] == LISTENERS and handled["handler"] == "heard"
    assert handled["trace_id"] == sent["trace_id"]
    assert handled["task_name"] == f"llmgine.event.{LISTENERS}.heard"
    heard = logged.one(event="heard", causation_id=published["event_id"])
    assert heard["trace_id"] == sent["trace_id"]

    # secrets in a command's fields never reach the logs
    assert not any("sk-very-secret" in p.read_text() for p in logged.logs.glob("*.jsonl*"))


def test_a_failing_command_handler_is_recorded_as_a_failure_result(logged: Logged) -> None:
    command = Fail(why="no model")
    result = execute(logged.app, command)
    assert not result.success
    finished = logged.one(event="command.result", command_id=command.id)
    assert finished["outcome"] == "failure"
    assert finished["level"] == "WARNING"
    assert "error" not in logged.one(event="command.started", command_id=command.id)
    assert finished["error"] == "RuntimeError: no model"


def test_handler_retries_failure_and_dead_letter_each_make_one_record(logged: Logged) -> None:
    event = Doomed(text="x")
    logged.app.message_bus.publish_sync(event)
    failed = logged.one(event="handler.failed", event_id=event.id)
    assert failed["exception"] == "ValueError" and failed["retries"] == 2
    retried = logged.where(event="handler.retried", event_id=event.id)
    # one record per retry; two pool processes write them, and a retry 50 ms
    # later can be flushed first (each writer lingers 50 ms): not in file order
    assert sorted(r["retries"] for r in retried) == [0, 1]
    assert {r["trace_id"] for r in [*retried, failed]} == {failed["trace_id"]}
    dead = logged.one(event="dead_letter", event_id=event.id)
    assert dead["kind"] == "handler_failed" and dead["handler"] == "doomed"
    assert dead["attempts"] == 3 and dead["trace_id"] == failed["trace_id"]
    # the failure announcement joins the trace, caused by the event that failed
    announced = logged.one(event="event.published", causation_id=event.id)
    assert announced["event_type"] == "EventHandlerFailedEvent"
    assert announced["trace_id"] == failed["trace_id"]
    assert logged.one(event="event.published", event_id=event.id)["pid"] != failed["pid"]


def test_the_worker_records_that_it_is_ready(logged: Logged) -> None:
    ready = logged.one(event="worker.ready", worker=logged.worker.node)
    assert ready["worker_pid"] == logged.worker.proc.pid


def test_every_line_is_one_json_object_with_the_core_fields(logged: Logged) -> None:
    execute(logged.app, Ask(prompt="lines"))
    for record in logged.records():  # json.loads inside raises on a torn line
        assert {"ts", "level", "event", "service", "hostname", "pid"} <= record.keys()


def test_a_worker_start_and_stop_each_make_one_record(logged: Logged, tmp_path: Path) -> None:
    broker, backend = DEPLOYMENTS[logged.broker_name]
    other = start_worker(
        "tests.integration.obs_apps:celery",
        broker,
        backend,
        log_dir=tmp_path,
        concurrency=1,
        env={"LLMGINE_LOG_DIR": str(logged.logs), "LLMGINE_METRICS": "false"},
        extra_args=("-Q", "obs.unused"),
    )
    ready = logged.one(event="worker.ready", worker=other.node)
    other.stop()
    stopping = logged.one(event="worker.stopping", worker=other.node)
    assert ready["pid"] == stopping["pid"] == other.proc.pid


def test_celery_beat_records_its_start(logged: Logged, tmp_path: Path) -> None:
    broker, backend = DEPLOYMENTS[logged.broker_name]
    command = [sys.executable, "-m", "celery", "-A", "tests.integration.obs_apps:celery", "beat",
               "-s", str(tmp_path / "schedule"), "--pidfile", ""]  # fmt: skip
    env = clean_env(
        LLMGINE_BROKER_URL=broker,
        LLMGINE_RESULT_BACKEND=backend,
        LLMGINE_LOG_DIR=str(logged.logs),
        LLMGINE_METRICS="false",
        LLMGINE_DATA_DIR=str(tmp_path / "data"),
    )
    with (tmp_path / "beat.log").open("wb") as out:
        beat = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        started = logged.one(event="beat.started", pid=beat.pid)
        assert started["service"] == APP_NAME
    finally:
        stop_process(beat)


def test_prefork_children_share_the_rotating_file_without_losing_or_tearing_lines(
    logged: Logged, tmp_path: Path
) -> None:
    broker, backend = DEPLOYMENTS[logged.broker_name]
    logs = tmp_path / "prefork-logs"
    settings = logged.app.settings.model_copy(update={"log_jsonl": False})
    producer = RoutedObsApp(ApplicationConfig(name=ROUTED_NAME, settings=settings))
    producer.declare()
    worker = start_worker(
        "tests.integration.obs_apps:routed_celery",
        broker,
        backend,
        pool="prefork",
        concurrency=3,
        log_dir=tmp_path,
        env={
            "LLMGINE_LOG_DIR": str(logs),
            "LLMGINE_METRICS": "false",
            "LLMGINE_LOG_MAX_BYTES": "20000",  # rotates every ~15 records
            "LLMGINE_LOG_BACKUPS": "200",  # keeps them all, to count them
        },
        extra_args=("-Q", PREFORK_QUEUE),
    )
    commands = [Ask(prompt=f"p{i}") for i in range(150)]

    async def run_all() -> list[Any]:
        bus = producer.message_bus
        try:
            return list(await asyncio.gather(*(bus.execute(c, timeout=WAIT) for c in commands)))
        finally:
            await bus.aclose()

    try:
        results = asyncio.run(run_all())
        assert all(r.success for r in results), [r.error for r in results if not r.success][:3]
    finally:
        worker.stop()
        producer.celery.close()
    files = sorted(logs.glob("*.jsonl*"))
    assert len(files) > 3  # it did rotate
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    wanted = {c.id for c in commands}
    for event in ("command.started", "command.result"):
        ids = [r["command_id"] for r in lines if r["event"] == event and r["command_id"] in wanted]
        assert sorted(ids) == sorted(wanted), event  # each exactly once
    assert len({r["pid"] for r in lines if r["event"] == "command.result"}) > 1


def test_unknown_rejected_and_revoked_messages_each_make_one_record(logged: Logged) -> None:
    celery = logged.app.celery
    unknown_id, expired_id = str(uuid.uuid4()), str(uuid.uuid4())
    celery.send_task("llmgine.command.NoSuchCommand", args=[{}], task_id=unknown_id)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    envelope = encode(Ask(prompt="too late"))
    celery.send_task("llmgine.command.Ask", args=[envelope], task_id=expired_id, expires=past)
    with celery.producer_or_acquire() as producer:  # a message that is no task at all
        producer.publish({"hello": "world"}, routing_key=topology.COMMAND_QUEUE, exchange="")

    unknown = logged.one(event="task.unknown", task_id=unknown_id)
    assert unknown["level"] == "ERROR" and unknown["task_name"] == "llmgine.command.NoSuchCommand"
    revoked = logged.one(event="task.revoked", task_id=expired_id)
    assert revoked["reason"] == "expired" and revoked["state"] == "revoked"
    rejected = wait_for(lambda: logged.where(event="task.rejected"), WAIT, what="task.rejected")
    assert rejected[-1]["state"] == "rejected"


def test_command_lifecycle_events_reach_a_subscribed_group(logged: Logged) -> None:
    command = Ask(prompt="announce me")
    assert execute(logged.app, command).success
    heard = logged.one(event="command finished", command_id=command.id)
    assert heard["success"] is True and heard["command_type"] == "Ask"
    assert heard["trace_id"] == logged.one(event="command.sent", command_id=command.id)["trace_id"]
