"""Live subscriptions on real brokers: what a web process streaming a session sees."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from amqp.exceptions import NotFound, ResourceLocked
from celery import Celery
from kombu import Producer

from llmgine_celery import (
    ApplicationBootstrap,
    ApplicationConfig,
    BrokerUnavailableError,
    RegistrationError,
    Settings,
)
from llmgine_celery.bus import topology
from llmgine_celery.bus.celery_app import transport_of
from llmgine_celery.bus.events import events_exchange, publish_event
from llmgine_celery.bus.subscriptions import Subscription, subscribe
from llmgine_celery.messages.envelope import encode
from llmgine_celery.messages.events import Event
from tests.support import (
    DEPLOYMENTS,
    REDIS_BROKER_URL,
    close_connections,
    connections_named,
    ensure_test_vhost,
    require_service,
)

pytestmark = pytest.mark.integration

E = TypeVar("E", bound=Event)

#: seconds to wait for an event that should arrive
WAIT = 10.0


@dataclass
class Streamed(Event):
    text: str


@dataclass
class TokenStreamed(Streamed):
    index: int


@dataclass
class UsageCounted(Event):
    tokens: int


class WebApp(ApplicationBootstrap):
    """A web process: it publishes and streams events, and handles none."""


@dataclass
class Broker:
    """A producer application on one real broker, and ways to look at its queues."""

    name: str
    app: WebApp

    @property
    def transport(self) -> str:
        return transport_of(self.app.settings.broker())

    def subscribe(
        self, *types: type[E], session_id: str | None = None, max_buffer: int = 1000
    ) -> Subscription[E]:
        return subscribe(
            self.app.celery, self.transport, *types, session_id=session_id, max_buffer=max_buffer
        )

    def publish(self, *events: Event) -> None:
        """Publish in this order, as one publisher (a connection of its own, closed after)."""
        with self.app.celery.connection_for_write() as conn:
            producer = Producer(conn)
            for event in events:
                publish_event(self.app.celery, self.transport, encode(event), producer)

    def publish_raw(self, body: str | bytes, content_type: str = "application/json") -> None:
        """Put any body on the events exchange, as a foreign publisher could."""
        exchange = events_exchange(self.transport)
        with self.app.celery.connection_for_write() as conn:
            Producer(conn.default_channel).publish(
                body,
                exchange=exchange,
                routing_key=topology.EVENTS_ROUTING_KEY,
                content_type=content_type,
                content_encoding="utf-8" if isinstance(body, str) else "binary",
                declare=[exchange],
            )

    def redis_backlog(self, name: str) -> int:
        """Messages waiting in a queue's Redis list."""
        with redis.Redis.from_url(REDIS_BROKER_URL) as client:
            return int(client.llen(name))

    def queue_exists(self, name: str) -> bool:
        """Whether the broker still has the queue (on Redis: its binding or its list)."""
        if self.name == "redis":
            with redis.Redis.from_url(REDIS_BROKER_URL) as client:
                tables = ("binding", "binding_permanent")
                bindings = [
                    member.decode()
                    for table in tables
                    for member in client.smembers(f"_kombu.{table}.{topology.EVENTS_EXCHANGE}")
                ]
                bound = any(member.endswith(f"\x16{name}") for member in bindings)
                return bound or any(client.scan_iter(match=f"{name}*"))
        with self.app.celery.connection_for_write() as conn:
            channel = conn.channel()
            try:
                channel.queue_declare(name, passive=True)
            except NotFound:
                return False
            except ResourceLocked:
                return True  # exclusive to the subscription's connection: it exists
            channel.close()
            return True


@pytest.fixture(scope="module", params=sorted(DEPLOYMENTS))
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    """A web application on RabbitMQ, then on Redis."""
    url, backend = DEPLOYMENTS[request.param]
    require_service(url)
    if request.param == "rabbitmq":
        ensure_test_vhost()
    settings = Settings(
        broker_url=url,
        result_backend=backend,
        embedded_worker=False,
        data_dir=tmp_path_factory.mktemp(request.param),
    )
    app = WebApp(ApplicationConfig(name="web", settings=settings))
    try:
        yield Broker(request.param, app)
    finally:
        app.celery.close()


@pytest.fixture
def sid() -> str:
    """A session id of this test alone: other test runs may publish on the same broker."""
    return f"test-{uuid.uuid4().hex}"


async def take(events: Subscription[E], count: int) -> list[E]:
    """The next ``count`` events, each within WAIT seconds."""
    return [await asyncio.wait_for(anext(events), WAIT) for _ in range(count)]


def eventually(probe: Callable[[], bool]) -> bool:
    """Whether ``probe`` comes true within WAIT seconds (polled)."""
    deadline = time.monotonic() + WAIT
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def gone(broker: Broker, name: str) -> bool:
    """Whether the queue is gone (within WAIT seconds: on Redis, a publish that
    raced the delete may push a copy, which the subscription purges once closed)."""
    return eventually(lambda: not broker.queue_exists(name))


def test_events_published_while_open_arrive_intact(broker: Broker, sid: str) -> None:
    sent = [
        Streamed(text="hello", session_id=sid, metadata={"model": "m", "n": 1}),
        TokenStreamed(text="wor", index=7, session_id=sid),
    ]

    async def scenario() -> list[Streamed]:
        async with broker.subscribe(Streamed, session_id=sid) as events:
            broker.publish(*sent)
            return await take(events, 2)

    got = asyncio.run(scenario())
    assert got == sent  # every field, the id, timestamp and session id included
    assert [type(e) for e in got] == [Streamed, TokenStreamed]


def test_the_type_filter_includes_subclasses_and_nothing_else(broker: Broker, sid: str) -> None:
    async def scenario() -> tuple[list[Streamed], list[TokenStreamed]]:
        async with (
            broker.subscribe(Streamed, session_id=sid) as streamed,
            broker.subscribe(TokenStreamed, session_id=sid) as tokens,
        ):
            # Events of one publisher arrive in order: what was skipped would come first.
            broker.publish(
                UsageCounted(tokens=3, session_id=sid),
                Streamed(text="a", session_id=sid),
                TokenStreamed(text="b", index=1, session_id=sid),
            )
            return await take(streamed, 2), await take(tokens, 1)

    streamed, tokens = asyncio.run(scenario())
    assert [(type(e), e.text) for e in streamed] == [(Streamed, "a"), (TokenStreamed, "b")]
    assert [(type(e), e.text) for e in tokens] == [(TokenStreamed, "b")]


def test_the_session_filter_keeps_one_session_of_every_type(broker: Broker, sid: str) -> None:
    async def scenario() -> list[Event]:
        async with broker.subscribe(session_id=sid) as events:
            broker.publish(
                Streamed(text="other", session_id=f"{sid}-other"),
                UsageCounted(tokens=1),
                UsageCounted(tokens=2, session_id=sid),
                TokenStreamed(text="mine", index=0, session_id=sid),
            )
            return await take(events, 2)

    got = asyncio.run(scenario())
    assert [type(e) for e in got] == [UsageCounted, TokenStreamed]
    assert {e.session_id for e in got} == {sid}


def test_an_event_published_before_entering_is_not_seen(broker: Broker, sid: str) -> None:
    async def scenario() -> list[Streamed]:
        broker.publish(Streamed(text="too early", session_id=sid))
        async with broker.subscribe(Streamed, session_id=sid) as events:
            broker.publish(Streamed(text="in time", session_id=sid))
            return await take(events, 1)

    assert [e.text for e in asyncio.run(scenario())] == ["in time"]


def test_events_arrive_in_publish_order_through_a_small_buffer(broker: Broker, sid: str) -> None:
    sent = [TokenStreamed(text=str(i), index=i, session_id=sid) for i in range(100)]

    async def scenario() -> list[TokenStreamed]:
        async with broker.subscribe(TokenStreamed, session_id=sid, max_buffer=3) as events:
            broker.publish(*sent)
            return await take(events, len(sent))

    assert [e.index for e in asyncio.run(scenario())] == list(range(100))


def test_leaving_the_block_deletes_the_queue_and_ends_iteration(broker: Broker, sid: str) -> None:
    async def scenario() -> Subscription[Streamed]:
        async with broker.subscribe(Streamed, session_id=sid, max_buffer=1) as events:
            name = events.queue.name
            assert broker.queue_exists(name)
            broker.publish(*(Streamed(text=str(i), session_id=sid) for i in range(5)))
            await take(events, 1)
            if broker.name == "redis":  # the buffer is full: the rest waits in the list
                assert eventually(lambda: broker.redis_backlog(name) > 0)
        with pytest.raises(StopAsyncIteration):
            await anext(events)
        return events

    events = asyncio.run(scenario())
    assert gone(broker, events.queue.name)


def test_the_queue_is_deleted_when_the_block_raises(broker: Broker) -> None:
    subscription = broker.subscribe(Streamed)

    async def scenario() -> None:
        async with subscription:
            broker.publish(Streamed(text="left unread"))
            raise RuntimeError("the view failed")

    with pytest.raises(RuntimeError, match="the view failed"):
        asyncio.run(scenario())
    assert gone(broker, subscription.queue.name)


def test_the_queue_is_deleted_when_the_streaming_task_is_cancelled(broker: Broker) -> None:
    subscription = broker.subscribe(Streamed)

    async def stream(entered: asyncio.Event) -> None:
        async with subscription as events:
            entered.set()
            async for _ in events:
                pass

    async def scenario() -> None:
        entered = asyncio.Event()
        task = asyncio.create_task(stream(entered))
        await asyncio.wait_for(entered.wait(), WAIT)
        assert broker.queue_exists(subscription.queue.name)
        task.cancel()  # as a web framework does when the browser goes away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert gone(broker, subscription.queue.name)


def test_a_lost_connection_ends_the_stream_with_an_error(broker: Broker, sid: str) -> None:
    async def scenario() -> str:
        async with broker.subscribe(Streamed) as events:
            await asyncio.to_thread(close_connections, broker.name, sid)
            with pytest.raises(BrokerUnavailableError, match="is unavailable to"):
                await asyncio.wait_for(anext(events), WAIT)
            return str(events.queue.name)

    with connections_named(broker.name, broker.app.celery, sid):
        assert gone(broker, asyncio.run(scenario()))


def test_bad_messages_are_skipped_and_the_next_event_arrives(
    broker: Broker, sid: str, caplog: pytest.LogCaptureFixture
) -> None:
    invalid = {"type": "Streamed", "v": 1, "data": {"text": 42, "session_id": sid}}
    unknown = {"type": "NoSuchEvent", "v": 1, "data": {"session_id": sid}}

    async def scenario() -> tuple[str, list[Streamed]]:
        async with broker.subscribe(Streamed, session_id=sid) as events:
            broker.publish_raw("{not json")
            broker.publish_raw(b"\x80\x04K\x01.", content_type="application/x-python-serialize")
            broker.publish_raw(json.dumps([1, 2, 3]))
            broker.publish_raw(json.dumps(unknown))
            broker.publish_raw(json.dumps(invalid))
            broker.publish(Streamed(text="good", session_id=sid))
            return events.queue.name, await take(events, 1)

    with caplog.at_level(logging.WARNING, logger="llmgine_celery.bus.subscriptions"):
        name, got = asyncio.run(scenario())
    assert [e.text for e in got] == ["good"]
    logged = "\n".join(r.getMessage() for r in caplog.records if name in r.getMessage())
    assert "undecodable message (application/json)" in logged
    assert "undecodable message (application/x-python-serialize)" in logged
    assert "not a message envelope" in logged
    assert "invalid Streamed: text" in logged
    assert "NoSuchEvent" not in logged  # not an error: an event type nobody here asked for


def test_an_unreachable_broker_fails_on_entering(tmp_path: Path) -> None:
    settings = Settings(
        broker_url="amqp://guest:guest@127.0.0.1:1//",
        result_backend=f"file://{tmp_path}",
        embedded_worker=False,
        data_dir=tmp_path,
    )
    app = WebApp(ApplicationConfig(name="web", settings=settings))

    async def scenario() -> None:
        async with subscribe(app.celery, "amqp", Streamed):
            pytest.fail("entered a subscription without a broker")

    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1\b"):
        asyncio.run(scenario())


def test_only_event_types_can_be_subscribed_to() -> None:
    celery = Celery("no-broker", set_as_current=False)
    with pytest.raises(RegistrationError, match="is not an Event subclass"):
        subscribe(celery, "amqp", Streamed, dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_buffer"):
        subscribe(celery, "amqp", Streamed, max_buffer=0)
