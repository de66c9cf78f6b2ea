"""Dead-letter administration: list, show, replay and purge the dead-letter queue.

Reading never removes a record. Every message is fetched unacknowledged on one
channel, then rejected with requeue in the order it was read: RabbitMQ puts a
requeued message back at its old position, and kombu's Redis transport pushes
it onto the back of the (by then drained) list, so both keep the order.
Closing the channel would requeue them too, but kombu's Redis transport
restores unacknowledged messages newest first, reversing the queue.

The queue is read as a snapshot of the messages in it when the call starts. A
record dead-lettered meanwhile is not listed, and on Redis it ends up ahead of
the older ones; two admin calls at once each see only part of the queue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError

from llmgine_celery.bus import topology
from llmgine_celery.bus.dead_letters import (
    INVALID_MESSAGE,
    DeadLetter,
    dead_letter_queue,
    parse_dead_letter,
    raw_text,
)
from llmgine_celery.errors import (
    BrokerUnavailableError,
    DeadLetterNotFoundError,
    DeadLetterNotReplayableError,
)
from llmgine_celery.settings import redact_url

if TYPE_CHECKING:
    from celery import Celery
    from kombu.connection import Connection

#: RabbitMQ confirms a replayed task before its dead letter is acked (ignored by Redis)
CONFIRMED = {"confirm_publish": True}


@dataclass
class _Held:
    """A dead-letter message fetched but not yet acknowledged, and its record."""

    message: Any
    record: DeadLetter


def list_dead_letters(celery: Celery) -> list[DeadLetter]:
    """Every record on the dead-letter queue, oldest first; none is removed."""
    with _connection(celery) as conn, _held_letters(conn) as held:
        return [h.record for h in held]


def get_dead_letter(celery: Celery, letter_id: str) -> DeadLetter:
    """The record with id ``letter_id`` (left on the queue)."""
    with _connection(celery) as conn, _held_letters(conn) as held:
        return _find(held, letter_id).record


def replay_dead_letter(celery: Celery, letter_id: str) -> DeadLetter:
    """Send a record's event to its one handler again; then remove the record."""
    with _connection(celery) as conn, _held_letters(conn) as held:
        found = _find(held, letter_id)
        record = found.record
        if not record.replayable:
            raise DeadLetterNotReplayableError(
                f"dead letter {letter_id!r} cannot be replayed: its kind is {record.kind!r} "
                f"({record.reason}); only a handler failure with its event, group and "
                "handler can be"
            )
        _send(celery, record, conn)
        # Acked only once the send returned: a failed send leaves the record queued.
        found.message.ack()
        return record


def purge_dead_letters(celery: Celery) -> int:
    """Remove every record from the dead-letter queue; return how many there were."""
    with _connection(celery) as conn:
        queue = dead_letter_queue()(conn.default_channel)
        queue.declare()
        return int(queue.purge() or 0)


def replay_target(record: DeadLetter) -> tuple[str, str, str]:
    """The task name, task id and queue a replay of ``record`` is sent with."""
    group, handler, event = record.group or "", record.handler or "", record.event or {}
    event_id = str((event.get("data") or {}).get("id", ""))
    return (
        record.task_name or topology.handler_task_name(group, handler),
        record.task_id or topology.handler_task_id(event_id, group, handler),
        topology.handler_queue_name(group),
    )


def _send(celery: Celery, record: DeadLetter, conn: Connection) -> None:
    name, task_id, queue = replay_target(record)
    event = record.event or {}
    celery.send_task(
        name,
        args=[event],
        task_id=task_id,
        queue=queue,
        connection=conn,
        add_to_parent=False,
        argsrepr=f"<{event.get('type')} replayed from dead letter {record.id}>",
        kwargsrepr="{}",
    )


def _find(held: list[_Held], letter_id: str) -> _Held:
    for h in held:
        if h.record.id == letter_id:
            return h
    raise DeadLetterNotFoundError(
        f"no dead letter {letter_id!r} on {topology.DEAD_LETTER_QUEUE} ({len(held)} there)"
    )


@contextmanager
def _connection(celery: Celery) -> Iterator[Connection]:
    """A broker connection; connection failures become BrokerUnavailableError."""
    url = redact_url(str(celery.conf.broker_write_url or celery.conf.broker_url))
    conn = celery.connection_for_write(transport_options=CONFIRMED)
    try:
        with conn:
            conn.ensure_connection(max_retries=1)
            yield conn
    except (OperationalError, OSError, *conn.connection_errors) as exc:
        raise BrokerUnavailableError(f"cannot use broker {url}: {exc}") from exc


@contextmanager
def _held_letters(conn: Connection) -> Iterator[list[_Held]]:
    """Every dead letter, held unacknowledged; on exit the un-acked go back in order."""
    channel = conn.channel()
    held: list[_Held] = []
    try:
        queue = dead_letter_queue()(channel)
        queue.declare()  # Redis needs the binding to requeue; a missing queue is empty
        # Bounded by the count at the start, so records arriving meanwhile cannot keep
        # the loop going. (Not passive: kombu's Redis says an empty queue is missing.)
        for _ in range(queue.queue_declare().message_count):
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                break
            held.append(_Held(message, _parse(message)))
        yield held
    finally:
        try:
            for h in held:
                if not h.message.acknowledged:
                    h.message.reject(requeue=True)
        finally:
            channel.close()


def _parse(message: Any) -> DeadLetter:
    """The record a message holds, or an INVALID_MESSAGE record describing it."""
    try:
        return parse_dead_letter(message.decode())
    except Exception as exc:  # whatever sits on the queue, the others must still be listed
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        return DeadLetter(
            kind=INVALID_MESSAGE,
            reason=f"not a dead-letter record: {type(exc).__name__}: {exc}",
            queue=topology.DEAD_LETTER_QUEUE,
            raw=raw_text(body),
            content_type=message.content_type,
            size=len(body),
            # Derived from the body, so the same message has the same id in every listing.
            id="unreadable-" + hashlib.sha256(body).hexdigest()[:16],
            dead_lettered_at="",
        )
