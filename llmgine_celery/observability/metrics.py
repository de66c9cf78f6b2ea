"""MetricsSink: records as Prometheus metrics, with celery-exporter's names and llmgine's.

The names, labels and histogram buckets are celery-exporter's
(github.com/danihodovic/celery-exporter), so its Grafana dashboards and alerts
work unchanged; ``llmgine_*`` series add commands, events, handlers and dead
letters. No id is ever a label. Under prefork the metrics live in the folder of
:func:`configure_multiprocess` (:mod:`.metrics_folder`), which
:func:`serve` (:mod:`.metrics_server`) exposes. ``docs/metrics.md`` lists them all.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability import records
from llmgine_celery.observability.bus import Record, Sink
from llmgine_celery.observability.metrics_folder import (
    configure_multiprocess,
    multiprocess_folder,
    process_exited,
)
from llmgine_celery.observability.metrics_server import MetricsServer, serve
from llmgine_celery.observability.metrics_store import (
    BUILTIN_NAMES,
    DEFAULT,
    QUEUE_WAIT_BUCKETS,
    RUNTIME_BUCKETS,
    TASK_COUNTERS,
    Store,
)
from llmgine_celery.observability.metrics_tally import Tally

__all__ = [
    "QUEUE_WAIT_BUCKETS",
    "RUNTIME_BUCKETS",
    "TASK_COUNTERS",
    "MetricsServer",
    "MetricsSink",
    "configure_multiprocess",
    "multiprocess_folder",
    "process_exited",
    "serve",
]

HANDLER_OUTCOMES: Final = {
    records.HANDLER_SUCCEEDED: "succeeded",
    records.HANDLER_FAILED: "failed",
    records.HANDLER_RETRIED: "retried",
    records.HANDLER_SKIPPED: "skipped",
}
#: a task's run is over in this process: it no longer counts as active
_RUN_ENDS: Final = frozenset({"succeeded", "failed", "retried", "revoked"})
UNKNOWN: Final = "unknown"

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class MetricsSink(Sink):
    """Counts records as Prometheus metrics; also holds the bus's user counters and histograms.

    Without ``registry`` the metrics are the process's own: in the multiprocess
    folder once :func:`configure_multiprocess` ran, else in prometheus-client's
    default registry. With one (tests, embedding), they are registered there;
    use one sink per registry. prometheus-client has one value store per
    process, so in multiprocess mode their values are in the folder's files too.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, hostname: str | None = None
    ) -> None:
        self._own = Store(registry) if registry is not None else None
        self._hostname = hostname or socket.gethostname()
        #: ids of the tasks started in this process and not over yet
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def emit(self, record: Record) -> None:
        """Count ``record``: its Celery stage (``state``), and what llmgine makes of it."""
        self.emit_many((record,))

    def emit_many(self, batch: Sequence[Record]) -> None:
        """Count the records of ``batch``, writing each series once."""
        tally = Tally()
        for record in batch:
            self._count(record, tally)
        tally.apply()

    def _count(self, record: Record, tally: Tally) -> None:
        fields = record.fields
        state = fields.get("state")
        if isinstance(state, str) and state in TASK_COUNTERS:
            self._task(state, fields, tally)
        route = _ROUTES.get(record.event)
        if route is not None:
            route(self, fields, tally)
        outcome = HANDLER_OUTCOMES.get(record.event)
        if outcome is not None:
            self._handler(fields, outcome, tally)

    def count(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """Add ``value`` to the user counter ``name`` (exposed as ``<name>_total``)."""
        self._user("counter", name.removesuffix("_total"), labels).inc(value)

    def observe(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """Record ``value`` in the user histogram ``name`` (prometheus-client's buckets)."""
        self._user("histogram", name, labels).observe(value)

    # -- records --------------------------------------------------------------

    def _task(self, state: str, fields: Mapping[str, Any], tally: Tally) -> None:
        store = self._store()
        exception = fields.get("exception") if state == "failed" else None
        key = (state, fields.get("task_name"), fields.get("worker"), fields.get("queue"), exception)
        series = store.task_series.get(key)
        if series is None:  # looked up once per state, task, worker, queue (and exception)
            series = store.task_series[key] = self._task_series(store, state, fields, exception)
        counter, timing, active = series
        tally.inc(counter)
        if timing is not None:
            seconds = _seconds(fields.get("queue_wait_ms" if state == "started" else "duration_ms"))
            if seconds is not None:
                tally.observe(timing, seconds)
        if active is not None:
            if state == "started":
                self._started(fields.get("task_id"), active, tally)
            else:
                self._ended(fields.get("task_id"), active, tally)

    def _task_series(
        self, store: Store, state: str, fields: Mapping[str, Any], exception: Any
    ) -> tuple[Any, Any, Any]:
        """The counter of ``state``, its histogram if it has one, the active-tasks gauge."""
        name, hostname = _label(fields.get("task_name")), self._host(fields)
        queue = _label(fields.get("queue"))
        if state != "sent" and (name, hostname, queue) not in store.seen:
            store.seen.add((name, hostname, queue))
            self._zero(store, name, hostname, queue)
        if state == "failed":
            failed = _label(exception, "UnknownException")
            counter = store.child("celery_task_failed", name, hostname, failed, queue)
        else:
            counter = store.child(TASK_COUNTERS[state], name, hostname, queue)
        timing = None
        if state == "started":
            timing = store.child("celery_task_queue_wait_time", name, hostname, queue)
        elif state == "succeeded":
            timing = store.child("celery_task_runtime", name, hostname, queue)
        active = None
        if state == "started" or state in _RUN_ENDS:
            active = store.child("celery_worker_tasks_active", hostname)
        return counter, timing, active

    def _zero(self, store: Store, name: str, hostname: str, queue: str) -> None:
        # As celery-exporter does: every stage's series exists from a task's
        # first sighting, so ratios and increase() see a 0 rather than no data.
        for state, metric in TASK_COUNTERS.items():
            if state == "failed":
                store.child(metric, name, hostname, "", queue)
            elif state != "sent":
                store.child(metric, name, hostname, queue)

    def _started(self, task_id: Any, active: Any, tally: Tally) -> None:
        if task_id is None:
            return
        with self._lock:
            new = str(task_id) not in self._active
            self._active.add(str(task_id))
        if new:
            tally.inc(active)

    def _ended(self, task_id: Any, active: Any, tally: Tally) -> None:
        with self._lock:
            started_here = task_id is not None and str(task_id) in self._active
            self._active.discard(str(task_id))
        if started_here:
            tally.inc(active, -1.0)

    def _worker_ready(self, fields: Mapping[str, Any], tally: Tally) -> None:
        tally.apply()  # what came before in the batch, before the gauge is set
        self._store().child("celery_worker_up", self._host(fields)).set(1)

    def _worker_stopping(self, fields: Mapping[str, Any], tally: Tally) -> None:
        tally.apply()
        self._store().child("celery_worker_up", self._host(fields)).set(0)

    def _command(self, fields: Mapping[str, Any], tally: Tally) -> None:
        store = self._store()
        command_type = _label(fields.get("command_type"))
        tally.inc(store.child("llmgine_command", command_type, _label(fields.get("outcome"))))
        seconds = _seconds(fields.get("duration_ms"))
        if seconds is not None:
            tally.observe(store.child("llmgine_command_duration_seconds", command_type), seconds)

    def _published(self, fields: Mapping[str, Any], tally: Tally) -> None:
        event_type = _label(fields.get("event_type"))
        tally.inc(self._store().child("llmgine_event_published", event_type))

    def _handler(self, fields: Mapping[str, Any], outcome: str, tally: Tally) -> None:
        store = self._store()
        who = tuple(_label(fields.get(k)) for k in ("event_type", "group", "handler"))
        tally.inc(store.child("llmgine_event_handler", *who, outcome))
        seconds = _seconds(fields.get("duration_ms"))
        if seconds is not None and outcome != "skipped":
            tally.observe(store.child("llmgine_event_handler_duration_seconds", *who), seconds)

    def _dead_letter(self, fields: Mapping[str, Any], tally: Tally) -> None:
        tally.inc(self._store().child("llmgine_dead_letter", _label(fields.get("kind"))))

    # -- plumbing -------------------------------------------------------------

    def _store(self) -> Store:
        return self._own if self._own is not None else DEFAULT.current()

    def _user(self, kind: str, name: str, labels: Mapping[str, str]) -> Any:
        _check_user_metric(kind, name, labels)
        metric = self._store().get(kind, name, sorted(labels))
        return metric.labels(**{k: str(v) for k, v in labels.items()}) if labels else metric

    def _host(self, fields: Mapping[str, Any]) -> str:
        # celery-exporter's label: the host part of a node name ("celery@host")
        worker = fields.get("worker")
        if isinstance(worker, str) and worker:
            return worker.rpartition("@")[2] or self._hostname
        return self._hostname


_ROUTES: Final[Mapping[str, Callable[[MetricsSink, Mapping[str, Any], Tally], None]]] = {
    records.WORKER_READY: MetricsSink._worker_ready,
    records.WORKER_STOPPING: MetricsSink._worker_stopping,
    records.COMMAND_RESULT: MetricsSink._command,
    records.EVENT_PUBLISHED: MetricsSink._published,
    records.DEAD_LETTER: MetricsSink._dead_letter,
}


def _check_user_metric(kind: str, name: str, labels: Mapping[str, str]) -> None:
    if not _NAME.match(name):
        raise ConfigurationError(f"metric name {name!r} is not valid: use [a-zA-Z_:][a-zA-Z0-9_:]*")
    if name in BUILTIN_NAMES:
        raise ConfigurationError(f"metric name {name!r} is one of llmgine's own metrics")
    for label in labels:
        reserved = label.startswith("__") or (kind == "histogram" and label == "le")
        if reserved or not _LABEL.match(label):
            raise ConfigurationError(f"label name {label!r} of metric {name!r} is not valid")


def _label(value: Any, default: str = UNKNOWN) -> str:
    return default if value is None or value == "" else str(value)


def _seconds(milliseconds: Any) -> float | None:
    if isinstance(milliseconds, int | float) and not isinstance(milliseconds, bool):
        return max(0.0, milliseconds / 1000)
    return None
