"""The worker step that turns group-queue events into one task per handler.

Bad input never stops the step: a message that is over the size limit, not
JSON (a pickle is never deserialised), not an envelope, of an unknown event
type, or invalid for its type is dead-lettered with the reason and acked, and
the messages around it are consumed as usual.

On RabbitMQ an event is acked once the broker confirmed its handler tasks,
which a publisher thread sends (``confirmed_dispatch``); elsewhere they are
sent from the consumer's thread, then the event is acked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from kombu.message import Message
from kombu.messaging import Consumer

from llmgine_celery.bus import topology
from llmgine_celery.bus.confirmed_dispatch import ConfirmedDispatch, TaskSend
from llmgine_celery.bus.dead_letters import INVALID_MESSAGE, DeadLetter, raw_text, send_dead_letter
from llmgine_celery.bus.events import event_headers, group_queue
from llmgine_celery.bus.registry import EventRoute, HandlerRegistry
from llmgine_celery.bus.sender import TaskSender
from llmgine_celery.bus.tracing import NO_TRACER, Tracer
from llmgine_celery.errors import MessageError, UnknownMessageTypeError
from llmgine_celery.messages.envelope import known_event_type

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

JSON = "application/json"
#: transports whose bindings live in a key that can be lost (eviction, FLUSHDB)
REBIND_TRANSPORTS = frozenset({"redis", "rediss"})
#: transports whose handler tasks are sent with publisher confirms
CONFIRM_TRANSPORTS = frozenset({"amqp"})

#: told of every dead letter this step makes (for logs and metrics)
DeadLetterHook = Callable[[DeadLetter], None]


class GroupDispatcher:
    """Handles the messages of one group queue."""

    def __init__(
        self,
        celery: Celery,
        registry: HandlerRegistry,
        group: str,
        max_bytes: int,
        on_dead_letter: DeadLetterHook,
        tracer: Tracer = NO_TRACER,
        confirmed: ConfirmedDispatch | None = None,
    ) -> None:
        """``confirmed``: the worker's confirmed dispatch, to send with publisher confirms."""
        self._celery = celery
        self._confirmed = confirmed
        self._forward = tracer.forward
        self._registry = registry
        self._group = group
        self._queue = topology.group_queue_name(group)
        self._max_bytes = max_bytes
        self._on_dead_letter = on_dead_letter
        self._sender = TaskSender(celery)
        #: a producer held for the dispatcher's life: a pool round trip per event cost
        #: more than the rest of the dispatch but the publish itself
        self._held: Any = None

    def on_message(self, message: Message) -> None:
        """Dispatch one raw message (acked once dispatched or dead-lettered)."""
        problem = self._check(message)
        if problem is not None:
            self._reject(message, problem)
            return
        try:
            body = message.decode()
        except Exception as exc:  # whatever the body holds, it must not stop the worker
            self._reject(message, f"body is not JSON: {exc}", f"{type(exc).__name__}: {exc}")
            return
        try:
            event = self._registry.types.decode(body)
        except UnknownMessageTypeError as exc:
            if known_event_type(str(exc.raw)):
                message.ack()  # another application's event: nothing to do in this group
            else:
                self._reject(message, f"unknown event type {exc.raw!r}", str(exc))
            return
        except (MessageError, ValueError, TypeError) as exc:
            self._reject(message, f"invalid event: {exc}", f"{type(exc).__name__}: {exc}")
            return
        routes = self._registry.event_routes_for(self._group, event)
        if not routes:  # no handler in this group: nothing to send
            message.ack()
            return
        incoming = message.headers if isinstance(message.headers, dict) else {}
        passed = {**_correlation(incoming), **self._forward(incoming)}
        headers = event_headers(body, passed)
        sends = [functools.partial(self._send, route, event.id, body, headers) for route in routes]
        what = f"the handler tasks of event {event.id} in group {self._group!r}"
        self._send_then_ack(message, sends, what)

    def _send_then_ack(self, message: Message, sends: Sequence[TaskSend], what: str) -> None:
        """Ack ``message`` once ``sends`` are done: confirmed (RabbitMQ), else sent from here."""
        if self._confirmed is not None:
            self._confirmed.dispatch(message, sends, what)
            return
        producer = self._producer()
        try:
            for send in sends:
                send(producer)
        except BaseException:
            self.close()  # its connection may be broken: the next message takes a new one
            raise
        message.ack()

    def _send(
        self,
        route: EventRoute,
        event_id: str,
        body: Any,
        headers: dict[str, Any],
        producer: Any,
    ) -> None:
        """Publish the handler task of ``route`` for one event."""
        self._sender.send(
            route.task_name,
            topology.handler_task_id(event_id, self._group, route.name),
            body,
            queue=topology.handler_queue_name(self._group),
            headers=headers,
            ignore_result=True,
            producer=producer,
            # a confirm-mode producer must not move to a revived connection
            retry=self._confirmed is None,
        )

    def close(self) -> None:
        """Give the held producer back to the pool."""
        held, self._held = self._held, None
        if held is not None:
            held.release()

    def _producer(self) -> Any:
        if self._held is None:
            self._held = self._celery.producer_pool.acquire(block=True)
        return self._held

    def _check(self, message: Message) -> str | None:
        size = len(message.body or b"")
        if size > self._max_bytes:
            return f"message of {size} bytes is over the {self._max_bytes} byte limit"
        if message.content_type != JSON:
            return f"content type {message.content_type!r} is refused: events are JSON only"
        return None

    def _reject(self, message: Message, reason: str, error: str | None = None) -> None:
        record = DeadLetter(
            kind=INVALID_MESSAGE,
            reason=reason,
            queue=self._queue,
            error=error,
            group=self._group,
            raw=raw_text(message.body),
            content_type=message.content_type,
            size=len(message.body or b""),
        )
        retry = self._confirmed is None
        send = functools.partial(send_dead_letter, self._celery, record, retry=retry)
        self._send_then_ack(message, [send], f"the dead letter of a message from {self._queue}")
        logger.warning("dead-lettered a message from %s: %s", self._queue, reason)
        self._on_dead_letter(record)


class EventDispatchStep(bootsteps.ConsumerStep):
    """Consume the groups' event queues, a channel each; dispatch one task per handler.

    Configured by subclassing (see ``event_consumer_step``): Celery instantiates
    steps itself.
    """

    registry: HandlerRegistry
    transport: str
    groups: list[str]
    max_bytes: int
    rebind_seconds: float
    on_dead_letter: DeadLetterHook
    tracer: Tracer = NO_TRACER
    _rebind_timer: Any = None
    _consumers: list[Any]  # kombu Consumers; their channel and queues are set once consuming
    _dispatchers: list[GroupDispatcher]
    #: publisher confirms for handler tasks (RabbitMQ with an event loop)
    _confirmed: ConfirmedDispatch | None = None

    def start(self, c: Any) -> None:
        if self.transport in CONFIRM_TRANSPORTS and c.hub is not None:
            self._confirmed = ConfirmedDispatch(c.app, c.hub)
        self._dispatchers = []
        self._consumers = [self._consumer(c, group) for group in self.groups]
        self.consumers = self._consumers
        for consumer in self._consumers:
            consumer.consume()
        if self.transport in REBIND_TRANSPORTS and c.timer is not None:
            # kombu keeps Redis bindings in a set key: if it is evicted or
            # flushed, events stop reaching the groups. Workers put it back.
            self._rebind_timer = c.timer.call_repeatedly(
                self.rebind_seconds, self._rebind, (c,), priority=10
            )

    def stop(self, c: Any) -> None:
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
        for dispatcher in getattr(self, "_dispatchers", ()):
            dispatcher.close()
        confirmed, self._confirmed = self._confirmed, None
        if confirmed is not None:  # events confirmed from now on are redelivered, not acked
            confirmed.close()
        super().stop(c)

    def _consumer(self, c: Any, group: str) -> Consumer:
        dispatcher = GroupDispatcher(
            c.app,
            self.registry,
            group,
            self.max_bytes,
            self.on_dead_letter,
            self.tracer,
            self._confirmed,
        )
        self._dispatchers.append(dispatcher)
        return Consumer(
            c.connection.channel(),
            queues=[group_queue(group, self.transport)],
            on_message=dispatcher.on_message,
            prefetch_count=32,
        )

    def _rebind(self, c: Any) -> None:
        # Channel.queue_bind would return early: the channel remembers the
        # binding in memory. Write it to Redis again through the transport hook.
        try:
            for consumer in self._consumers:
                channel = consumer.channel
                for queue in consumer.queues:
                    exchange = queue.exchange.name
                    meta = channel.typeof(exchange).prepare_bind(
                        queue.name, exchange, queue.routing_key, queue.binding_arguments
                    )
                    channel._queue_bind(exchange, *meta)
        except Exception:  # the consumer reconnects on its own; try again next time
            logger.warning("re-binding event group queues failed", exc_info=True)


def event_consumer_step(
    registry: HandlerRegistry,
    transport: str,
    groups: list[str],
    max_bytes: int,
    rebind_seconds: float,
    on_dead_letter: DeadLetterHook,
    tracer: Tracer = NO_TRACER,
) -> type[EventDispatchStep]:
    """The consumer step of one application's groups, for ``celery.steps``."""
    config = {
        "tracer": tracer,
        "registry": registry,
        "transport": transport,
        "groups": groups,
        "max_bytes": max_bytes,
        "rebind_seconds": rebind_seconds,
        "on_dead_letter": staticmethod(on_dead_letter),
    }
    return type("EventDispatchStep", (EventDispatchStep,), config)


def _correlation(headers: Any) -> dict[str, Any]:
    """The correlation headers of an event message, passed on to its handler tasks."""
    if not isinstance(headers, dict):
        return {}
    wanted = (
        topology.HEADER_TRACE_ID,
        topology.HEADER_PARENT_SPAN_ID,
        topology.HEADER_CAUSATION_ID,
    )
    return {key: headers[key] for key in wanted if key in headers}
