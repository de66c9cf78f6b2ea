"""One Celery task per event handler and group: run, retry, dead-letter, run once.

A handler task's id is ``<event_id>:<group>:<handler>``. It retries on its own
group's handler queue (never through the events exchange, which would fan the
retry out to every group), with exponential backoff and full jitter. After its
last retry the event goes to the dead letters with the error and traceback, an
``EventHandlerFailedEvent`` is published, and the task fails (once). A run that
succeeded leaves a marker in the result backend, so a redelivered copy of the
same (event, group, handler) is not run again.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmgine_celery.bus import topology
from llmgine_celery.bus.correlation import outgoing_headers
from llmgine_celery.bus.dead_letters import HANDLER_FAILED, DeadLetter, send_dead_letter
from llmgine_celery.bus.events import event_headers, publish_event, published_record
from llmgine_celery.bus.registry import EventRoute, HandlerRegistry
from llmgine_celery.bus.runtime import call_handler
from llmgine_celery.bus.task_request import llmgine_task
from llmgine_celery.messages.envelope import encode
from llmgine_celery.messages.events import Event
from llmgine_celery.messages.system import EventHandlerFailedEvent
from llmgine_celery.observability import signals

if TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)


class DoneMarks:
    """Markers of handler runs that succeeded, kept in the result backend."""

    def __init__(self, celery: Celery) -> None:
        self._celery = celery

    def seen(self, task_id: str) -> bool:
        backend = self._celery.backend
        if not hasattr(backend, "get"):
            return False  # a backend without keys: at-least-once without dedup
        return backend.get(_done_key(task_id)) is not None

    def mark(self, task_id: str) -> None:
        backend = self._celery.backend
        key = _done_key(task_id)
        client = getattr(backend, "client", None)
        if client is not None and hasattr(client, "set"):
            client.set(key, b"1", ex=int(self._celery.conf.result_expires or 86400))
        elif hasattr(backend, "set"):
            backend.set(key, b"1")


def _done_key(task_id: str) -> bytes:
    return (topology.DONE_KEY_PREFIX + task_id).encode()


def register_handler_task(
    celery: Celery,
    registry: HandlerRegistry,
    route: EventRoute,
    transport: str,
    on_dead_letter: Callable[[DeadLetter], None],
) -> Task:
    """Create (once) the Celery task of one handler in one group."""
    if route.task_name in celery.tasks:
        return celery.tasks[route.task_name]
    marks = DoneMarks(celery)
    queue = topology.handler_queue_name(route.group)

    def event_handler_task(self: Task, envelope: Any) -> None:
        task_id = self.request.id or ""
        # Checked on every run, not only on redelivery: a publisher that retries
        # after a lost confirmation sends a fresh copy with the same event id.
        if marks.seen(task_id):
            logger.info("%s already handled %s; skipping the copy", route.task_name, task_id)
            self.request.llmgine_skipped = True  # read by the observer: handler.skipped
            return
        event = registry.types.decode(envelope)
        try:
            for match in registry.event_routes_for(route.group, event):
                if match.name == route.name:
                    call_handler(match.handler, event)
        except Exception as exc:
            retries = self.request.retries
            if retries < route.retry.max_retries:
                countdown = route.retry.delay(retries, random.random)
                raise self.retry(
                    exc=exc,
                    countdown=countdown,
                    max_retries=route.retry.max_retries,
                    queue=queue,
                    headers=_message_headers(self.request),
                ) from exc
            on_dead_letter(_give_up(celery, transport, route, self, envelope, event, exc))
            raise
        marks.mark(task_id)

    event_handler_task.__doc__ = f"Run handler {route.name} of group {route.group}."
    # Dispatch and retries name the group's handler queue explicitly.
    return llmgine_task(celery, route.task_name, event_handler_task, ignore_result=True)


def _message_headers(request: Any) -> dict[str, Any]:
    """The llmgine headers of the message being handled (``Task.retry`` drops them)."""
    names = topology.CORRELATION_HEADERS.values()
    return {n: getattr(request, n) for n in names if getattr(request, n, None) is not None}


def _give_up(
    celery: Celery,
    transport: str,
    route: EventRoute,
    task: Task,
    envelope: dict[str, Any],
    event: Event,
    exc: Exception,
) -> DeadLetter:
    """Dead-letter the event and announce the failure (not for a failure event)."""
    error = f"{type(exc).__name__}: {exc}"
    attempts = task.request.retries + 1
    record = DeadLetter(
        kind=HANDLER_FAILED,
        reason=f"handler {route.name} of group {route.group} failed {attempts} times",
        queue=topology.handler_queue_name(route.group),
        error=error,
        traceback="".join(traceback.format_exception(exc)),
        attempts=attempts,
        group=route.group,
        handler=route.name,
        task_name=route.task_name,
        task_id=task.request.id,
        event=envelope,
    )
    send_dead_letter(celery, record)
    # a warning: the failure itself is reported once already (Sentry, handler.failed)
    logger.warning(
        "%s dead-lettered %s after %d attempts: %s",
        route.task_name,
        event.id,
        record.attempts,
        error,
    )
    if isinstance(event, EventHandlerFailedEvent):
        return record  # a failing handler of failure events must not feed itself forever
    failed = EventHandlerFailedEvent(
        event_type=envelope["type"],
        event_id=event.id,
        group=route.group,
        handler=route.name,
        error=error,
        attempts=record.attempts,
        dead_letter_id=record.id,
        session_id=event.session_id,
    )
    failed_envelope = encode(failed)
    headers = event_headers(failed_envelope, outgoing_headers())  # in the run's trace
    publish_event(celery, transport, failed_envelope, headers=headers)
    observer = signals.observer_of(celery)
    if observer is not None:
        observer.bus.emit(published_record(failed_envelope, headers, transport))
    return record
