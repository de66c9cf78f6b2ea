"""Sentry with real workers: errors captured once, one trace from producer to worker, crons.

The worker (``tests.integration.sentry_apps``) runs with ``SENTRY_DSN`` set to a
host that never resolves and a transport that appends envelopes to a file; the
producer (this process) records its envelopes in a list. Nothing is sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import sentry_sdk
from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import crontab
from pydantic import SecretStr
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from llmgine_celery import ApplicationConfig, CommandResult
from llmgine_celery.bus import topology
from llmgine_celery.messages.envelope import encode
from llmgine_celery.observability import sentry
from tests.integration.sentry_apps import (
    APP_NAME,
    FAKE_DSN,
    IMPORT_CONSUMER_FIRST_ENV,
    RECORD_ENV,
    Calm,
    Doomed,
    Explode,
    SentryApp,
    envelope_json,
)
from tests.support import (
    BROKERS_AND_POOLS,
    DEPLOYMENTS,
    WorkerProcess,
    broker_and_pool_id,
    producer_settings,
    start_worker,
    wait_for,
)

T = TypeVar("T")

pytestmark = pytest.mark.integration


class Recording(Transport):
    """The producer's transport: envelopes kept in a list."""

    sent: ClassVar[list[dict[str, Any]]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        Recording.sent.append(envelope_json(envelope))


def items(envelopes: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The payloads of one item type (event, transaction, check_in)."""
    return [i["payload"] for e in envelopes for i in e["items"] if i["type"] == kind]


@dataclass
class SentryDeployment:
    """A producer app in this process and a worker process, both reporting to Sentry."""

    broker_name: str
    app: SentryApp
    worker: WorkerProcess
    record: Path

    def worker_envelopes(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def worker_items(self, kind: str) -> list[dict[str, Any]]:
        return items(self.worker_envelopes(), kind)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(_then_close(self.app, coro))

    def transactions_of(self, task_id: str, count: int = 1) -> list[dict[str, Any]]:
        """The worker's transactions of task ``task_id``, once ``count`` have arrived."""

        def found() -> list[dict[str, Any]]:
            runs = [t for t in self.worker_items("transaction") if _task_id(t) == task_id]
            return runs if len(runs) >= count else []

        return wait_for(found, timeout=30, what=f"{count} transaction(s) of task {task_id}")


async def _then_close(app: SentryApp, coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        await app.message_bus.aclose()


def _task_id(payload: dict[str, Any]) -> str | None:
    tags: dict[str, Any] = payload.get("tags") or {}
    return tags.get("celery_task_id")


def _trace_id(payload: dict[str, Any]) -> str:
    trace_id: str = payload["contexts"]["trace"]["trace_id"]
    return trace_id


def _errors(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in payloads if p.get("level") in {"error", "fatal"}]


def purge(app: SentryApp) -> None:
    """Drop messages earlier runs left on this application's queues."""
    app.declare()
    with app.celery.connection_for_write() as conn:
        for name in (
            topology.COMMAND_QUEUE,
            topology.handler_queue_name(APP_NAME),
            topology.group_queue_name(APP_NAME),
        ):
            conn.default_channel.queue_purge(name)


def producer(broker_name: str, tmp: Path) -> SentryApp:
    """The producer: Sentry initialised when its Celery app is built, as in a web process."""
    settings = producer_settings(broker_name, tmp).model_copy(
        update={"sentry_dsn": SecretStr(FAKE_DSN), "sentry_monitor_beat_tasks": True}
    )
    config = ApplicationConfig(
        name=APP_NAME, settings=settings, sentry_options={"transport": Recording}
    )
    app = SentryApp(config)
    app.celery  # noqa: B018  (builds the app, which initialises Sentry)
    assert sentry.is_active()
    return app


def worker_env(record: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "SENTRY_DSN": FAKE_DSN,
        RECORD_ENV: str(record),
        "LLMGINE_SENTRY_MONITOR_BEAT_TASKS": "true",
        "LLMGINE_DATA_DIR": str(data_dir),
        **extra,
    }


@pytest.fixture(scope="module", autouse=True)
def producer_sentry() -> Iterator[None]:
    """Sentry in this process for the module only."""
    sentry.close_sentry()
    Recording.sent = []
    yield
    sentry.close_sentry()


@pytest.fixture(scope="module", params=BROKERS_AND_POOLS, ids=broker_and_pool_id)
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SentryDeployment]:
    broker_name, pool = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    tmp = tmp_path_factory.mktemp(f"sentry-{broker_name}-{pool}")
    app = producer(broker_name, tmp)
    purge(app)
    record = tmp / "worker-envelopes.jsonl"
    worker = start_worker(
        "tests.integration.sentry_apps:celery",
        broker,
        backend,
        pool=pool,
        concurrency=2,
        log_dir=tmp,
        env=worker_env(record, tmp / "worker-data"),
    )
    try:
        yield SentryDeployment(broker_name, app, worker, record)
    finally:
        worker.stop()
        app.celery.close()


def test_a_failing_command_is_one_error_event_on_the_callers_trace(
    deployment: SentryDeployment,
) -> None:
    """Two views in a row on one loop: each worker transaction continues its own view's trace.

    Both sends go through the same publisher thread, so headers taken from that
    thread's scope, rather than from the caller's, would give both one trace.
    """
    broker_url = deployment.app.settings.broker()
    bus = deployment.app.message_bus
    commands = [Explode(message=f"attempt {n}: {FAKE_DSN} via {broker_url}") for n in range(2)]

    async def views() -> list[tuple[str, CommandResult]]:
        done = []
        for n, command in enumerate(commands):
            with sentry_sdk.start_transaction(op="http.server", name=f"view {n}") as view:
                done.append((view.trace_id, await bus.execute(command, timeout=30)))
        return done

    for command, (trace_id, result) in zip(commands, deployment.run(views()), strict=True):
        assert not result.success
        (run,) = deployment.transactions_of(command.id)
        assert _trace_id(run) == trace_id
        assert run["transaction"] == "llmgine.command.Explode"
        events = [e for e in deployment.worker_items("event") if _task_id(e) == command.id]
        (error,) = _errors(events)
        assert error["tags"]["command_id"] == command.id
        assert error["tags"]["command_type"] == "Explode"
        assert error["tags"]["llmgine.trace_id"]
        (exception,) = error["exception"]["values"]
        assert exception["type"] == "ValueError"
        assert exception["value"] == f"{command.message.split(':')[0]}: *** via ***"
        assert _trace_id(error) == trace_id
    wire = deployment.record.read_text()
    assert FAKE_DSN not in wire
    assert broker_url not in wire
    # the producer saw a failed result, not an error of its own
    assert not _errors(items(Recording.sent, "event"))


def test_a_send_outside_any_transaction_records_the_producers_span(
    deployment: SentryDeployment,
) -> None:
    command = Calm(n=21)
    result = deployment.run(deployment.app.message_bus.execute(command, timeout=30))
    assert result.success and result.result == 42
    (run,) = deployment.transactions_of(command.id)
    mine = [t for t in items(Recording.sent, "transaction") if _trace_id(t) == _trace_id(run)]
    assert mine, "no producer transaction shares the worker's trace"
    assert run["contexts"]["trace"]["parent_span_id"] in {
        span_id
        for t in mine
        for span_id in [t["contexts"]["trace"]["span_id"], *(s["span_id"] for s in t["spans"])]
    }


def test_a_handler_failing_after_its_retries_is_captured_once(
    deployment: SentryDeployment,
) -> None:
    event = Doomed(text="no hope")
    with sentry_sdk.start_transaction(op="http.server", name="publisher") as view:
        deployment.run(deployment.app.message_bus.publish(event))
    task_id = topology.handler_task_id(event.id, APP_NAME, "doomed")
    runs = deployment.transactions_of(task_id, count=3)  # the first run and two retries
    assert len(runs) == 3
    statuses = sorted(r["contexts"]["trace"]["status"] for r in runs)
    assert statuses == ["aborted", "aborted", "internal_error"]  # Retry is control flow
    assert {_trace_id(r) for r in runs} == {view.trace_id}
    events = [e for e in deployment.worker_items("event") if _task_id(e) == task_id]
    (error,) = _errors(events)
    (exception,) = error["exception"]["values"]
    assert (exception["type"], exception["value"]) == ("RuntimeError", "doomed: no hope")
    assert exception["mechanism"] == {"type": "celery", "handled": False}
    assert error["tags"]["event_id"] == event.id
    assert error["tags"]["group"] == APP_NAME
    assert error["tags"]["handler"] == "doomed"


def test_beat_entries_are_cron_check_ins(deployment: SentryDeployment) -> None:
    """Beat's Scheduler sends the entries here; the worker checks the runs in."""
    celery = deployment.app.celery
    scheduler = Scheduler(celery, lazy=True)
    entries = {
        "calm-cron": Calm(n=1),
        "explode-cron": Explode(message="scheduled failure"),
    }
    # beat runs in a process of its own: the integration renames the isolation scope
    with sentry_sdk.isolation_scope():
        for name, command in entries.items():
            entry = ScheduleEntry(
                name=name,
                task=topology.command_task_name(type(command).__name__),
                schedule=crontab(minute="*/5"),
                args=(encode(command),),
                app=celery,
            )
            scheduler.apply_entry(entry, producer=None)
    started = {
        c["monitor_slug"]: c["check_in_id"]
        for c in items(Recording.sent, "check_in")
        if c["status"] == "in_progress"
    }
    assert set(entries) <= set(started)

    def finished() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for check_in in deployment.worker_items("check_in"):
            if check_in["check_in_id"] in started.values():
                seen.setdefault(check_in["monitor_slug"], []).append(check_in["status"])
        return seen if set(seen) == set(entries) else {}

    seen = wait_for(finished, timeout=30, what="check-ins of both cron runs")
    # the command task succeeds either way: its handler's failure makes the run an error
    assert seen == {"calm-cron": ["ok"], "explode-cron": ["error"]}


@pytest.fixture(scope="module")
def late_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentryDeployment]:
    """A threads-pool worker whose process imported Celery's consumer before Sentry."""
    broker, backend = DEPLOYMENTS["rabbitmq"]
    tmp = tmp_path_factory.mktemp("sentry-late")
    app = producer("rabbitmq", tmp)
    purge(app)
    record = tmp / "worker-envelopes.jsonl"
    env = worker_env(record, tmp / "worker-data", **{IMPORT_CONSUMER_FIRST_ENV: "1"})
    worker = start_worker(
        "tests.integration.sentry_apps:celery",
        broker,
        backend,
        pool="threads",
        concurrency=2,
        log_dir=tmp,
        env=env,
    )
    try:
        yield SentryDeployment("rabbitmq", app, worker, record)
    finally:
        worker.stop()
        app.celery.close()


def test_a_consumer_imported_before_sentry_still_reports(late_worker: SentryDeployment) -> None:
    command = Explode(message="late but seen")
    result = late_worker.run(late_worker.app.message_bus.execute(command, timeout=30))
    assert not result.success
    (run,) = late_worker.transactions_of(command.id)
    assert run["transaction"] == "llmgine.command.Explode"
    events = [e for e in late_worker.worker_items("event") if _task_id(e) == command.id]
    assert len(_errors(events)) == 1
