"""The metric objects behind MetricsSink: llmgine's definitions and a store per registry.

Every series llmgine records is defined here once (kind, labels, help, buckets),
made on first use, and looked up by label values without prometheus-client's
slow ``labels()`` on later uses. Where a multiprocess folder is configured the
metrics live in its files and need no registry.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import INF

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability.metrics_folder import multiprocess_folder, note_in_memory_metrics

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


@dataclass
class _Entry:
    kind: str
    labelnames: tuple[str, ...]
    metric: Any


class Store:
    """The metric objects of one registry (or of the multiprocess folder), made on first use."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._registry = registry
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        #: (name, hostname, queue_name) whose celery_task_* series exist
        self.seen: set[tuple[str, str, str]] = set()
        #: llmgine's series by (metric, label values): prometheus' labels() is slow
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        #: a task stage's series, by (state, task name, worker, queue, exception)
        self.task_series: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}

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

    store: Store | None = None
    folder: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> Store:
        folder = multiprocess_folder()  # the same object until it changes
        store = self.store
        if store is None or folder is not self.folder:
            with self.lock:
                if self.store is None or folder is not self.folder:
                    if folder is None:
                        note_in_memory_metrics()
                    # in files, metrics need no registry: the server reads the folder
                    self.store = Store(None if folder is not None else REGISTRY)
                    self.folder = folder
                store = self.store
        return store


#: the process's own metrics
DEFAULT = _Default()

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
