"""Celery signals feed the ObservabilityBus, on producers and on workers.

Celery's signals are process-wide; each receiver finds the :class:`TaskObserver`
of the app the signal is about (``app.llmgine_observer``, set by
``ApplicationBootstrap``) and ignores apps that have none. The publish signals
name no app: llmgine's senders say which (``publishing``); for other sends they
go to the observer whose app knows the task, else to the first one. Receivers
are connected once per process; Celery logs and swallows a receiver's
exception, and the bus isolates sinks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from celery import signals

from llmgine_celery.observability import records
from llmgine_celery.observability.bus import LogLevel
from llmgine_celery.observability.observer import TaskObserver

#: the attribute of a Celery app that holds its observer
ATTRIBUTE = "llmgine_observer"

_apps: weakref.WeakSet[Any] = weakref.WeakSet()
#: the app whose sender is publishing on this thread (publish signals name none)
_publishing: ContextVar[Any] = ContextVar("llmgine_publishing", default=None)
_connected = False
_lock = threading.Lock()

#: called with the app when a worker is ready / with a child's pid when it exits
_on_worker_ready: list[Callable[[Any], None]] = []
_on_process_exit: list[Callable[[int], None]] = []
#: apps whose worker runs in this process (worker_ready said so)
_worker_apps: weakref.WeakSet[Any] = weakref.WeakSet()
#: the header stamped with each publish's time: a worker measures queue wait from it
_sent_at_header: str | None = None


def observe(app: Any, observer: TaskObserver, sent_at_header: str | None = None) -> None:
    """Send ``app``'s task signals to ``observer``; connects the receivers once.

    ``sent_at_header`` is stamped with the time of every task message published
    here (retries too), so that a worker's queue wait is this delivery's.
    """
    global _sent_at_header
    if sent_at_header is not None:
        _sent_at_header = sent_at_header
    setattr(app, ATTRIBUTE, observer)
    with _lock:
        _apps.add(app)
        _connect()


@contextlib.contextmanager
def publishing(app: Any) -> Iterator[None]:
    """Publish signals raised in the block are about ``app``."""
    token = _publishing.set(app)
    try:
        yield
    finally:
        _publishing.reset(token)


def on_worker_ready(callback: Callable[[Any], None]) -> None:
    """Call ``callback(app)`` in a worker's main process once it is ready."""
    if callback not in _on_worker_ready:
        _on_worker_ready.append(callback)


def on_process_exit(callback: Callable[[int], None]) -> None:
    """Call ``callback(pid)`` when a prefork child of a worker exits."""
    if callback not in _on_process_exit:
        _on_process_exit.append(callback)


def observer_of(app: Any) -> TaskObserver | None:
    """The observer of ``app``, if llmgine wired it."""
    found = getattr(app, ATTRIBUTE, None)
    return found if isinstance(found, TaskObserver) else None


def _for_task(task: Any) -> TaskObserver | None:
    return observer_of(getattr(task, "app", None))


def _for_published(task_name: str) -> TaskObserver | None:
    sending = observer_of(_publishing.get())
    if sending is not None:
        return sending
    first = None
    for app in list(_apps):
        observer = observer_of(app)
        if observer is None:
            continue
        if task_name in app.tasks:
            return observer
        first = first or observer
    return first


# -- producer side -------------------------------------------------------------


def _before_publish(sender: str | None = None, headers: Any = None, **_: Any) -> None:
    if not isinstance(headers, dict):
        return
    if _sent_at_header is not None:
        headers[_sent_at_header] = time.time()


def _after_publish(
    sender: str | None = None, headers: Any = None, routing_key: str | None = None, **_: Any
) -> None:
    if sender is None or not isinstance(headers, Mapping):
        return
    observer = _for_published(sender)
    if observer is not None:
        observer.sent(sender, headers, routing_key)


# -- worker side -------------------------------------------------------------------


def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    observer = observer_of(getattr(sender, "app", None))
    if observer is not None and request is not None:
        queue = (request.delivery_info or {}).get("routing_key")
        observer.received(request.name, request.id, queue)


def _prerun(sender: Any = None, task: Any = None, **_: Any) -> None:
    observer = _for_task(task)
    if observer is not None:
        observer.started(task.name, task.request)


def _success(sender: Any = None, result: Any = None, **_: Any) -> None:
    observer = _for_task(sender)
    if observer is not None:
        observer.succeeded(sender.name, sender.request, result)


def _retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    observer = _for_task(sender)
    if observer is not None:
        observer.retried(sender.name, request if request is not None else sender.request, reason)


def _failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    observer = _for_task(sender)
    if observer is not None:
        observer.failed(sender.name, sender.request, exception)


def _postrun(sender: Any = None, task: Any = None, **_: Any) -> None:
    observer = _for_task(task)
    if observer is not None:
        observer.ended(task.request)


def _rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    observer = observer_of(getattr(sender, "app", None))
    if observer is None:
        return
    headers = getattr(message, "headers", None) or {}
    info = getattr(message, "delivery_info", None) or {}
    observer.stage(
        records.TASK_REJECTED,
        LogLevel.WARNING,
        task_id=headers.get("id"),
        task_name=headers.get("task"),
        queue=info.get("routing_key"),
        state="rejected",
        error=str(exc) if exc is not None else None,
        exception=type(exc).__name__ if isinstance(exc, BaseException) else None,
    )


def _unknown(
    sender: Any = None,
    name: str | None = None,
    id: str | None = None,
    message: Any = None,
    **_: Any,
) -> None:
    observer = observer_of(getattr(sender, "app", None))
    if observer is None:
        return
    info = getattr(message, "delivery_info", None) or {}
    observer.stage(
        records.TASK_UNKNOWN,
        LogLevel.ERROR,
        task_id=id,
        task_name=name,
        queue=info.get("routing_key"),
        state="unknown",
        error=f"no task named {name!r} is registered in this worker",
    )


def _revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    expired: bool = False,
    **_: Any,
) -> None:
    observer = _for_task(sender)
    if observer is None or request is None:
        return
    observer.stage(
        records.TASK_REVOKED,
        LogLevel.WARNING,
        task_id=getattr(request, "id", None),
        task_name=getattr(request, "name", None) or getattr(sender, "name", None),
        state="revoked",
        reason="expired" if expired else "terminated" if terminated else "revoked",
    )


def _worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    observer = observer_of(app)
    if observer is None:
        return
    _worker_apps.add(app)
    hostname = getattr(sender, "hostname", None)
    observer.stage(records.WORKER_READY, LogLevel.INFO, worker=hostname, worker_pid=os.getpid())
    for callback in _on_worker_ready:
        callback(app)


def _worker_stopping(sender: Any = None, sig: Any = None, how: Any = None, **_: Any) -> None:
    for app in list(_worker_apps):  # not every app the worker's module happens to build
        observer = observer_of(app)
        if observer is not None:
            observer.stage(
                records.WORKER_STOPPING,
                LogLevel.INFO,
                worker=sender if isinstance(sender, str) else None,
                signal=str(sig) if sig is not None else None,
                how=str(how) if how is not None else None,
            )


def _process_exit(sender: Any = None, pid: int | None = None, **_: Any) -> None:
    for callback in _on_process_exit:
        callback(pid if pid is not None else os.getpid())


def _beat_init(sender: Any = None, **_: Any) -> None:
    observer = observer_of(getattr(sender, "app", None))
    if observer is not None:
        observer.stage(records.BEAT_STARTED, LogLevel.INFO, started_at=time.time())


def _connect() -> None:
    global _connected
    if _connected:
        return
    pairs = [
        (signals.before_task_publish, _before_publish),
        (signals.after_task_publish, _after_publish),
        (signals.task_received, _received),
        (signals.task_prerun, _prerun),
        (signals.task_success, _success),
        (signals.task_retry, _retry),
        (signals.task_failure, _failure),
        (signals.task_postrun, _postrun),
        (signals.task_rejected, _rejected),
        (signals.task_unknown, _unknown),
        (signals.task_revoked, _revoked),
        (signals.worker_ready, _worker_ready),
        (signals.worker_shutting_down, _worker_stopping),
        (signals.worker_process_shutdown, _process_exit),
        (signals.beat_init, _beat_init),
    ]
    for signal, receiver in pairs:
        signal.connect(receiver, weak=False, dispatch_uid=f"llmgine.{receiver.__name__}")
    _connected = True
