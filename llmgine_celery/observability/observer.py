"""TaskObserver: one application's task lifecycle, as records on its ObservabilityBus.

The Celery signal receivers (``signals``) find the observer of the app a task
belongs to and call it; it knows llmgine's task names, so a command task's run
becomes ``command.started`` / ``command.result`` and a handler task's run
``handler.*``, while any other task keeps the generic ``task.*`` names. While a
task runs, the observer holds its :class:`Correlation` (so everything the
handler sends joins the trace) and its start time.

On a task's own thread the observer does only what must happen there: enter
the correlation, note the times and the outcome. The records' fields are built
on first use (``Record(build=...)``), which for the lifecycle records is the
sinks' writer thread: a threads-pool worker's task threads spend the GIL on
tasks rather than on formatting records.
"""

from __future__ import annotations

import contextlib
import functools
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
    #: the run's started record, whose fields its later records start from
    record: Record


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
        fields = functools.partial(_present, task_id=task_id, task_name=task_name, queue=queue)
        self.bus.emit(Record(LogLevel.DEBUG, records.TASK_RECEIVED, build=fields))

    def started(self, task_name: str, request: Any) -> None:
        """A task starts running: enter its correlation, record the start."""
        kind = self.kind(task_name)
        headers = _RequestHeaders(request)
        correlation = self._correlation_from(headers, self._handled(kind, headers))
        token = context.activate(correlation)
        build = functools.partial(
            self._started_fields, task_name, request, correlation, time.time()
        )
        record = Record(LogLevel.INFO, _STARTED[kind], build=build)
        # one run per task id, set and popped on its own thread: a dict item needs no lock
        self._runs[str(request.id)] = _Run(time.perf_counter(), token, record)
        self.bus.emit(record)
        if self._on_started is not None:
            self._on_started(record.fields)

    def succeeded(self, task_name: str, request: Any, result: Any) -> None:
        """A task returned."""
        kind = self.kind(task_name)
        ended = time.perf_counter()
        if kind == "command":
            # the command task leaves its outcome on the request: its result is JSON text
            outcome, error = _command_outcome(getattr(request, "llmgine_outcome", None) or result)
            level = LogLevel.INFO if outcome == "success" else LogLevel.WARNING
            extra = {"outcome": outcome} if error is None else {"outcome": outcome, "error": error}
            event = records.COMMAND_RESULT
        elif kind == "handler":
            level, extra = LogLevel.INFO, {}
            skipped = getattr(request, "llmgine_skipped", False)
            event = records.HANDLER_SKIPPED if skipped else records.HANDLER_SUCCEEDED
        else:
            level, extra, event = LogLevel.INFO, {}, records.TASK_SUCCEEDED
        run = self._runs.get(str(getattr(request, "id", "")))
        build = functools.partial(self._finished, request, "succeeded", run, ended, extra)
        self.bus.emit(Record(level, event, build=build))

    def retried(self, task_name: str, request: Any, reason: Any) -> None:
        """A task raised and will run again."""
        fields = self._finished_now(request, "retried")
        exc = getattr(reason, "exc", None) or reason
        if isinstance(exc, BaseException):
            fields.update(exception=type(exc).__name__, error=str(exc))
        event = (
            records.HANDLER_RETRIED if self.kind(task_name) == "handler" else records.TASK_RETRIED
        )
        self._emit(LogLevel.WARNING, event, fields)

    def failed(self, task_name: str, request: Any, exc: BaseException | None) -> None:
        """A task raised for the last time."""
        fields = self._finished_now(request, "failed")
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

    def _handled(self, kind: str, headers: _RequestHeaders) -> str | None:
        """The id of the message a task handles: the cause of whatever it sends."""
        if kind == "command":
            found = headers.get(self._h["command_id"])
        elif kind == "handler":
            found = headers.get(self._h["event_id"])
        else:
            found = None
        if found is None:
            found = headers.get("id")
        return found if isinstance(found, str) else None

    def _started_fields(
        self, task_name: str, request: Any, correlation: context.Correlation, now: float
    ) -> dict[str, Any]:
        headers = _RequestHeaders(request)
        fields = self.message_fields(task_name, headers)
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
        sent_at = headers.get(self._h["sent_at"])
        waited = _queue_wait(sent_at, getattr(request, "eta", None), now)
        if waited is not None:
            fields["queue_wait_ms"] = waited
        return fields

    def _finished_now(self, request: Any, state: str) -> dict[str, Any]:
        run = self._runs.get(str(getattr(request, "id", "")))
        return self._finished(request, state, run, time.perf_counter(), {})

    def _finished(
        self, request: Any, state: str, run: _Run | None, ended: float, extra: dict[str, Any]
    ) -> dict[str, Any]:
        if run is None:  # no prerun seen (e.g. a failure before the task started)
            headers = _RequestHeaders(request)
            fields = self.message_fields(getattr(request, "task", None), headers)
            queue = _queue_of(request)
            if queue is not None:
                fields["queue"] = queue
        else:
            fields = dict(run.record.fields)
            fields["duration_ms"] = round((ended - run.started) * 1000, 3)
        fields.pop("queue_wait_ms", None)
        fields["state"] = state
        fields["retries"] = getattr(request, "retries", 0) or 0
        fields.update(extra)
        return fields

    def _emit(
        self, level: LogLevel, event: str, fields: dict[str, Any], ts: float | None = None
    ) -> None:
        present = {k: v for k, v in fields.items() if v is not None}
        record = Record(level, event, present)
        if ts is not None:
            record.created = ts
        self.bus.emit(record)


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
        request = self._request
        attributes = getattr(request, "__dict__", None)
        value = attributes.get(key) if attributes is not None else getattr(request, key, None)
        if value is None:
            headers = getattr(request, "headers", None)
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


def _present(**fields: Any) -> dict[str, Any]:
    """The received record's fields: the ones known."""
    found = {k: v for k, v in fields.items() if v is not None}
    found["state"] = "received"
    return found


def _queue_wait(sent_at: Any, eta: Any, now: float) -> float | None:
    """Milliseconds from the message's sending (or its ETA: a retry's backoff is no wait) to now."""
    if not isinstance(sent_at, int | float):
        return None
    ready = float(sent_at)
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            ready = max(ready, datetime.fromisoformat(eta).timestamp())
    return round(max(0.0, now - ready) * 1000, 3)
