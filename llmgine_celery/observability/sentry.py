"""Sentry: sentry-sdk's CeleryIntegration, trace headers, llmgine tags, redaction.

``init_sentry`` runs when ``ApplicationBootstrap.celery`` first builds the app,
so under ``celery -A module:celery worker`` it runs while the CLI imports the
module: ``celery.worker.consumer`` (which binds Celery's ``build_tracer`` by
name when imported) is not imported yet, and the integration's patched tracer is
the one the worker uses. Should the consumer module be imported already (an
embedded worker that ran earlier in the process), it is re-pointed at the
patched tracer, since otherwise worker transactions and errors are silently lost.

Our sender builds task messages itself instead of calling ``apply_async``, which
is where the integration adds its headers, so :func:`trace_headers` gives the
same headers for the caller's current span. The worker reads them from the
message's nested ``headers`` header (celery#4875); see :func:`trace_headers`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import sentry_sdk
from sentry_sdk.consts import OP, SPANDATA
from sentry_sdk.crons import MonitorStatus, capture_checkin
from sentry_sdk.integrations.celery import CELERY_CONTROL_FLOW_EXCEPTIONS, CeleryIntegration
from sentry_sdk.tracing import BAGGAGE_HEADER_NAME, SENTRY_TRACE_HEADER_NAME, Transaction

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability.redact import Redactor
from llmgine_celery.settings import Settings

logger = logging.getLogger(__name__)

#: record fields that become tags on Sentry events, by tag name
TAGS = {
    "command_id": "command_id",
    "command_type": "command_type",
    "event_id": "event_id",
    "event_type": "event_type",
    "session_id": "session_id",
    "group": "group",
    "handler": "handler",
    # llmgine's own trace id; Sentry's trace is its "trace" context, not a tag
    "trace_id": "llmgine.trace_id",
}
#: the integration's header with the producer's clock, from which it measures queue latency
ENQUEUED_HEADER = "sentry-task-enqueued-time"
#: Celery copies a message's headers into the request, so the worker finds a
#: header named "headers" as ``request.headers``: the integration reads the trace there
NESTED_HEADERS = "headers"
#: headers the integration gives a task beat sends as a Sentry cron run
MONITOR_SLUG = "sentry-monitor-slug"
MONITOR_CHECK_IN_ID = "sentry-monitor-check-in-id"
MONITOR_CONFIG = "sentry-monitor-config"
MONITOR_STARTED = "sentry-monitor-start-timestamp-s"
_MONITOR_PREFIX = "sentry-monitor-"
#: ``origin`` of the spans started here
ORIGIN = "auto.queue.llmgine"

Hook = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None]

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_CAPTURED = "_llmgine_sentry_captured"
_lock = threading.Lock()
#: the DSN this module initialised Sentry with (None: not initialised here)
_dsn: str | None = None


def init_sentry(settings: Settings, service: str, options: Mapping[str, Any] | None = None) -> bool:
    """Initialise sentry-sdk once per process when a DSN is set; True when Sentry is active.

    ``options`` are extra keyword arguments of ``sentry_sdk.init`` (``release``,
    ``transport``, ...); hooks given there run before the redaction, which is last.
    A second call with the same DSN does nothing; another DSN is a
    ConfigurationError (one process reports to one project). A Sentry client the
    application initialised itself is left alone.
    """
    global _dsn
    if settings.sentry_dsn is None:
        return is_active()
    dsn = settings.sentry_dsn.get_secret_value()
    with _lock:
        if _dsn is not None and is_active():
            if dsn != _dsn:
                raise ConfigurationError(
                    "Sentry is already initialised in this process with another DSN"
                )
            return True
        if is_active():
            _check_foreign_client()
            return True
        sentry_sdk.init(**_init_options(settings, dsn, dict(options or {})))
        sentry_sdk.get_global_scope().set_tag("service", service)
        _dsn = dsn
        _repoint_consumer_tracer()
    return True


def close_sentry(timeout: float = 2.0) -> None:
    """Flush and close the client this module initialised (tests, orderly exits)."""
    global _dsn
    with _lock:
        if _dsn is None:
            return
        _dsn = None
        client = sentry_sdk.get_client()
        client.close(timeout=timeout)
        sentry_sdk.get_global_scope().set_client(None)
        sentry_sdk.get_global_scope().remove_tag("service")


def is_active() -> bool:
    """True when a Sentry client is active in this process."""
    return sentry_sdk.get_client().is_active()


def trace_headers() -> dict[str, Any]:
    """Headers that continue the current span's trace in a worker's task transaction.

    ``{"sentry-trace": ..., "baggage": ..., "sentry-task-enqueued-time": ...,
    "headers": {the same}}``, exactly what the integration adds in
    ``apply_async``; ``{}`` when Sentry is not active. Give them to
    ``app.amqp.send_task_message(headers=...)``, which merges them into the
    message headers; the worker reads the nested ``headers`` copy.
    """
    if not is_active():
        return {}
    scope = sentry_sdk.get_current_scope()
    span = _open_span(scope)
    found: dict[str, Any] = dict(
        scope.iter_trace_propagation_headers(span=span)
        if span is not None
        else scope.get_active_propagation_context().iter_headers()
    )
    if not found:
        return {}
    found[ENQUEUED_HEADER] = time.time()
    return {**found, NESTED_HEADERS: dict(found)}


def forward_trace_headers(incoming: Mapping[str, Any]) -> dict[str, Any]:
    """The trace headers of a message received, in the form :func:`trace_headers` gives.

    For a message that is not a task (an event on a group queue) passed on as a
    task: the task's transaction then continues the event publisher's trace.
    """
    nested = incoming.get(NESTED_HEADERS)
    sources = [nested, incoming] if isinstance(nested, Mapping) else [incoming]
    for source in sources:
        trace = source.get(SENTRY_TRACE_HEADER_NAME)
        if isinstance(trace, str) and trace:
            found: dict[str, Any] = {SENTRY_TRACE_HEADER_NAME: trace}
            baggage = source.get(BAGGAGE_HEADER_NAME)
            if isinstance(baggage, str) and baggage:
                found[BAGGAGE_HEADER_NAME] = baggage
            found[ENQUEUED_HEADER] = time.time()
            return {**found, NESTED_HEADERS: dict(found)}
    return {}


@contextlib.contextmanager
def producer_span(
    task_name: str,
    message_id: str,
    queue: str | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """A ``queue.publish`` span around sending a message; yields the headers to send.

    Inside a Sentry transaction (a web request's, a task's) it is a child span;
    outside any, it is a transaction of its own, so the producer's side of the
    trace is recorded, with llmgine's ``trace_id`` from ``fields`` as its trace id.
    Tags from ``fields`` hold inside the block only. Yields ``{}`` when inactive.
    """
    if not is_active():
        yield {}
        return
    fields = fields or {}
    with sentry_sdk.new_scope() as scope:
        _tag(scope, fields)
        span: Any
        parent = _open_span(scope)
        if parent is None:
            trace_id = fields.get("trace_id")
            transaction = Transaction(
                op=OP.QUEUE_PUBLISH, name=task_name, source="task", origin=ORIGIN
            )
            if _TRACE_ID.match(str(trace_id)):
                transaction.trace_id = str(trace_id)  # one id for llmgine's trace and Sentry's
            span = sentry_sdk.start_transaction(transaction)
        else:
            span = parent.start_child(op=OP.QUEUE_PUBLISH, name=task_name, origin=ORIGIN)
        with span:
            span.set_data(SPANDATA.MESSAGING_MESSAGE_ID, message_id)
            if queue is not None:
                span.set_data(SPANDATA.MESSAGING_DESTINATION_NAME, queue)
            yield trace_headers()


def current_trace_id() -> str | None:
    """Sentry's trace id where this runs (a new llmgine trace may reuse it), or None."""
    if not is_active():
        return None
    scope = sentry_sdk.get_current_scope()
    span = _open_span(scope)
    if span is not None:
        return str(span.trace_id)
    return str(scope.get_active_propagation_context().trace_id)


def set_tags(fields: Mapping[str, Any]) -> None:
    """Tag the current scope with the llmgine ids in ``fields`` (a worker's task scope)."""
    if is_active():
        _tag(sentry_sdk.get_current_scope(), fields)


def capture_error(exc: BaseException) -> None:
    """Report a handler's exception that no task failure shows (a failed CommandResult).

    An exception is reported once however often this is called with it; Celery's
    control-flow exceptions (Retry, Ignore, Reject) are not errors. An exception
    that escapes a task needs no call: the integration reports it. Called in a
    task that beat scheduled as a Sentry cron, it also reports the run as failed.
    """
    if not is_active() or isinstance(exc, CELERY_CONTROL_FLOW_EXCEPTIONS):
        return
    if getattr(exc, _CAPTURED, False):
        return
    sentry_sdk.capture_exception(exc)
    with contextlib.suppress(AttributeError):  # an exception type with __slots__
        setattr(exc, _CAPTURED, True)
    _fail_cron_run()


# -- internals ------------------------------------------------------------


def _open_span(scope: Any) -> Any:
    """The scope's span, if the transaction it belongs to is still open; else None.

    Without sentry-sdk's AsyncioIntegration, asyncio tasks (and threads started
    with a copied context) share one scope, and a span of another task can be
    left on it: sentry-sdk's redis.asyncio spans are never exited when the
    command raises or is cancelled. Such a span is no parent for a message.
    """
    span = scope.span
    transaction = getattr(span, "containing_transaction", None)
    if span is None or transaction is None or transaction.timestamp is not None:
        return None
    return span if span.timestamp is None else transaction


def _tag(scope: Any, fields: Mapping[str, Any]) -> None:
    for field, tag in TAGS.items():
        value = fields.get(field)
        if value is not None and value != "":
            scope.set_tag(tag, str(value)[:200])  # Sentry's limit on tag values


def _init_options(settings: Settings, dsn: str, options: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``sentry_sdk.init``: settings, then ``options``, redaction last."""
    if "dsn" in options:
        raise ConfigurationError("set the Sentry DSN with SENTRY_DSN, not in sentry_options")
    redactor = Redactor(settings.secrets(), max_depth=64, max_str=100_000, max_items=100_000)
    integrations = list(options.pop("integrations", ()))
    if not any(isinstance(i, CeleryIntegration) for i in integrations):
        integrations.append(
            CeleryIntegration(
                monitor_beat_tasks=settings.sentry_monitor_beat_tasks, propagate_traces=True
            )
        )
    before_send = _redacting(redactor, options.pop("before_send", None))
    before_send_transaction = _redacting(redactor, options.pop("before_send_transaction", None))
    return {
        "dsn": dsn,
        "environment": settings.sentry_environment,
        "traces_sample_rate": settings.sentry_traces_sample_rate,
        "server_name": socket.gethostname(),
        **options,
        "integrations": integrations,
        "before_send": before_send,
        "before_send_transaction": before_send_transaction,
    }


def _redacting(redactor: Redactor, hook: Hook | None) -> Hook:
    """``hook`` (if any), then the redaction: what leaves has no secret in it."""

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        if hook is not None:
            kept = hook(event, hint)
            if kept is None:
                return None
            event = kept
        cleaned = redactor(event)
        # an event the redactor cannot walk is dropped, not sent as it is
        return cleaned if isinstance(cleaned, dict) else None

    return before_send


def _fail_cron_run() -> None:
    """Report the running task's cron run (if beat sent it as one) failed instead of ok.

    The integration checks a cron run in as ok when its task succeeds, and a
    command task succeeds though its handler failed. Taking the monitor headers
    out of the request makes the integration's success receiver skip the run.
    """
    from celery import current_task

    task = current_task._get_current_object()
    headers = getattr(getattr(task, "request", None), "headers", None)
    if not isinstance(headers, dict):
        return
    layers = [headers]
    if isinstance(headers.get(NESTED_HEADERS), dict):
        layers.append(headers[NESTED_HEADERS])
    found: dict[str, Any] = {}
    for layer in layers:
        for key in [k for k in layer if str(k).startswith(_MONITOR_PREFIX)]:
            found.setdefault(key, layer.pop(key))
    slug, check_in_id = found.get(MONITOR_SLUG), found.get(MONITOR_CHECK_IN_ID)
    if not slug or not check_in_id:
        return
    started = found.get(MONITOR_STARTED)
    capture_checkin(
        monitor_slug=slug,
        check_in_id=check_in_id,
        status=MonitorStatus.ERROR,
        duration=time.time() - float(started) if started else None,
        monitor_config=found.get(MONITOR_CONFIG),
    )


def _repoint_consumer_tracer() -> None:
    """Make an already imported worker consumer build the integration's tracer."""
    consumer = sys.modules.get("celery.worker.consumer.consumer")
    if consumer is None:
        return
    from celery.app import trace

    patched = trace.build_tracer
    if getattr(consumer, "build_tracer", None) is not patched:
        setattr(consumer, "build_tracer", patched)  # noqa: B010  (a module from sys.modules)
        logger.info("Sentry initialised after Celery's worker consumer was imported; re-pointed")


def _check_foreign_client() -> None:
    """Warn when a client initialised elsewhere cannot see into Celery tasks."""
    if sentry_sdk.get_client().get_integration(CeleryIntegration) is None:
        logger.warning(
            "Sentry was initialised without CeleryIntegration before llmgine-celery could: "
            "task transactions and errors in workers will be missing"
        )
