"""TaskObserver: one application's task lifecycle, as records on its ObservabilityBus.

The Celery signal receivers (``signals``) find the observer of the app a task
belongs to and call it; it knows llmgine's task names, so a command task's run
becomes ``command.started`` / ``command.result`` and a handler task's run
``handler.*``, while any other task keeps the generic ``task.*`` names. While a
task runs, the observer holds its :class:`Correlation` (so everything the
handler sends joins the trace) and its start time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llmgine_celery.observability import context, records
from llmgine_celery.observability.bus import LogLevel, ObservabilityBus, Record

#: (group, handler) of a handler task, by task name
HandlerNames = Mapping[str, tuple[str, str]]
#: Correlation of a message from its headers and the id of the message handled
CorrelationFrom = Callable[[Mapping[str, Any], str | None], context.Correlation]


@dataclass
class _Run:
    started: float
    token: Any
    fields: dict[str, Any]


class TaskObserver:
    """Turns one application's Celery task signals into records."""

    def __init__(
        self,
        bus: ObservabilityBus,
        *,
        command_prefix: str,
        handler_names: HandlerNames,
        correlation_from: CorrelationFrom,
        header_names: Mapping[str, str],
        on_started: Callable[[dict[str, Any]], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.bus = bus
        self._command_prefix = command_prefix
        self._handler_names = handler_names
        self._correlation_from = correlation_from
        self._h = header_names
        self._on_started = on_started
        self._on_error = on_error
        self._runs: dict[str, _Run] = {}

    # -- what a task is -----------------------------------------------------

    def kind(self, task_name: str | None) -> str:
        """``command``, ``handler`` or ``task``."""
        if task_name is None:
            return "task"
        if task_name.startswith(self._command_prefix):
            return "command"
        return "handler" if task_name in self._handler_names else "task"

    def message_fields(self, task_name: str | None, headers: Mapping[str, Any]) -> dict[str, Any]:
        """The llmgine ids a task message carries in its headers."""
        h, get = self._h, headers.get
        fields: dict[str, Any] = {}
        task_id = get("id")
        if task_id is not None:
            fields["task_id"] = task_id
        if task_name is not None:
            fields["task_name"] = task_name
        for name in ("session_id", "trace_id", "parent_span_id", "causation_id"):
            value = get(h[name])
            if value is not None:
                fields[name] = value
        kind = self.kind(task_name)
        if kind == "command" and task_name is not None:
            command_id = get(h["command_id"]) or task_id
            if command_id is not None:
                fields["command_id"] = command_id
            fields["command_type"] = task_name[len(self._command_prefix) :]
        elif kind == "handler" and task_name is not None:
            for name, header in (("event_id", h["event_id"]), ("event_type", h["type"])):
                value = get(header)
                if value is not None:
                    fields[name] = value
            fields["group"], fields["handler"] = self._handler_names[task_name]
        return fields

    # -- producer side ------------------------------------------------------

    def sent(self, task_name: str, headers: Mapping[str, Any], queue: str | None) -> None:
        """A task message was published.

        Not for handler tasks: a group's dispatcher sends one per handler and
        event, and the event's ``event.published`` and the run's own records tell
        what a sent record would, at a tenth of a dispatch's CPU.
        """
        kind = self.kind(task_name)
        if kind == "handler":
            return
        fields = self.message_fields(task_name, headers)
        fields.update(queue=queue, state="sent")
        # Stamped before the publish: a worker may record the start before this runs.
        sent_at = headers.get(self._h["sent_at"])
        ts = float(sent_at) if isinstance(sent_at, int | float) else None
        event = records.COMMAND_SENT if kind == "command" else records.TASK_SENT
        self._emit(LogLevel.INFO, event, fields, ts)

    # -- worker side ---------------------------------------------------------

    def received(self, task_name: str | None, task_id: str | None, queue: str | None) -> None:
        """A worker received a task message."""
        fields = {"task_id": task_id, "task_name": task_name, "queue": queue, "state": "received"}
        self._emit(LogLevel.DEBUG, records.TASK_RECEIVED, fields)

    def started(self, task_name: str, request: Any) -> None:
        """A task starts running: enter its correlation, record the start."""
        headers = _RequestHeaders(request)
        fields = self.message_fields(task_name, headers)
        handled = fields.get("command_id") or fields.get("event_id") or fields.get("task_id")
        correlation = self._correlation_from(headers, handled)
        fields["trace_id"] = correlation.trace_id
        fields["span_id"] = correlation.span_id
        queue = _queue_of(request)
        if queue is not None:
            fields["queue"] = queue
        fields["retries"] = getattr(request, "retries", 0) or 0
        fields["state"] = "started"
        worker = getattr(request, "hostname", None)
        if worker is not None:
            fields["worker"] = worker
        waited = _queue_wait(headers.get(self._h["sent_at"]), getattr(request, "eta", None))
        if waited is not None:
            fields["queue_wait_ms"] = waited
        token = context.activate(correlation)
        # one run per task id, set and popped on its own thread: a dict item needs no lock
        self._runs[str(request.id)] = _Run(time.perf_counter(), token, fields)
        self._record(LogLevel.INFO, _STARTED[self.kind(task_name)], fields)
        if self._on_started is not None:
            self._on_started(fields)

    def succeeded(self, task_name: str, request: Any, result: Any) -> None:
        """A task returned."""
        kind = self.kind(task_name)
        fields = self._finished(request, "succeeded")
        if kind == "command":
            # the command task leaves its outcome on the request: its result is JSON text
            outcome, error = _command_outcome(getattr(request, "llmgine_outcome", None) or result)
            fields["outcome"] = outcome
            if error is not None:
                fields["error"] = error
            level = LogLevel.INFO if outcome == "success" else LogLevel.WARNING
            self._record(level, records.COMMAND_RESULT, fields)
        elif kind == "handler":
            skipped = getattr(request, "llmgine_skipped", False)
            event = records.HANDLER_SKIPPED if skipped else records.HANDLER_SUCCEEDED
            self._record(LogLevel.INFO, event, fields)
        else:
            self._record(LogLevel.INFO, records.TASK_SUCCEEDED, fields)

    def retried(self, task_name: str, request: Any, reason: Any) -> None:
        """A task raised and will run again."""
        fields = self._finished(request, "retried", keep=True)
        exc = getattr(reason, "exc", None) or reason
        if isinstance(exc, BaseException):
            fields.update(exception=type(exc).__name__, error=str(exc))
        event = (
            records.HANDLER_RETRIED if self.kind(task_name) == "handler" else records.TASK_RETRIED
        )
        self._emit(LogLevel.WARNING, event, fields)

    def failed(self, task_name: str, request: Any, exc: BaseException | None) -> None:
        """A task raised for the last time."""
        fields = self._finished(request, "failed")
        if exc is not None:
            fields.update(exception=type(exc).__name__, error=str(exc))
        kind = self.kind(task_name)
        if kind == "command":
            fields["outcome"] = "error"
            self._emit(LogLevel.ERROR, records.COMMAND_RESULT, fields)
        else:
            event = records.HANDLER_FAILED if kind == "handler" else records.TASK_FAILED
            self._emit(LogLevel.ERROR, event, fields)

    def ended(self, request: Any) -> None:
        """A task's run is over, whatever happened: leave its correlation."""
        run = self._runs.pop(str(getattr(request, "id", "")), None)
        if run is not None:
            context.deactivate(run.token)

    def stage(self, event: str, level: LogLevel, **fields: Any) -> None:
        """A worker-level record (rejected, unknown, revoked, worker.ready, ...)."""
        self._emit(level, event, {k: v for k, v in fields.items() if v is not None})

    # -- internals ----------------------------------------------------------

    def _finished(self, request: Any, state: str, *, keep: bool = False) -> dict[str, Any]:
        run = self._runs.get(str(getattr(request, "id", "")))
        if run is None:  # no prerun seen (e.g. a failure before the task started)
            headers = _RequestHeaders(request)
            fields = self.message_fields(getattr(request, "task", None), headers)
            queue = _queue_of(request)
            if queue is not None:
                fields["queue"] = queue
        else:
            fields = dict(run.fields)
            fields["duration_ms"] = round((time.perf_counter() - run.started) * 1000, 3)
        fields.pop("queue_wait_ms", None)
        fields["state"] = state
        fields["retries"] = getattr(request, "retries", 0) or 0
        return fields

    def _emit(
        self, level: LogLevel, event: str, fields: dict[str, Any], ts: float | None = None
    ) -> None:
        present = {k: v for k, v in fields.items() if v is not None}
        record = Record(level, event, present)
        if ts is not None:
            record.created = ts
        self.bus.emit(record)

    def _record(self, level: LogLevel, event: str, fields: dict[str, Any]) -> None:
        # the hot path: fields built here hold no None
        self.bus.emit(Record(level, event, fields))


_STARTED = {
    "command": records.COMMAND_STARTED,
    "handler": records.HANDLER_STARTED,
    "task": records.TASK_STARTED,
}


class _RequestHeaders(Mapping[str, Any]):
    """A Celery task request (or message headers) read as a mapping of headers."""

    def __init__(self, request: Any) -> None:
        self._request = request

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        # the hot path of every task's records: no KeyError for a missing header
        value = getattr(self._request, key, None)
        if value is None:
            headers = getattr(self._request, "headers", None)
            if type(headers) is dict or isinstance(headers, Mapping):
                value = headers.get(key)
        return default if value is None else value

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def _queue_of(request: Any) -> str | None:
    info = getattr(request, "delivery_info", None) or {}
    queue = info.get("routing_key") if isinstance(info, Mapping) else None
    return queue if isinstance(queue, str) else None


def _command_outcome(result: Any) -> tuple[str, str | None]:
    if not isinstance(result, Mapping):
        return "success", None
    if result.get("success"):
        return "success", None
    metadata = result.get("metadata")
    reason = metadata.get("reason") if isinstance(metadata, Mapping) else None
    outcome = reason if reason in records.OUTCOMES else "failure"
    if reason == "invalid_message":
        outcome = "invalid"
    error = result.get("error")
    return str(outcome), error if isinstance(error, str) else None


def _queue_wait(sent_at: Any, eta: Any) -> float | None:
    """Milliseconds since the message was sent, or since its ETA (a retry's backoff is no wait)."""
    if not isinstance(sent_at, int | float):
        return None
    ready = float(sent_at)
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            ready = max(ready, datetime.fromisoformat(eta).timestamp())
    return round(max(0.0, time.time() - ready) * 1000, 3)
