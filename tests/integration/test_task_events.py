"""Task events reach monitors (Flower, ``celery events``): all of them, in batches, at shutdown too.

A test queue bound to Celery's ``celeryev`` exchange sees what Flower sees: each
message is one event or a batch (``task.multi``) of them.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from llmgine_celery import ApplicationConfig
from tests.integration.apps import APP_NAME, IntegrationApp, WhereAmI
from tests.integration.conftest import purge
from tests.support import (
    DEPLOYMENTS,
    RABBITMQ_URL,
    WorkerProcess,
    producer_settings,
    start_worker,
)

pytestmark = pytest.mark.integration

STAGES = ("task-received", "task-started", "task-succeeded")


class Monitor:
    """A queue of every task event the workers on the test vhost send."""

    def __init__(self, conn: Connection) -> None:
        self.messages = 0
        self.events: dict[str, set[str]] = defaultdict(set)
        exchange = Exchange("celeryev", type="topic")
        self._queue = Queue(exclusive=True, exchange=exchange, routing_key="task.#")
        self._consumer = conn.Consumer(self._queue, callbacks=[self._on_message], accept=["json"])
        self._conn = conn
        self._consumer.consume()

    def _on_message(self, body: Any, message: Any) -> None:
        self.messages += 1
        for event in body if isinstance(body, list) else [body]:
            self.events[event["uuid"]].add(event["type"])
        message.ack()

    def drain(self, until: float) -> None:
        """Take what has arrived, waiting for more until ``until`` (monotonic)."""
        while time.monotonic() < until:
            try:
                self._conn.drain_events(timeout=max(0.01, min(0.2, until - time.monotonic())))
            except TimeoutError:
                return

    def wait_for_all(self, ids: list[str], timeout: float) -> list[str]:
        """Ids still missing a stage after ``timeout`` seconds (empty when all came)."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [i for i in ids if not set(STAGES) <= self.events[i]]
            if not missing or time.monotonic() > deadline:
                return missing
            self.drain(min(deadline, time.monotonic() + 0.2))


@pytest.fixture
def producer(tmp_path: Path) -> Iterator[IntegrationApp]:
    app = IntegrationApp(
        ApplicationConfig(name=APP_NAME, settings=producer_settings("rabbitmq", tmp_path))
    )
    purge(app)
    yield app


def run_commands(app: IntegrationApp, n: int) -> list[str]:
    handles = [app.message_bus.send(WhereAmI(tag=f"events-{i}")) for i in range(n)]
    for handle in handles:
        assert handle.get(timeout=30).success
    return [h.command_id for h in handles]


@contextlib.contextmanager
def watched_worker(app_spec: str, log_dir: Path) -> Iterator[tuple[Monitor, WorkerProcess]]:
    """A monitor of the test vhost's task events, and a worker of ``app_spec`` (stopped after)."""
    broker, backend = DEPLOYMENTS["rabbitmq"]
    with Connection(RABBITMQ_URL) as conn:
        monitor = Monitor(conn)
        worker = start_worker(app_spec, broker, backend, log_dir=log_dir)
        try:
            yield monitor, worker
        finally:
            worker.stop()


def test_every_task_event_arrives_and_batches_carry_many(
    producer: IntegrationApp, tmp_path: Path
) -> None:
    with watched_worker("tests.integration.apps:celery", tmp_path) as (monitor, _):
        ids = run_commands(producer, 60)
        assert monitor.wait_for_all(ids, timeout=20) == []
    ours = sum(len(monitor.events[i]) for i in ids)
    assert ours == 3 * len(ids)
    # one message per event or two is what an unbatched worker sends under load
    assert monitor.messages * 4 <= ours, (monitor.messages, ours)


def test_events_still_buffered_at_shutdown_are_sent(
    producer: IntegrationApp, tmp_path: Path
) -> None:
    with watched_worker("tests.integration.linger_apps:celery", tmp_path) as (monitor, worker):
        ids = run_commands(producer, 10)
        worker.stop()  # within the 5 s the events linger
        assert worker.proc.returncode == 0
        assert monitor.wait_for_all(ids, timeout=10) == []
