"""Events on the wire: the fanout exchange, group queues, the consumer step, handler tasks.

A published event goes to the durable exchange ``llmgine.events``; each
subscriber group has a durable queue bound to it. A worker step consumes its
groups' queues and sends one Celery task per handler to the group's handler
queue (task id ``<event_id>:<group>:<handler>``), so each handler runs, shows
in Flower and retries on its own, with its group known.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer

from llmgine_celery.bus import topology
from llmgine_celery.bus.registry import EventRoute, HandlerRegistry
from llmgine_celery.bus.runtime import call_handler
from llmgine_celery.errors import MessageError, UnknownMessageTypeError
from llmgine_celery.messages.envelope import Envelope

if TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)


def events_exchange(transport: str) -> Exchange:
    """The durable exchange every event is published to."""
    return Exchange(
        topology.EVENTS_EXCHANGE, type=topology.events_exchange_type(transport), durable=True
    )


def group_queue(group: str, transport: str) -> Queue:
    """A subscriber group's durable event queue, bound to the events exchange."""
    return Queue(
        topology.group_queue_name(group),
        events_exchange(transport),
        routing_key=topology.EVENTS_ROUTING_KEY,
        durable=True,
    )


def event_headers(envelope: Envelope) -> dict[str, Any]:
    """Ids of an event envelope mirrored as message headers."""
    data = envelope["data"]
    return {
        topology.HEADER_MESSAGE_TYPE: envelope["type"],
        topology.HEADER_EVENT_ID: data.get("id"),
        topology.HEADER_SESSION_ID: data.get("session_id"),
    }


def publish_event(celery: Celery, transport: str, envelope: Envelope, producer: Any = None) -> None:
    """Publish one event envelope, durably, to every group."""
    exchange = events_exchange(transport)
    with celery.producer_or_acquire(producer) as producer:
        producer.publish(
            envelope,
            exchange=exchange,
            routing_key=topology.EVENTS_ROUTING_KEY,
            serializer="json",
            delivery_mode=2,
            headers=event_headers(envelope),
            declare=[exchange],
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5},
        )


def declare_groups(celery: Celery, transport: str, groups: list[str]) -> None:
    """Declare the exchange and each group's queue and binding (idempotent)."""
    with celery.connection_for_write() as conn:
        channel = conn.default_channel
        for group in groups:
            group_queue(group, transport)(channel).declare()


def run_handlers(registry: HandlerRegistry, group: str, name: str, envelope: Any) -> int:
    """Run handler ``name`` of ``group`` for the event in ``envelope``; count runs."""
    event = registry.types.decode(envelope)
    routes = [r for r in registry.event_routes_for(group, event) if r.name == name]
    for route in routes:
        call_handler(route.handler, event)
    return len(routes)


def register_handler_task(celery: Celery, registry: HandlerRegistry, route: EventRoute) -> Task:
    """Create (once) the Celery task of one handler in one group."""
    if route.task_name in celery.tasks:
        return celery.tasks[route.task_name]
    group, name = route.group, route.name

    def event_handler_task(envelope: Any) -> int:
        return run_handlers(registry, group, name, envelope)

    event_handler_task.__doc__ = f"Run handler {name} of group {group}."
    # Dispatch names the group's handler queue explicitly (see command_tasks).
    task: Task = celery.task(name=route.task_name, shared=False, ignore_result=True)(
        event_handler_task
    )
    return task


def event_consumer_step(registry: HandlerRegistry, transport: str, groups: list[str]) -> type:
    """A worker consumer step that turns group queue messages into handler tasks."""

    class EventDispatchStep(bootsteps.ConsumerStep):
        """Consume the groups' event queues; dispatch one task per handler."""

        def get_consumers(self, channel: Any) -> list[Consumer]:
            return [
                Consumer(
                    channel,
                    queues=[group_queue(group, transport)],
                    callbacks=[_dispatcher(self.parent_app, registry, group)],
                    accept=["json"],
                    on_decode_error=_reject_undecodable,
                    prefetch_count=16,
                )
                for group in groups
            ]

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.parent_app = parent.app

    return EventDispatchStep


def _dispatcher(celery: Celery, registry: HandlerRegistry, group: str) -> Any:
    def on_message(body: Any, message: Message) -> None:
        try:
            event = registry.types.decode(body)
        except UnknownMessageTypeError:
            # Every group sees every event; a type this app never registered has
            # no handler in this group, so there is nothing to do.
            message.ack()
            return
        except MessageError as exc:
            logger.error("event rejected from %s: %s", topology.group_queue_name(group), exc)
            message.reject()
            return
        for route in registry.event_routes_for(group, event):
            celery.tasks[route.task_name].apply_async(
                args=[body],
                task_id=topology.handler_task_id(event.id, group, route.name),
                queue=topology.handler_queue_name(group),
            )
        message.ack()

    return on_message


def _reject_undecodable(message: Message, exc: Exception) -> None:
    logger.error("undecodable message (content type %r) rejected: %s", message.content_type, exc)
    message.reject()
