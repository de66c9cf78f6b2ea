"""Events on the wire: the events exchange, group queues, publishing and declaring.

A published event goes to the durable exchange ``llmgine.events``; each
subscriber group has a durable queue bound to it. A worker step
(``event_consumer``) consumes its groups' queues and sends one Celery task per
handler (``handler_tasks``) to the group's handler queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kombu.entity import Exchange, Queue

from llmgine_celery.bus import topology
from llmgine_celery.bus.dead_letters import dead_letter_queue
from llmgine_celery.messages.envelope import Envelope
from llmgine_celery.observability import records
from llmgine_celery.observability.bus import LogLevel, Record

if TYPE_CHECKING:
    from celery import Celery


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


def event_headers(
    envelope: Envelope, correlation: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Ids of an event envelope mirrored as message headers, with its correlation."""
    data = envelope["data"]
    headers = dict(correlation) if correlation else {}
    headers[topology.HEADER_MESSAGE_TYPE] = envelope["type"]
    headers[topology.HEADER_EVENT_ID] = data.get("id")
    headers[topology.HEADER_SESSION_ID] = data.get("session_id")
    return headers


def publish_event(
    celery: Celery,
    transport: str,
    envelope: Envelope,
    producer: Any = None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish one event envelope, durably, to every group."""
    exchange = events_exchange(transport)
    with celery.producer_or_acquire(producer) as producer:
        producer.publish(
            envelope,
            exchange=exchange,
            routing_key=topology.EVENTS_ROUTING_KEY,
            serializer="json",
            delivery_mode=2,
            headers=headers if headers is not None else event_headers(envelope),
            declare=[exchange],
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5},
        )


def declare_groups(celery: Celery, transport: str, groups: list[str]) -> None:
    """Declare the exchange, each group's queue and binding, and the dead letters."""
    with celery.connection_for_write() as conn:
        channel = conn.default_channel
        for group in groups:
            group_queue(group, transport)(channel).declare()
        dead_letter_queue()(channel).declare()


def published_record(envelope: Envelope, headers: Mapping[str, Any], transport: str) -> Record:
    """The ``event.published`` record of an event sent with ``headers``."""
    fields = {
        "event_id": headers.get(topology.HEADER_EVENT_ID),
        "event_type": envelope["type"],
        "session_id": headers.get(topology.HEADER_SESSION_ID),
        "trace_id": headers.get(topology.HEADER_TRACE_ID),
        "parent_span_id": headers.get(topology.HEADER_PARENT_SPAN_ID),
        "causation_id": headers.get(topology.HEADER_CAUSATION_ID),
        "messaging.system": transport,
        "messaging.destination.name": topology.EVENTS_EXCHANGE,
    }
    present = {k: v for k, v in fields.items() if v is not None}
    return Record(LogLevel.INFO, records.EVENT_PUBLISHED, present)
