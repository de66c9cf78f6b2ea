"""Live subscriptions: a web process streams matching events while a block is open.

Each subscription declares its own queue, bound to the events exchange
(exclusive and auto-delete on RabbitMQ), and consumes it on a dedicated thread
with its own connection; the thread filters and decodes, and hands events to
the event loop. Leaving the ``async with`` block, however it is left (normally,
by an exception, by cancellation), deletes the queue and its binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn

from kombu.entity import Queue
from kombu.exceptions import OperationalError
from kombu.messaging import Consumer
from typing_extensions import TypeVar

from llmgine_celery.bus import topology
from llmgine_celery.bus.events import events_exchange
from llmgine_celery.errors import BrokerUnavailableError, MessageError, RegistrationError
from llmgine_celery.messages.envelope import TypeRegistry
from llmgine_celery.messages.events import Event

if TYPE_CHECKING:
    from celery import Celery

# The default lets ``subscribe(session_id=...)``, with no type, be typed as events of any type.
E = TypeVar("E", bound=Event, default=Event)

logger = logging.getLogger(__name__)

#: seconds the consumer thread blocks at most before it looks at its stop flag
POLL_INTERVAL = 0.1
#: deliveries the broker may push ahead of the consumer thread
PREFETCH = 64
#: seconds leaving the block waits for the consumer thread to delete the queue
CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class _End:
    """Marks the end of the stream; ``error`` is why the consumer thread stopped."""

    error: BaseException | None = None


class EventFilter(Generic[E]):
    """Which events a subscription yields: by type (subclasses included) and session."""

    def __init__(self, event_types: tuple[type[E], ...], session_id: str | None = None) -> None:
        self.event_types = event_types
        self.session_id = session_id
        self.types = _decodable(event_types)

    def match(self, body: Any) -> E | None:
        """The event in ``body`` if it is wanted, else None; MessageError if malformed."""
        if not isinstance(body, Mapping) or not isinstance(body.get("type"), str):
            raise MessageError("not a message envelope (expected {type, v, data})", raw=body)
        if body["type"] not in self.types:
            return None  # every event reaches every subscription; most are not wanted
        data = body.get("data")
        session_id = data.get("session_id") if isinstance(data, Mapping) else None
        if self.session_id is not None and session_id != self.session_id:
            return None  # before validation: other sessions' events cost no decoding
        event = self.types.decode(body)
        return event if isinstance(event, self.event_types) else None


def _decodable(event_types: tuple[type[E], ...]) -> TypeRegistry:
    """The wanted types and every subclass of them imported so far, by wire name.

    Not the application's registry: a web process streams events it has no
    handler for, so that registry alone could not decode them.
    """
    registry = TypeRegistry()
    pending: list[type] = list(event_types)
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        try:
            registry.register(cls)  # a class reached twice (multiple inheritance) is fine
        except RegistrationError as exc:
            logger.warning("a subscription cannot tell two event types apart: %s", exc)
    return registry


class Subscription(Generic[E]):
    """Matching events published anywhere while the ``async with`` block is open.

    ``async for`` yields them in publish order (per publisher). A slow reader
    holds at most ``max_buffer`` events in memory; the broker keeps the rest.
    Entering raises ``BrokerUnavailableError`` at once if the broker cannot be
    reached; the iterator raises it if the connection is lost. Single use.
    """

    def __init__(
        self, celery: Celery, transport: str, event_filter: EventFilter[E], max_buffer: int
    ) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, not {max_buffer}")
        name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        #: this subscription's queue; exclusive implies auto_delete (RabbitMQ only)
        self.queue = Queue(
            topology.SUBSCRIPTION_QUEUE_PREFIX + name,
            events_exchange(transport),
            routing_key=topology.EVENTS_ROUTING_KEY,
            durable=False,
            exclusive=True,
        )
        self.filter = event_filter
        self._celery = celery
        self._room = threading.Semaphore(max_buffer)
        self._stopping = threading.Event()
        self._broker_errors: tuple[type[BaseException], ...] = (OperationalError, OSError)
        self._conn: Any = None
        self._no_ack = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._items: asyncio.Queue[E | _End] = asyncio.Queue()
        self._started: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Subscription[E]:
        if self._loop is not None:
            raise RuntimeError("a Subscription can be entered only once")
        loop = self._loop = asyncio.get_running_loop()
        self._started, self._stopped = loop.create_future(), loop.create_future()
        name = f"llmgine-subscription-{self.queue.name.rsplit('.', 1)[1]}"
        threading.Thread(target=self._consume, name=name, daemon=True).start()
        try:
            await self._started
        except BaseException as exc:
            await self._close()
            self._raise(exc)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    def __aiter__(self) -> Subscription[E]:
        return self

    async def __anext__(self) -> E:
        if self._loop is None:
            raise RuntimeError("enter the subscription with `async with` before iterating it")
        if self._stopping.is_set():
            raise StopAsyncIteration
        item = await self._items.get()
        if isinstance(item, _End):
            self._items.put_nowait(item)  # so that every later call ends too
            if item.error is not None:
                self._raise(item.error)
            raise StopAsyncIteration
        self._room.release()
        return item

    async def _close(self) -> None:
        # Set before awaiting: a second cancellation cannot keep the thread running.
        self._stopping.set()
        assert self._stopped is not None
        done, _ = await asyncio.wait({self._stopped}, timeout=CLOSE_TIMEOUT)
        if not done:
            logger.warning("%s not deleted within %ss", self.queue.name, CLOSE_TIMEOUT)

    def _raise(self, error: BaseException) -> NoReturn:
        if not isinstance(error, self._broker_errors):
            raise error
        uri = self._conn.as_uri() if self._conn is not None else "?"
        message = f"broker {uri} is unavailable to {self.queue.name}: {error}"
        raise BrokerUnavailableError(message) from error

    # -- the consumer thread ------------------------------------------------

    def _consume(self) -> None:
        error: BaseException | None = None
        try:
            # Heartbeats make a dead connection an error here instead of a silent hang.
            conn = self._conn = self._celery.connection_for_read(
                heartbeat=self._celery.conf.broker_heartbeat
            )
            self._broker_errors += conn.connection_errors + conn.channel_errors
            with conn:
                conn.ensure_connection(max_retries=0)  # fail fast: the caller decides on retries
                self._serve(conn)
        except Exception as exc:
            error = exc
            if self._stopping.is_set():  # nobody is iterating any more to be told
                logger.warning("%s failed while closing: %r", self.queue.name, exc)
        finally:
            self._call(_settle, self._started, error)
            self._call(self._items.put_nowait, _End(error))
            self._call(_settle, self._stopped, None)

    def _serve(self, conn: Any) -> None:
        queue = self.queue.bind(conn.channel())
        # kombu's Redis transport re-routes an unacked or unclaimed message through
        # the exchange, into every bound queue: no acks there, and the consumer stays
        # registered until the channel is closed.
        redis = self._no_ack = conn.transport.driver_type == "redis"
        try:
            consumer = Consumer(  # declares the queue and its binding
                queue.channel,
                [queue],
                no_ack=redis,
                callbacks=[self._on_message],
                on_decode_error=self._on_undecodable,
                accept=["json"],
                prefetch_count=PREFETCH,
            )
            consumer.consume()
            self._call(_settle, self._started, None)
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=POLL_INTERVAL)
                conn.heartbeat_check()
            if not redis:
                consumer.cancel()
        finally:
            self._delete(queue)
        if redis:
            # A publish that read the bindings before the delete pushes its copy after
            # it: closing waits out the last BRPOP, which takes such a copy; a purge
            # then drops any later one, so that no list is left behind.
            queue.channel.close()
            conn.default_channel.queue_purge(queue.name)

    def _delete(self, queue: Any) -> None:
        # Explicit: Redis has no auto-delete, and its binding outlives the connection.
        try:
            queue.delete()
        except Exception as exc:  # RabbitMQ drops an exclusive queue with its connection
            if not self._no_ack or not self._delete_afresh(queue):
                logger.warning("could not delete %s: %r", queue.name, exc)
        # Leaving the block need not wait for the rest (up to a second on Redis).
        self._call(_settle, self._stopped, None)

    def _delete_afresh(self, queue: Any) -> bool:
        # A Redis connection lost mid-stream leaves the binding behind: the server
        # does not drop it with the client, so delete it over a new connection.
        # kombu deletes only the bindings its connection knows, hence the declare.
        try:
            with self._celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
                fresh = queue(conn.default_channel)
                fresh.declare()
                fresh.delete()
        except Exception:
            return False
        return True

    def _on_message(self, body: Any, message: Any) -> None:
        # Acked once skipped or buffered; while the buffer is full, the broker holds
        # the next ones (prefetch on RabbitMQ; on Redis, no BRPOP is sent meanwhile).
        try:
            event = self.filter.match(body)
        except Exception as exc:  # a bad message must never end the stream
            trace = not isinstance(exc, MessageError)
            logger.warning("%s skipped a bad event: %s", self.queue.name, exc, exc_info=trace)
            event = None
        if event is not None and self._wait_for_room():
            self._call(self._items.put_nowait, event)
        self._ack(message)

    def _on_undecodable(self, message: Any, exc: Exception) -> None:
        logger.warning(
            "%s skipped an undecodable message (%s): %s", self.queue.name, message.content_type, exc
        )
        self._ack(message)

    def _ack(self, message: Any) -> None:
        if not self._no_ack:
            message.ack()

    def _wait_for_room(self) -> bool:
        while not self._room.acquire(timeout=POLL_INTERVAL):
            if self._stopping.is_set():
                return False
            self._conn.heartbeat_check()
        return True

    def _call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
            self._loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[None] | None, error: BaseException | None) -> None:
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def subscribe(
    celery: Celery,
    transport: str,
    *event_types: type[E],
    session_id: str | None = None,
    max_buffer: int = 1000,
) -> Subscription[E]:
    """A subscription to ``event_types`` (default: every event), of one session if given.

    Subclasses of ``event_types`` count if they are imported before this call.
    """
    wanted: tuple[type[Any], ...] = event_types or (Event,)
    for cls in wanted:
        if not (isinstance(cls, type) and issubclass(cls, Event)):
            raise RegistrationError(f"{cls!r} is not an Event subclass")
    return Subscription(celery, transport, EventFilter(wanted, session_id), max_buffer)
