"""One thread per process that does blocking broker writes for async callers.

``await execute()`` must neither block the event loop with socket I/O nor hold
a thread per pending call. Callers enqueue a send and await a future; the
thread takes every queued send at once, publishes them over one pooled
producer, and resolves their futures with one wake-up per event loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

#: a send: called with the producer the batch shares
Send = Callable[[Any], None]


#: told the outcome of a send on its event loop: None, or what it raised
Callback = Callable[[BaseException | None], None]


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    send: Send
    callback: Callback
    #: call back on success too (``submit``), or only on failure (``post``)
    always: bool


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
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(_Job(loop, send, functools.partial(_settle, future), always=True))
        await future

    def post(self, send: Send, on_error: Callback) -> None:
        """Queue ``send(producer)``; only a failure calls back (on the caller's loop).

        Saves the caller a wake-up per send when something else (the result)
        will wake it anyway.
        """
        self._enqueue(_Job(asyncio.get_running_loop(), send, on_error, always=False))

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            self._ensure_thread()
            self._jobs.append(job)
            if len(self._jobs) == 1:
                self._cond.notify()

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
        outcomes: dict[asyncio.AbstractEventLoop, list[tuple[Callback, BaseException | None]]]
        outcomes = defaultdict(list)
        done = 0
        try:
            with self._acquire() as producer:
                for job in batch:
                    error = _run_send(job.send, producer)
                    done += 1
                    if error is not None or job.always:
                        outcomes[job.loop].append((job.callback, error))
        except BaseException as exc:  # no producer: the rest of the batch fails with it
            for job in batch[done:]:
                outcomes[job.loop].append((job.callback, exc))
        for loop, results in outcomes.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_call_back, results)


def _run_send(send: Send, producer: Any) -> BaseException | None:
    try:
        send(producer)
    except BaseException as exc:
        return exc
    return None


def _call_back(results: list[tuple[Callback, BaseException | None]]) -> None:
    for callback, error in results:
        callback(error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
