"""A Celery worker inside the process, for the embedded default and the demo."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.worker import WorkController
from celery.worker import state as worker_state

from llmgine_celery.errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery


class _ReadyWorkController(WorkController):
    """A WorkController that tells when its consumer is up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready.set()


class EmbeddedWorker:
    """A threads-pool worker in a daemon thread, with a drain that waits for idle."""

    def __init__(self, celery: Celery, queues: list[str], concurrency: int = 4) -> None:
        self._celery = celery
        self._queues = queues
        self._concurrency = concurrency
        self._worker: _ReadyWorkController | None = None
        self._thread: threading.Thread | None = None
        self._hostname = f"embedded.{celery.main}@{socket.gethostname()}"

    def start(self, timeout: float = 15.0) -> None:
        """Start consuming; returns once the worker is ready."""
        # Without a pool process, Celery's tracer finds tasks through the
        # current app, so (as in Celery's own test worker) this app becomes it:
        # one embedded worker per process.
        self._celery.set_current()
        self._celery.set_default()
        self._celery.finalize()
        worker = _ReadyWorkController(
            app=self._celery,
            pool="threads",
            concurrency=self._concurrency,
            hostname=self._hostname,
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        thread = threading.Thread(target=worker.start, name="llmgine-embedded-worker", daemon=True)
        thread.start()
        if not worker.ready.wait(timeout):
            raise ConfigurationError(f"embedded worker did not start within {timeout:g}s")
        self._worker, self._thread = worker, thread

    def wait_idle(self, timeout: float) -> bool:
        """Wait until queues are empty and nothing runs, seen twice in a row."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            quiet = quiet + 1 if self._idle() else 0
            if quiet >= 2:
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown: running tasks finish, then the thread ends."""
        if self._thread is None:
            return
        worker_state.should_stop = 0
        # The consumer loop checks the flag between deliveries; a control
        # message to this worker wakes it instead of waiting out its poll.
        with contextlib.suppress(Exception):
            self._celery.control.ping(destination=[self._hostname], timeout=0.01)
        try:
            self._thread.join(timeout)
        finally:
            worker_state.should_stop = None
            self._thread = self._worker = None

    def _idle(self) -> bool:
        if worker_state.active_requests or worker_state.reserved_requests:
            return False
        with self._celery.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in self._queues:
                try:
                    if channel.queue_declare(queue, passive=True).message_count:
                        return False
                except Exception:  # a queue not declared yet holds nothing
                    conn.close()
                    channel = conn.default_channel
        return True
