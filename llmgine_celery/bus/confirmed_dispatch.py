"""Handler tasks sent with publisher confirms, off the worker's consumer thread (RabbitMQ).

A group's dispatcher turns one event into one task per handler (or a bad
message into a dead letter), then acks the message. Acked before the broker
has stored what it sent, the message would be lost with it if the broker or
the connection failed in between: so on RabbitMQ the message is acked only
once everything it sent is confirmed. A refusal (nack), a lost connection or
no answer within ``confirms.CONFIRM_TIMEOUT`` puts the message back in its
group queue ``REQUEUE_DELAY`` seconds later. Sent again, a task that already ran is
skipped (a successful handler run leaves a done-marker, see ``handler_tasks``).

The tasks are published by a publisher thread (``BatchPublisher``) on a
confirm-mode channel of its own connection, and the acks are written on the
consumer's thread (kombu's hub), the only thread that uses the consumer's
channels. That thread only queues sends and acks: a broker that holds back
publishers (a memory or disk alarm) stops the worker's dispatching, not its
hub, so heartbeats, acks, commands and handler tasks already queued go on, and
each group keeps at most its prefetch of events unacked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from llmgine_celery.bus.confirms import ConfirmChannel
from llmgine_celery.bus.publisher import BatchPublisher, Confirmation

if TYPE_CHECKING:
    from celery import Celery
    from kombu.message import Message

logger = logging.getLogger(__name__)

#: seconds a refused event waits, unacked, before it goes back to its queue (so a
#: broker that goes on refusing is asked once per event and delay, not in a loop)
REQUEUE_DELAY = 1.0

#: publishes one message (a task, a dead letter) with the producer it is given
TaskSend = Callable[[Any], None]


class AllConfirmed:
    """The confirmations of one event's tasks, answered when every one is."""

    __slots__ = ("_each",)

    def __init__(self, each: Sequence[Confirmation]) -> None:
        self._each = each

    def settled(self) -> bool:
        return all(confirm.settled() for confirm in self._each)

    def __call__(self) -> None:
        for confirm in self._each:  # the first refusal is the event's error
            confirm()


class ConfirmedDispatch:
    """A worker's confirmed dispatch: one publisher thread and channel for all its groups."""

    def __init__(self, celery: Celery, hub: Any) -> None:
        self._hub = hub
        self._confirms = ConfirmChannel(celery.connection_for_write, None)
        # the sends publish on the confirm channel's producer: no pooled one is needed
        self._publisher = BatchPublisher(lambda: nullcontext(None), acks=self._confirms)

    def dispatch(self, message: Message, sends: Sequence[TaskSend], what: str) -> None:
        """Publish ``sends`` on the publisher thread; then, on the hub, settle ``message``.

        Settled means acked once every send is confirmed, or else requeued after
        ``REQUEUE_DELAY`` seconds. ``what`` names what was sent, in the warning.
        """
        confirms, hub = self._confirms, self._hub

        def send_all(_: Any) -> Confirmation:
            return AllConfirmed([confirms.publish_with(send) for send in sends])

        def answered(error: BaseException | None) -> None:  # on the publisher thread
            hub.call_soon(settle, hub, message, error, what)

        self._publisher.send_then(send_all, answered)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, wait up to ``timeout`` s for confirmations, close the channel.

        Events whose answers come later stay unacked: the broker requeues them
        when the consumer's channel closes.
        """
        self._publisher.close(timeout)
        self._confirms.close()


def settle(hub: Any, message: Message, error: BaseException | None, what: str) -> None:
    """Ack ``message`` (``error`` is None) or requeue it ``REQUEUE_DELAY`` s later (hub thread)."""
    if error is None:
        _on_channel(message.ack, what)
        return
    logger.warning(
        "the broker did not take %s (%s): the message goes back to its queue in %gs",
        what,
        error,
        REQUEUE_DELAY,
    )
    hub.call_later(REQUEUE_DELAY, _on_channel, message.requeue, what)


def _on_channel(settle_message: Callable[[], None], what: str) -> None:
    try:
        settle_message()
    except Exception as exc:  # its channel is gone: the broker redelivers the event itself
        logger.info("%s could not be settled (%r); the broker redelivers it", what, exc)
