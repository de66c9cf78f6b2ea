"""Dead letters: what could not be handled, with why, kept on a durable queue."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kombu.entity import Exchange, Queue

from llmgine_celery.bus import topology
from llmgine_celery.messages.commands import new_id, utc_now_iso
from llmgine_celery.messages.envelope import dump, load

if TYPE_CHECKING:
    from celery import Celery

#: a handler failed its last retry
HANDLER_FAILED = "handler_failed"
#: a message on an event queue could not be decoded or validated, or was too big
INVALID_MESSAGE = "invalid_message"

#: at most this much of an undecodable body is kept, as text
RAW_KEEP_BYTES = 64 * 1024


@dataclass
class DeadLetter:
    """One dead-lettered message and everything known about its failure."""

    kind: str
    reason: str
    queue: str
    error: str | None = None
    traceback: str | None = None
    attempts: int = 0
    group: str | None = None
    handler: str | None = None
    task_name: str | None = None
    task_id: str | None = None
    #: the event's envelope, when it could be decoded
    event: dict[str, Any] | None = None
    #: the start of an undecodable body, as text (never deserialised)
    raw: str | None = None
    content_type: str | None = None
    size: int | None = None
    first_failed_at: str | None = None
    id: str = field(default_factory=new_id)
    dead_lettered_at: str = field(default_factory=utc_now_iso)

    @property
    def replayable(self) -> bool:
        """True when the event and its one handler are known."""
        return self.kind == HANDLER_FAILED and bool(self.event and self.group and self.handler)


def dead_letter_queue() -> Queue:
    """The durable dead-letter queue, on a direct exchange of the same name."""
    name = topology.DEAD_LETTER_QUEUE
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


def raw_text(body: bytes | str | None) -> str | None:
    """The start of a body as text, for a person to read; never deserialised."""
    if body is None:
        return None
    data = body if isinstance(body, bytes) else body.encode("utf-8", "replace")
    return data[:RAW_KEEP_BYTES].decode("utf-8", "replace")


def send_dead_letter(
    celery: Celery, record: DeadLetter, producer: Any = None, retry: bool = True
) -> None:
    """Publish ``record`` to the dead-letter queue (declared if missing).

    ``retry=False``: a failed publish raises at once (a confirm-mode producer
    must not move to a revived connection).
    """
    queue = dead_letter_queue()
    with celery.producer_or_acquire(producer) as pooled:
        pooled.publish(
            dump(record),
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            serializer="json",
            delivery_mode=2,
            declare=[queue],
            retry=retry,
            retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5},
            headers={"llmgine_dead_letter_kind": record.kind},
        )


def parse_dead_letter(body: Any) -> DeadLetter:
    """A dead-letter record from a decoded message body."""
    return load(DeadLetter, body)
