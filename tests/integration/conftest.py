"""Fixtures of the integration tier: real RabbitMQ and Redis, real workers."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from llmgine_celery import ApplicationConfig, Settings
from llmgine_celery.bus import topology
from tests.integration.apps import APP_NAME, SPECIAL_QUEUE, IntegrationApp
from tests.support import (
    BROKERS_AND_POOLS,
    DEPLOYMENTS,
    WorkerProcess,
    broker_and_pool_id,
    producer_settings,
    start_worker,
)

T = TypeVar("T")

pytestmark = pytest.mark.integration


@dataclass
class Deployment:
    """A producer application and a worker process on one broker."""

    broker_name: str
    app: IntegrationApp
    worker: WorkerProcess

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on a fresh event loop, closing the bus's loop resources after."""
        return asyncio.run(_then_close(self.app, coro))


async def _then_close(app: IntegrationApp, coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        await app.message_bus.aclose()


def producer_app(broker: str, backend: str, data_dir: Path) -> IntegrationApp:
    """A producer-only instance of the integration application."""
    settings = Settings(
        broker_url=broker, result_backend=backend, embedded_worker=False, data_dir=data_dir
    )
    return IntegrationApp(ApplicationConfig(name=APP_NAME, settings=settings))


def purge(app: IntegrationApp) -> None:
    """Drop messages left on this application's queues by earlier runs."""
    app.declare()
    names = [topology.COMMAND_QUEUE, SPECIAL_QUEUE, topology.handler_queue_name(APP_NAME)]
    with app.celery.connection_for_write() as conn:
        for name in names:
            conn.default_channel.queue_purge(name)


@pytest.fixture(scope="module", params=BROKERS_AND_POOLS, ids=broker_and_pool_id)
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The integration app with a real worker process, per broker and pool."""
    broker_name, pool = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    tmp = tmp_path_factory.mktemp(f"{broker_name}-{pool}")
    app = IntegrationApp(
        ApplicationConfig(name=APP_NAME, settings=producer_settings(broker_name, tmp))
    )
    purge(app)
    worker = start_worker(
        "tests.integration.apps:celery", broker, backend, pool=pool, concurrency=4, log_dir=tmp
    )
    try:
        yield Deployment(broker_name, app, worker)
    finally:
        worker.stop()
        app.celery.close()
