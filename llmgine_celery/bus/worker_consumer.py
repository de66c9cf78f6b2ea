"""The worker's consumer: Celery's, with task events sent in batches.

A worker sends three task events per task (received, started, succeeded) for
Flower and ``celery events``. With an event loop, Celery buffers them and
flushes the buffer on the loop's next turn: under load that is a publish (a
JSON encode and a broker write) for every one or two events. Here the first
buffered event schedules one flush ``EVENTS_LINGER`` seconds later, so a busy
worker sends its events in a few batches per second; the dispatcher still
flushes as soon as its buffer holds ``buffer_limit`` events. Monitors see
events up to ``EVENTS_LINGER`` late. Events still buffered when the consumer
shuts down are flushed first.

With the solo pool a task runs on the hub's own thread, and the ack of a
message read by a callback the hub queued for itself (kombu's reader goes on
that way while data is waiting) is queued for the next turn too. kombu's hub
then polls for up to its next timer before that turn (a callback queued on its
own thread does not wake it), and with late acks and a prefetch of one the
broker sends nothing until the ack: ~10 tasks/s with the events' timer, stalls
of tens of seconds without it. For the solo pool the consumer wakes the poll when a turn
leaves callbacks waiting (the same wake-up another thread's callback makes).

On plain AMQP the consumer's connection reads ahead (``amqp_transport``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.concurrency.solo import TaskPool as SoloPool
from celery.worker.consumer import Consumer

from llmgine_celery.bus.amqp_transport import consumer_transport
from llmgine_celery.bus.hub_wake import wake_for_waiting_callbacks

#: seconds buffered task events wait for others before they are published
EVENTS_LINGER = 0.05
#: task events one publish carries at most (Celery's default is 24)
EVENTS_BUFFER_LIMIT = 512
#: seconds after which a scheduled flush that never ran (its timer was
#: cleared, say by a reconnection) no longer holds back the next one
STALE_FLUSH = 1.0


class LLMgineConsumer(Consumer):
    """Celery's consumer with lingering task-event flushes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flush_lock = threading.Lock()
        #: when the pending flush was asked for (0: none pending)
        self._flush_asked = 0.0

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """The task consumer's connection: read-ahead on plain AMQP (see ``amqp_transport``)."""
        transport = consumer_transport(self.app)
        if transport is None:
            return super().connection_for_read(heartbeat)
        return self.ensure_connected(
            self.app.connection_for_read(heartbeat=heartbeat, transport=transport)
        )

    def register_with_event_loop(self, hub: Any) -> None:
        super().register_with_event_loop(hub)
        if isinstance(self.pool, SoloPool):  # the set keeps one per reconnection
            hub.on_tick.add(self._wake_for_waiting_callbacks)

    def _wake_for_waiting_callbacks(self) -> None:
        wake_for_waiting_callbacks(self.hub)  # runs before every poll

    def on_send_event_buffered(self) -> None:
        # Called on the hub's thread and on pool threads: the hub's timer is the
        # hub thread's own, so the flush is scheduled from there (call_soon is
        # the one thread-safe entry).
        if self.hub is None:
            return
        now = time.monotonic()
        with self._flush_lock:
            if self._flush_asked and now - self._flush_asked < STALE_FLUSH:
                return
            self._flush_asked = now
        self.hub.call_soon(self._schedule_flush)

    def _schedule_flush(self) -> None:
        dispatcher = self.event_dispatcher
        if dispatcher is not None and dispatcher.buffer_limit < EVENTS_BUFFER_LIMIT:
            dispatcher.buffer_limit = EVENTS_BUFFER_LIMIT
        self.hub.call_later(EVENTS_LINGER, self._lingered_flush)

    def _lingered_flush(self) -> None:
        with self._flush_lock:
            self._flush_asked = 0.0
        self._flush_events()

    def shutdown(self) -> None:
        """Publish buffered task events before the dispatcher is closed."""
        self._flush_events()
        super().shutdown()
