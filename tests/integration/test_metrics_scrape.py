"""Metrics from real workers on RabbitMQ and Redis, scraped over HTTP.

A worker with ``LLMGINE_METRICS_PORT`` serves ``/metrics`` on 127.0.0.1; the
producer (this process) shares its data folder, so the scrape sums what both
recorded. Queue lengths are asked of the real brokers.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kombu
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from llmgine_celery import ApplicationConfig
from llmgine_celery.bus import topology
from llmgine_celery.observability.metrics import serve
from llmgine_celery.observability.metrics_server import broker_queue_lengths
from tests.integration.metrics_apps import (
    APP_NAME,
    Broken,
    Explode,
    MetricsApp,
    Pinged,
    Succeed,
)
from tests.support import (
    DEPLOYMENTS,
    WorkerProcess,
    listening_address,
    producer_settings,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.integration

SUCCEEDING, FAILING, PINGS, BROKEN = 5, 3, 4, 2
HOST = socket.gethostname()
#: seconds every handler run, dead letter and task end may take to be counted
SETTLE_TIMEOUT = 60.0


def scrape(url: str) -> list[Sample]:
    """Every sample ``url`` serves."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return [s for family in text_string_to_metric_families(body) for s in family.samples]


def scrape_once_served(url: str) -> list[Sample] | None:
    """What ``url`` serves, or None while nothing listens yet.

    A worker answers pings before its ``worker_ready`` handlers have bound the
    metrics port, so a test's first scrape may come too early.
    """
    try:
        return scrape(url)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return None
        raise


def total(samples: list[Sample], metric: str, /, **labels: str) -> float:
    """The sum of the samples named ``metric`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Served:
    """A producer and a worker sharing one data folder; the worker serves /metrics."""

    app: MetricsApp
    worker: WorkerProcess
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"


@pytest.fixture(
    params=[("rabbitmq", "prefork"), ("redis", "prefork"), ("rabbitmq", "threads")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    broker_name, pool = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    data = tmp_path / "data"
    app = MetricsApp(
        ApplicationConfig(name=APP_NAME, settings=producer_settings(broker_name, data))
    )
    with app.celery.connection_for_write() as conn:
        for queue in app.declare():  # what earlier runs left would be counted too
            conn.default_channel.queue_purge(queue)
    port = free_port()
    worker = start_worker(
        "tests.integration.metrics_apps:celery", broker, backend,
        pool=pool, concurrency=2, log_dir=tmp_path,
        env={"LLMGINE_METRICS_PORT": str(port), "LLMGINE_DATA_DIR": str(data)},
    )  # fmt: skip
    try:
        yield Served(app, worker, port, app.settings.metrics_folder)
    finally:
        worker.stop()
        app.celery.close()


async def traffic(app: MetricsApp) -> list[Any]:
    """Commands that succeed and fail, events whose handlers succeed and fail."""
    try:
        results = [await app.message_bus.execute(Succeed(n=n)) for n in range(SUCCEEDING)]
        results += [await app.message_bus.execute(Explode(why=f"no {n}")) for n in range(FAILING)]
        for n in range(PINGS):
            await app.message_bus.publish(Pinged(n=n))
        for n in range(BROKEN):
            await app.message_bus.publish(Broken(n=n))
        return results
    finally:
        await app.message_bus.aclose()


def test_a_worker_serves_what_it_and_the_producer_counted(served: Served) -> None:
    results = asyncio.run(traffic(served.app))
    assert [r.success for r in results] == [True] * SUCCEEDING + [False] * FAILING
    # The processes write their series one after another, so a scrape can fall
    # between two of them (a counter updated, its histogram not yet): scrape
    # until every figure holds, and show the last scrape's first miss if none did.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        samples = scrape_once_served(served.url)
        try:
            assert samples is not None, "the worker's metrics server is not answering"
            check_counted(samples)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert listening_address(served.port) == "127.0.0.1"


def check_counted(samples: list[Sample]) -> None:
    """What the traffic of ``traffic`` must have counted, worker and producer alike."""
    succeed = topology.command_task_name("Succeed")
    explode = topology.command_task_name("Explode")
    assert total(samples, "llmgine_event_handler_total", event_type="Pinged") == PINGS
    assert total(samples, "llmgine_dead_letter_total") == BROKEN
    # a task's run is counted before it ends: the active gauge drops last
    assert total(samples, "celery_worker_tasks_active", hostname=HOST) == 0.0
    # celery-exporter's series, labelled as its dashboards expect
    for name in ("received", "started", "succeeded"):
        assert total(samples, f"celery_task_{name}_total", name=succeed) == SUCCEEDING, name
    runs = total(samples, "celery_task_started_total", name=succeed, hostname=HOST)
    assert runs == SUCCEEDING
    assert total(samples, "celery_task_runtime_count", name=succeed) == SUCCEEDING
    assert total(samples, "celery_task_queue_wait_time_count", name=succeed) == SUCCEEDING
    ended = sum(
        total(samples, f"celery_task_{s}_total", name=explode) for s in ("succeeded", "failed")
    )
    assert ended == FAILING
    assert total(samples, "celery_worker_up", hostname=HOST) == 1.0
    # the producer's records, through the shared folder
    assert total(samples, "celery_task_sent_total", name=succeed) == SUCCEEDING
    assert total(samples, "llmgine_event_published_total", event_type="Pinged") == PINGS
    assert total(samples, "llmgine_event_published_total", event_type="Broken") == BROKEN
    # llmgine's series
    for outcome, count in (("success", SUCCEEDING), ("failure", FAILING)):
        assert total(samples, "llmgine_command_total", outcome=outcome) == count, outcome
    timed = total(samples, "llmgine_command_duration_seconds_count", command_type="Succeed")
    assert timed == SUCCEEDING
    handler = "llmgine_event_handler_duration_seconds_count"
    assert total(samples, handler, event_type="Pinged", group=APP_NAME) == PINGS
    assert total(samples, handler, event_type="Broken") == 2 * BROKEN  # a retry, then the end
    for outcome in ("retried", "failed"):
        runs = total(samples, "llmgine_event_handler_total", event_type="Broken", outcome=outcome)
        assert runs == BROKEN, outcome


def test_a_stopped_worker_leaves_worker_up_0_in_the_folder(served: Served) -> None:
    def up() -> bool:
        samples = scrape_once_served(served.url)
        return samples is not None and total(samples, "celery_worker_up", hostname=HOST) == 1.0

    wait_for(up, what="the worker to serve celery_worker_up 1")
    served.worker.stop()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(served.folder))
    assert registry.get_sample_value("celery_worker_up", {"hostname": HOST}) == 0.0


@pytest.mark.parametrize("broker_name", ["rabbitmq", "redis"])
def test_queue_lengths_come_from_the_broker(broker_name: str, tmp_path: Path) -> None:
    producer_settings(broker_name, tmp_path)  # skips when the server is away
    url = DEPLOYMENTS[broker_name][0]
    name = f"metrics-test-{uuid.uuid4().hex[:8]}"
    queue = kombu.Queue(name, kombu.Exchange(name, "direct"), routing_key=name)
    waiting = 3
    with kombu.Connection(url) as conn, conn.Producer() as producer:
        for n in range(waiting):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
    lengths = broker_queue_lengths(lambda: kombu.Connection(url), [name, f"{name}-missing"])
    server = serve("127.0.0.1", 0, folder=tmp_path, queue_lengths=lengths, queue_lengths_ttl=0)
    try:
        samples = scrape(server.url)
        assert total(samples, "celery_queue_length", queue_name=name) == waiting
        assert total(samples, "celery_queue_length", queue_name=f"{name}-missing") == 0
        with kombu.Connection(url) as conn:
            queue(conn.default_channel).purge()
        assert total(scrape(server.url), "celery_queue_length", queue_name=name) == 0
    finally:
        server.close()
        with kombu.Connection(url) as conn:
            bound = queue(conn.default_channel)
            bound.delete()
            bound.exchange.delete()
