"""One thread per process that does blocking broker writes for async callers.

``await execute()`` must neither block the event loop with socket I/O nor hold
a thread per pending call. Callers enqueue a send and await a future; the
thread takes every queued send at once, publishes them over one pooled
producer, and resolves their futures with one wake-up per event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

#: a send: called with the producer the batch shares
Send = Callable[[Any], None]


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    send: Send


class BatchPublisher:
    """Runs sends on a dedicated thread, in batches, over one producer per batch."""

    def __init__(self, acquire_producer: Callable[[], AbstractContextManager[Any]]) -> None:
        self._acquire = acquire_producer
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = False

    async def submit(self, send: Send) -> None:
        """Run ``send(producer)`` on the publisher thread; return when it has run."""
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), send)
        with self._cond:
            self._ensure_thread()
            self._jobs.append(job)
            if len(self._jobs) == 1:
                self._cond.notify()
        await job.future

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued sends and stop the thread."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify()
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout)
        with self._cond:
            self._thread, self._stopping = None, False

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid():
            self._jobs = []  # jobs of a parent process cannot be completed after fork
            self._thread = threading.Thread(target=self._run, name="llmgine-publisher", daemon=True)
            self._pid = os.getpid()
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                batch, self._jobs = self._jobs, []
                if not batch and self._stopping:
                    return
            self._publish(batch)

    def _publish(self, batch: list[_Job]) -> None:
        outcomes: dict[asyncio.AbstractEventLoop, list[tuple[_Job, BaseException | None]]]
        outcomes = defaultdict(list)
        try:
            with self._acquire() as producer:
                for job in batch:
                    outcomes[job.loop].append((job, _run_send(job.send, producer)))
        except BaseException as exc:  # no producer: every job of the batch fails with it
            done = {id(job) for jobs in outcomes.values() for job, _ in jobs}
            for job in batch:
                if id(job) not in done:
                    outcomes[job.loop].append((job, exc))
        for loop, results in outcomes.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, results)


def _run_send(send: Send, producer: Any) -> BaseException | None:
    try:
        send(producer)
    except BaseException as exc:
        return exc
    return None


def _resolve(results: list[tuple[_Job, BaseException | None]]) -> None:
    for job, error in results:
        if job.future.done():
            continue
        if error is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(error)
