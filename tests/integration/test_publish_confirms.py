"""Events published on RabbitMQ are confirmed by the broker, in batches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.entity import Queue

from llmgine_celery import ApplicationConfig, BrokerUnavailableError, Settings
from llmgine_celery.bus import topology
from llmgine_celery.bus.events import events_exchange, group_queue
from tests.integration.event_apps import Alpha, Said
from tests.support import (
    RABBITMQ_URL,
    REDIS_URL,
    ensure_test_vhost,
    message_count,
    require_service,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def producer(tmp_path: Path) -> Iterator[Alpha]:
    require_service(RABBITMQ_URL)
    ensure_test_vhost()
    settings = Settings(
        broker_url=RABBITMQ_URL, result_backend=REDIS_URL, embedded_worker=False, data_dir=tmp_path
    )
    app = Alpha(ApplicationConfig(name="confirms", settings=settings))
    app.declare()
    yield app
    with app.celery.connection_for_write() as conn:  # or it collects later tests' events
        group_queue("confirms", "amqp")(conn.default_channel).delete()
    app.celery.close()


def listener(app: Alpha, name: str, **arguments: object) -> Queue:
    """A queue of this test's own on the events exchange (deleted by the test)."""
    queue = Queue(
        name,
        events_exchange("amqp"),
        routing_key=topology.EVENTS_ROUTING_KEY,
        queue_arguments=dict(arguments) or None,
    )
    with app.celery.connection_for_write() as conn:
        queue(conn.default_channel).declare()
        conn.default_channel.queue_purge(name)
    return queue


def delete(app: Alpha, queue: Queue) -> None:
    with app.celery.connection_for_write() as conn:
        queue(conn.default_channel).delete()


def test_concurrent_publishes_all_arrive_once_confirmed(producer: Alpha) -> None:
    queue = listener(producer, "itest.confirms.all")

    async def publish_all() -> None:
        try:
            await asyncio.gather(
                *(producer.message_bus.publish(Said(text=str(i))) for i in range(500))
            )
        finally:
            await producer.message_bus.aclose()

    try:
        asyncio.run(publish_all())
        # Confirmed means routed and stored: the count is final when publish returns.
        assert message_count(producer, queue.name) == 500
        producer.message_bus.publish_sync(Said(text="one more"))
        assert message_count(producer, queue.name) == 501
    finally:
        delete(producer, queue)


def test_a_message_the_broker_refuses_fails_its_publish(producer: Alpha) -> None:
    # A full queue with reject-publish makes RabbitMQ nack what is routed to it.
    queue = listener(
        producer, "itest.confirms.full", **{"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    try:
        producer.message_bus.publish_sync(Said(text="fits"))
        with pytest.raises(BrokerUnavailableError, match="refused"):
            producer.message_bus.publish_sync(Said(text="refused"))
    finally:
        delete(producer, queue)
