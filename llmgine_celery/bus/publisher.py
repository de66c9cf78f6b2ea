"""One thread per process that does blocking broker writes for its callers.

``await execute()`` must neither block the event loop with socket I/O nor hold
a thread per pending call. Callers enqueue a send; the thread takes every
queued send at once, publishes them over one pooled producer, then waits for
the broker's confirmations of the whole batch (a send may return a
confirmation to wait for), and tells each caller with one wake-up per event
loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

#: waits until the broker confirmed what a send published; raises if it refused
Confirmation = Callable[[], None]
#: a send: called with the producer the batch shares; may return a confirmation
Send = Callable[[Any], Confirmation | None]
#: told the outcome of a send: None, or what it raised
Callback = Callable[[BaseException | None], None]


@dataclass
class _Job:
    #: the caller's event loop, or None to call back on the publisher thread
    loop: asyncio.AbstractEventLoop | None
    send: Send
    callback: Callback
    #: call back on success too, or only on failure (``post``)
    always: bool


class BatchPublisher:
    """Runs sends on a dedicated thread, in batches, confirmed per batch."""

    def __init__(self, acquire_producer: Callable[[], AbstractContextManager[Any]]) -> None:
        self._acquire = acquire_producer
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = False

    async def submit(self, send: Send) -> None:
        """Run ``send`` on the publisher thread; return once it is sent and confirmed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(_Job(loop, send, functools.partial(_settle, future), always=True))
        await future

    def submit_sync(self, send: Send, timeout: float | None = None) -> None:
        """``submit`` for callers without an event loop (blocks this thread)."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._enqueue(_Job(None, send, functools.partial(_settle_sync, future), always=True))
        future.result(timeout)

    def post(self, send: Send, on_error: Callback) -> None:
        """Queue ``send``; only a failure calls back (on the caller's loop).

        Saves the caller a wake-up per send when something else (the result)
        will wake it anyway.
        """
        self._enqueue(_Job(asyncio.get_running_loop(), send, on_error, always=False))

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued sends and stop the thread."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify()
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout)
        with self._cond:
            self._thread, self._stopping = None, False

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            self._ensure_thread()
            self._jobs.append(job)
            if len(self._jobs) == 1:
                self._cond.notify()

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
            _report(self._publish(batch))

    def _publish(self, batch: list[_Job]) -> list[tuple[_Job, BaseException | None]]:
        sent: list[tuple[_Job, Confirmation | None]] = []
        outcomes: list[tuple[_Job, BaseException | None]] = []
        try:
            with self._acquire() as producer:
                for job in batch:
                    try:
                        sent.append((job, job.send(producer)))
                    except BaseException as exc:
                        outcomes.append((job, exc))
        except BaseException as exc:  # no producer: what was not sent fails with it
            done = {id(job) for job, _ in sent} | {id(job) for job, _ in outcomes}
            outcomes += [(job, exc) for job in batch if id(job) not in done]
        for job, confirm in sent:
            outcomes.append((job, _confirmed(confirm)))
        return outcomes


def _confirmed(confirm: Confirmation | None) -> BaseException | None:
    if confirm is None:
        return None
    try:
        confirm()
    except BaseException as exc:
        return exc
    return None


def _report(outcomes: list[tuple[_Job, BaseException | None]]) -> None:
    """Call back each job that wants it: once per event loop, or right here."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callback, BaseException | None]]]
    by_loop = defaultdict(list)
    for job, error in outcomes:
        if error is None and not job.always:
            continue
        if job.loop is None:
            job.callback(error)
        else:
            by_loop[job.loop].append((job.callback, error))
    for loop, calls in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_call_back, calls)


def _call_back(calls: list[tuple[Callback, BaseException | None]]) -> None:
    for callback, error in calls:
        callback(error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _settle_sync(future: concurrent.futures.Future[None], error: BaseException | None) -> None:
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
