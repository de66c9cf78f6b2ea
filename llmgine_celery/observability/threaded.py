"""ThreadedSink: a sink's work moved off the threads that run commands and handlers.

``emit`` only queues the record; one writer thread per process hands what has
piled up to the inner sink at once (``emit_many``: one write for many lines).
Worker threads then never queue on the file's lock, and a burst costs one
system call instead of one per record.

Records are written within ``LINGER`` (50 ms) of the first of a batch.
``flush`` waits for everything queued so far; ``close`` flushes, stops the
thread and closes the inner sink; a process flushes at exit (``atexit``) and
prefork children when they stop (the observability wiring calls ``flush_all``
on ``worker_process_shutdown``). A process killed with SIGKILL loses what was
still queued. After a fork the child starts its own thread and queue: what the
parent had queued stays the parent's.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

from llmgine_celery.observability.bus import Record, Sink
from llmgine_celery.observability.process import current_pid

logger = logging.getLogger("llmgine_celery.observability")

#: records handed to the inner sink at once, at most
BATCH = 2048
#: seconds the writer lets records pile up after the first: waking per record costs
#: a busy worker several times the writing itself (GIL hand-offs, one write each)
LINGER = 0.05
#: seconds ``flush`` waits for the writer at most
FLUSH_TIMEOUT = 5.0

_LIVE: weakref.WeakSet[ThreadedSink] = weakref.WeakSet()


class _Flush:
    """Queued behind the records to flush: set once they are written."""

    def __init__(self) -> None:
        self.done = threading.Event()


class ThreadedSink(Sink):
    """Runs the ``emit`` of one or more sinks on one writer thread, in batches."""

    def __init__(self, *inners: Sink) -> None:
        self.inners = inners
        levels: list[Callable[[Record], bool]] = [
            inner.wants  # type: ignore[attr-defined]
            for inner in inners
            if callable(getattr(inner, "wants", None))
        ]
        # records every inner sink would drop are dropped before the queue
        self._wants = levels if len(levels) == len(inners) else None
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Record | _Flush | None] = queue.SimpleQueue()
        self._pid = 0
        self._reported: set[int] = set()
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"ThreadedSink({', '.join(map(repr, self.inners))})"

    def emit(self, record: Record) -> None:
        if self._wants is not None and not any(wants(record) for wants in self._wants):
            return  # below every inner sink's level: not worth a trip through the queue
        if self._pid != current_pid():
            self._start()
        self._queue.put(record)

    def count(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        for inner in self.inners:
            inner.count(name, value, labels)

    def observe(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        for inner in self.inners:
            inner.observe(name, value, labels)

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait until every record queued so far is written; False on timeout."""
        if self._pid != current_pid():
            return True  # nothing queued in this process yet
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, stop the thread, close the inner sink."""
        if self._pid == current_pid():
            self.flush()
            self._queue.put(None)
            self._pid = 0
        for inner in self.inners:
            inner.close()

    def _start(self) -> None:
        with self._lock:
            if self._pid == current_pid():
                return
            self._queue = queue.SimpleQueue()  # a parent's queued records stay its own
            name = f"llmgine-sinks-{current_pid()}"
            threading.Thread(target=self._run, args=(self._queue,), name=name, daemon=True).start()
            self._pid = current_pid()

    def _run(self, pending: queue.SimpleQueue[Record | _Flush | None]) -> None:
        while True:
            batch: list[Record] = []
            item = pending.get()
            if not isinstance(item, _Flush) and item is not None:
                time.sleep(LINGER)
            while True:
                if item is None:
                    self._write(batch)
                    return
                if isinstance(item, _Flush):
                    self._write(batch)
                    batch = []
                    item.done.set()
                else:
                    batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: Sequence[Record]) -> None:
        if not batch:
            return
        for inner in self.inners:
            try:
                emit_many = getattr(inner, "emit_many", None)
                if emit_many is not None:
                    emit_many(batch)
                else:
                    for record in batch:
                        inner.emit(record)
            except Exception:  # an observer must never break the flow: told once
                if id(inner) not in self._reported:
                    self._reported.add(id(inner))
                    logger.exception("observability sink %r failed; later failures hidden", inner)


def flush_all(timeout: float = FLUSH_TIMEOUT) -> None:
    """Flush every threaded sink of this process (at exit, when a worker child stops)."""
    for sink in list(_LIVE):
        sink.flush(timeout)


atexit.register(flush_all)
