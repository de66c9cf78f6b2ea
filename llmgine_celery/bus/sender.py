"""Publishing task messages (Celery's task protocol 2) with routes resolved once.

``Celery.send_task`` re-resolves the route, merges task options, declares the
queue and builds an ``AsyncResult`` on every call; for our task names all of
that is the same each time. ``TaskSender`` resolves a route once, declares its
queue on the first send only, builds a lean message (``task_message``) and
publishes it with Celery's own publisher (``app.amqp``), so publish signals,
publish retries and task-sent events work as for any task.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from celery import signals as celery_signals
from celery.app.amqp import task_message as TaskMessage
from celery.utils.nodenames import anon_nodename
from pydantic_core import PydanticSerializationError, to_json

from llmgine_celery.bus import topology
from llmgine_celery.bus.registry import HandlerRegistry
from llmgine_celery.messages.commands import Command
from llmgine_celery.messages.envelope import Envelope
from llmgine_celery.observability import signals
from llmgine_celery.observability.process import current_pid
from llmgine_celery.observability.redact import Redactor

if TYPE_CHECKING:
    from celery import Celery

#: characters of a message's fields shown by Flower and ``celery inspect``
ARGSREPR_CHARS = 256

_redact = Redactor(())


def argsrepr(envelope: Envelope) -> str:
    """What monitors show as a task's arguments: type, id and redacted fields, capped."""
    data = envelope["data"]
    fields = {k: v for k, v in data.items() if k not in {"id", "timestamp"}}
    redacted = _redact(fields)
    if isinstance(redacted, dict):  # cut long strings after redacting: no half secret shows
        redacted = {k: v[:ARGSREPR_CHARS] if isinstance(v, str) else v for k, v in redacted.items()}
    try:
        shown = to_json(redacted).decode()
    except PydanticSerializationError:  # a lone surrogate, say
        shown = json.dumps(redacted, ensure_ascii=False, default=str)
    if len(shown) > ARGSREPR_CHARS:
        shown = shown[: ARGSREPR_CHARS - 3] + "..."
    return f"<{envelope['type']} {data.get('id')}> {shown}"


#: the body's third part: no callbacks, errbacks, chain or chord
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: this process's Celery origin (``gen<pid>@<host>``), by pid
_origin: tuple[int, str] = (0, "")


def origin() -> str:
    """What Celery names a process that sends tasks outside any worker."""
    global _origin
    pid = current_pid()
    if _origin[0] != pid:
        _origin = (pid, anon_nodename())
    return _origin[1]


def task_message(
    celery: Celery,
    task_id: str,
    name: str,
    envelope: Envelope,
    *,
    root_id: str | None = None,
    parent_id: str | None = None,
    ignore_result: bool = False,
    sent_event: bool | None = None,
) -> Any:
    """Celery's task protocol 2, without the headers that would carry nothing.

    ``create_task_message`` writes two dozen headers, most of them None, zero or
    empty (eta, expires, group, shadow, timelimit, stamps, ...), and the worker
    reads every one of those with a default. Each costs an AMQP table entry to
    encode here and to decode in the worker. Sent: ``lang``, ``task``, ``id``,
    ``root_id``, ``argsrepr``, ``kwargsrepr``, ``origin``; ``parent_id`` when
    sent from a task; ``ignore_result`` when true. ``sent_event`` (default:
    ``task_send_sent_event``) adds what Celery's task-sent event carries.
    """
    shown = argsrepr(envelope)
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "root_id": root_id or task_id,
        "argsrepr": shown,
        "kwargsrepr": "{}",
        "origin": origin(),
    }
    if parent_id is not None:
        headers["parent_id"] = parent_id
    if ignore_result:
        headers["ignore_result"] = True
    if celery_signals.task_sent.receivers:  # Celery's deprecated signal reads these two
        headers.update(eta=None, group=None)
    if sent_event is None:
        sent_event = bool(celery.conf.task_send_sent_event)
    event = None
    if sent_event:
        event = {
            "uuid": task_id, "root_id": headers["root_id"], "parent_id": parent_id,
            "name": name, "args": shown, "kwargs": "{}", "retries": 0, "eta": None,
            "expires": None,
        }  # fmt: skip
    properties = {"correlation_id": task_id, "reply_to": celery.thread_oid}
    body: tuple[Any, ...] = ([envelope], {}, dict(_EMBED))
    return TaskMessage(headers=headers, properties=properties, body=body, sent_event=event)


class TaskSender:
    """Sends task messages by name to a queue; raises OperationalError or OSError."""

    def __init__(self, celery: Celery) -> None:
        self._celery = celery
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str | None], dict[str, Any]] = {}
        # read once: a settings lookup costs microseconds, and sends come by the thousand
        self._sent_events = bool(celery.conf.task_send_sent_event)

    def send(
        self,
        name: str,
        task_id: str,
        envelope: Envelope,
        *,
        queue: str | None = None,
        headers: dict[str, Any] | None = None,
        ignore_result: bool = False,
        producer: Any = None,
        retry: bool = True,
    ) -> None:
        """Publish task ``name`` with the envelope as its one argument.

        ``ignore_result`` travels in the message and overrides the task's own
        setting in the worker, so it must be given for tasks without results.
        ``retry=False``: a failed publish raises at once, not retried on a
        revived connection (a confirm-mode producer must not move channels).
        """
        celery = self._celery
        key = (name, queue)
        options, first = self._route(key)
        root_id, parent_id = _lineage(celery)
        message = task_message(
            celery,
            task_id,
            name,
            envelope,
            root_id=root_id,
            parent_id=parent_id,
            ignore_result=ignore_result,
            sent_event=self._sent_events,
        )
        send = celery.amqp.send_task_message
        with celery.producer_or_acquire(producer) as pooled, signals.publishing(celery):
            try:  # first without kombu's retry wrapper, which costs a closure per publish
                send(pooled, name, message, headers=headers, retry=False, **options)
            except _recoverable(pooled):  # then as Celery would: reconnect and retry
                if not retry:
                    raise
                send(pooled, name, message, headers=headers, **options)
        if first:
            with self._lock:  # later sends skip declaring the queue
                self._routes[key] = {**options, "declare": []}

    def _route(self, key: tuple[str, str | None]) -> tuple[dict[str, Any], bool]:
        known = self._routes.get(key)
        if known is not None:
            return known, False
        name, queue = key
        wanted = {"queue": queue} if queue else {}
        options: dict[str, Any] = self._celery.amqp.router.route(wanted, name, None, None)
        return options, True


class CommandSender:
    """Sends commands as tasks named ``llmgine.command.<Type>`` with id = command id."""

    def __init__(self, celery: Celery, registry: HandlerRegistry) -> None:
        self._tasks = TaskSender(celery)
        self._registry = registry

    def send(
        self,
        command: Command,
        envelope: Envelope,
        producer: Any = None,
        correlation: dict[str, Any] | None = None,
        reply_to: str | None = None,
        retry: bool = True,
    ) -> None:
        """Publish ``command`` to its route's queue (default ``llmgine.commands``).

        ``correlation`` holds the trace headers, taken where the command was
        issued (this may run on the publisher thread, outside that context).
        ``reply_to`` names the Redis channel the caller waits on; ``retry`` is
        ``TaskSender.send``'s.
        """
        route = self._registry.command_route(type(command))
        # its id is the task's id and its type in the task's name: not repeated here
        headers = dict(correlation) if correlation else {}
        if command.session_id is not None:
            headers[topology.HEADER_SESSION_ID] = command.session_id
        if reply_to is not None:
            headers[topology.HEADER_REPLY_TO] = reply_to
        self._tasks.send(
            topology.command_task_name(envelope["type"]),
            command.id,
            envelope,
            queue=route.queue if route else None,
            headers=headers,
            producer=producer,
            retry=retry,
        )


def _recoverable(producer: Any) -> tuple[type[BaseException], ...]:
    """The errors after which a publish is worth retrying on a revived connection."""
    connection = producer.connection
    errors: tuple[type[BaseException], ...] = (
        *connection.recoverable_connection_errors,
        *connection.recoverable_channel_errors,
    )
    return errors


def _lineage(celery: Celery) -> tuple[str | None, str | None]:
    """Root and parent task ids when sending from inside a task (a handler)."""
    parent = celery.current_worker_task
    if not parent:
        return None, None
    return parent.request.root_id or parent.request.id, parent.request.id
