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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import INF

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability import records
from llmgine_celery.observability.bus import Record, Sink
from llmgine_celery.observability.metrics_folder import (
    configure_multiprocess,
    multiprocess_folder,
    note_in_memory_metrics,
    process_exited,
)
from llmgine_celery.observability.metrics_server import MetricsServer, serve

__all__ = [
    "MetricsServer",
    "MetricsSink",
    "configure_multiprocess",
    "multiprocess_folder",
    "process_exited",
    "serve",
]

#: celery-exporter's defaults: prometheus-client's for runtime, 50 ms to 30 min for queue waits
RUNTIME_BUCKETS: Final = Histogram.DEFAULT_BUCKETS
QUEUE_WAIT_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, INF)
#: commands and handlers call LLMs: tens of milliseconds to ten minutes
LLMGINE_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, INF)

TASK_LABELS: Final = ("name", "hostname", "queue_name")
FAILED_LABELS: Final = ("name", "hostname", "exception", "queue_name")
#: celery-exporter's counter for each ``state`` (it has none for ``unknown``)
TASK_COUNTERS: Final = {
    state: f"celery_task_{state}"
    for state in ("sent", "received", "started", "succeeded", "failed", "rejected", "revoked")
} | {"retried": "celery_task_retried"}
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


# -- metric objects ---------------------------------------------------------------


@dataclass
class _Entry:
    kind: str
    labelnames: tuple[str, ...]
    metric: Any


class _Store:
    """The metric objects of one registry (or of the multiprocess folder), made on first use."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._registry = registry
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        #: (name, hostname, queue_name) whose celery_task_* series exist
        self.seen: set[tuple[str, str, str]] = set()
        #: llmgine's series by (metric, label values): prometheus' labels() is slow
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}

    def child(self, name: str, *values: str) -> Any:
        """The series of llmgine's metric ``name`` with ``values`` (in its labels' order)."""
        key = (name, values)
        found = self._children.get(key)
        if found is None:
            spec = DEFINITIONS[name]
            metric = self.get(spec.kind, name, spec.labels, documentation=spec.doc, **spec.options)
            found = self._children[key] = metric.labels(*values)
        return found

    def get(self, kind: str, name: str, labelnames: Sequence[str], **options: Any) -> Any:
        """The metric ``name``; made now if new, else checked against ``kind`` and labels."""
        labelnames = tuple(labelnames)
        entry = self._entries.get(name)
        if entry is None:
            with self._lock:
                entry = self._entries.get(name)
                if entry is None:
                    entry = _Entry(kind, labelnames, self._make(kind, name, labelnames, options))
                    self._entries[name] = entry
        if entry.kind != kind or entry.labelnames != labelnames:
            raise ConfigurationError(
                f"metric {name!r} is a {entry.kind} with labels {list(entry.labelnames)}; "
                f"it cannot be used as a {kind} with labels {list(labelnames)}"
            )
        return entry.metric

    def _make(self, kind: str, name: str, labelnames: tuple[str, ...], options: Any) -> Any:
        doc = options.pop("documentation", f"{name} (recorded through the ObservabilityBus)")
        common: dict[str, Any] = {"labelnames": labelnames, "registry": self._registry}
        if kind == "counter":
            return Counter(name, doc, **common)
        if kind == "histogram":
            return Histogram(name, doc, buckets=options.get("buckets", RUNTIME_BUCKETS), **common)
        return Gauge(name, doc, multiprocess_mode=options["mode"], **common)


@dataclass
class _Default:
    """The process's own store: of the multiprocess folder in use, else of the default registry."""

    store: _Store | None = None
    folder: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> _Store:
        folder = multiprocess_folder()  # the same object until it changes
        store = self.store
        if store is None or folder is not self.folder:
            with self.lock:
                if self.store is None or folder is not self.folder:
                    if folder is None:
                        note_in_memory_metrics()
                    # in files, metrics need no registry: the server reads the folder
                    self.store = _Store(None if folder is not None else REGISTRY)
                    self.folder = folder
                store = self.store
        return store


_default = _Default()

#: llmgine's own metrics: a user metric cannot take these names
BUILTIN_NAMES: Final = frozenset(
    {
        *TASK_COUNTERS.values(),
        "celery_task_runtime",
        "celery_task_queue_wait_time",
        "celery_worker_up",
        "celery_worker_tasks_active",
        "celery_queue_length",
        "llmgine_command",
        "llmgine_command_duration_seconds",
        "llmgine_event_published",
        "llmgine_event_handler",
        "llmgine_event_handler_duration_seconds",
        "llmgine_dead_letter",
    }
)


@dataclass(frozen=True)
class _Def:
    kind: str
    labels: tuple[str, ...]
    doc: str
    options: Mapping[str, Any] = field(default_factory=dict)


def _task_def(doc: str) -> _Def:
    return _Def("counter", TASK_LABELS, doc)


DEFINITIONS: Final[Mapping[str, _Def]] = {
    "celery_task_sent": _task_def("Task messages published."),
    "celery_task_received": _task_def("Task messages a worker received."),
    "celery_task_started": _task_def("Task runs started."),
    "celery_task_succeeded": _task_def("Task runs that returned."),
    "celery_task_failed": _Def("counter", FAILED_LABELS, "Task runs that raised for good."),
    "celery_task_retried": _task_def("Task runs that raised and will be retried."),
    "celery_task_rejected": _task_def("Task messages a worker rejected."),
    "celery_task_revoked": _task_def("Tasks revoked."),
    "celery_task_runtime": _Def(
        "histogram", TASK_LABELS, "Seconds a task ran, for runs that returned.",
        {"buckets": RUNTIME_BUCKETS},
    ),
    "celery_task_queue_wait_time": _Def(
        "histogram", TASK_LABELS, "Seconds from a task's publication to the start of its run.",
        {"buckets": QUEUE_WAIT_BUCKETS},
    ),
    # the last word of any of a worker's processes counts, even from one since replaced
    "celery_worker_up": _Def(
        "gauge", ("hostname",), "1 while a worker runs, 0 once it stops.", {"mode": "mostrecent"}
    ),
    # summed over the live processes only: a dead child's runs are over
    "celery_worker_tasks_active": _Def(
        "gauge", ("hostname",), "Tasks running now.", {"mode": "livesum"}
    ),
    "llmgine_command": _Def(
        "counter", ("command_type", "outcome"), "Commands handled, by outcome."
    ),
    "llmgine_command_duration_seconds": _Def(
        "histogram", ("command_type",), "Seconds a command's handler ran.",
        {"buckets": LLMGINE_BUCKETS},
    ),
    "llmgine_event_published": _Def("counter", ("event_type",), "Events published."),
    "llmgine_event_handler": _Def(
        "counter", ("event_type", "group", "handler", "outcome"),
        "Event handler runs, by outcome (succeeded, failed, retried, skipped).",
    ),
    "llmgine_event_handler_duration_seconds": _Def(
        "histogram", ("event_type", "group", "handler"),
        "Seconds an event handler ran (succeeded, failed or retried).",
        {"buckets": LLMGINE_BUCKETS},
    ),
    "llmgine_dead_letter": _Def("counter", ("kind",), "Messages and handler runs dead-lettered."),
}  # fmt: skip


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
        self._own = _Store(registry) if registry is not None else None
        self._hostname = hostname or socket.gethostname()
        #: ids of the tasks started in this process and not over yet
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def emit(self, record: Record) -> None:
        """Count ``record``: its Celery stage (``state``), and what llmgine makes of it."""
        fields = record.fields
        state = fields.get("state")
        if isinstance(state, str) and state in TASK_COUNTERS:
            self._task(state, fields)
        route = _ROUTES.get(record.event)
        if route is not None:
            route(self, fields)
        outcome = HANDLER_OUTCOMES.get(record.event)
        if outcome is not None:
            self._handler(fields, outcome)

    def count(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """Add ``value`` to the user counter ``name`` (exposed as ``<name>_total``)."""
        self._user("counter", name.removesuffix("_total"), labels).inc(value)

    def observe(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """Record ``value`` in the user histogram ``name`` (prometheus-client's buckets)."""
        self._user("histogram", name, labels).observe(value)

    # -- records --------------------------------------------------------------

    def _task(self, state: str, fields: Mapping[str, Any]) -> None:
        store = self._store()
        name, hostname = _label(fields.get("task_name")), self._host(fields)
        queue = _label(fields.get("queue"))
        if state != "sent" and (name, hostname, queue) not in store.seen:
            store.seen.add((name, hostname, queue))
            self._zero(store, name, hostname, queue)
        if state == "failed":
            exception = _label(fields.get("exception"), "UnknownException")
            store.child("celery_task_failed", name, hostname, exception, queue).inc()
        else:
            store.child(TASK_COUNTERS[state], name, hostname, queue).inc()
        if state == "started":
            wait = _seconds(fields.get("queue_wait_ms"))
            if wait is not None:
                store.child("celery_task_queue_wait_time", name, hostname, queue).observe(wait)
            self._started(store, fields.get("task_id"), hostname)
        elif state == "succeeded":
            seconds = _seconds(fields.get("duration_ms"))
            if seconds is not None:
                store.child("celery_task_runtime", name, hostname, queue).observe(seconds)
        if state in _RUN_ENDS:
            self._ended(store, fields.get("task_id"), hostname)

    def _zero(self, store: _Store, name: str, hostname: str, queue: str) -> None:
        # As celery-exporter does: every stage's series exists from a task's
        # first sighting, so ratios and increase() see a 0 rather than no data.
        for state, metric in TASK_COUNTERS.items():
            if state == "failed":
                store.child(metric, name, hostname, "", queue)
            elif state != "sent":
                store.child(metric, name, hostname, queue)

    def _started(self, store: _Store, task_id: Any, hostname: str) -> None:
        if task_id is None:
            return
        with self._lock:
            new = str(task_id) not in self._active
            self._active.add(str(task_id))
        if new:
            store.child("celery_worker_tasks_active", hostname).inc()

    def _ended(self, store: _Store, task_id: Any, hostname: str) -> None:
        with self._lock:
            started_here = task_id is not None and str(task_id) in self._active
            self._active.discard(str(task_id))
        if started_here:
            store.child("celery_worker_tasks_active", hostname).dec()

    def _worker_ready(self, fields: Mapping[str, Any]) -> None:
        self._store().child("celery_worker_up", self._host(fields)).set(1)

    def _worker_stopping(self, fields: Mapping[str, Any]) -> None:
        self._store().child("celery_worker_up", self._host(fields)).set(0)

    def _command(self, fields: Mapping[str, Any]) -> None:
        store = self._store()
        command_type = _label(fields.get("command_type"))
        store.child("llmgine_command", command_type, _label(fields.get("outcome"))).inc()
        seconds = _seconds(fields.get("duration_ms"))
        if seconds is not None:
            store.child("llmgine_command_duration_seconds", command_type).observe(seconds)

    def _published(self, fields: Mapping[str, Any]) -> None:
        event_type = _label(fields.get("event_type"))
        self._store().child("llmgine_event_published", event_type).inc()

    def _handler(self, fields: Mapping[str, Any], outcome: str) -> None:
        store = self._store()
        who = tuple(_label(fields.get(k)) for k in ("event_type", "group", "handler"))
        store.child("llmgine_event_handler", *who, outcome).inc()
        seconds = _seconds(fields.get("duration_ms"))
        if seconds is not None and outcome != "skipped":
            store.child("llmgine_event_handler_duration_seconds", *who).observe(seconds)

    def _dead_letter(self, fields: Mapping[str, Any]) -> None:
        self._store().child("llmgine_dead_letter", _label(fields.get("kind"))).inc()

    # -- plumbing -------------------------------------------------------------

    def _store(self) -> _Store:
        return self._own if self._own is not None else _default.current()

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


_ROUTES: Final[Mapping[str, Callable[[MetricsSink, Mapping[str, Any]], None]]] = {
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
