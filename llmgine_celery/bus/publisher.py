"""One thread per process that does blocking broker writes for its callers.

``await execute()`` must neither block the event loop with socket I/O nor hold
a thread per pending call. Callers enqueue a send; the thread takes every
queued send at once, publishes them over one pooled producer, and tells each
caller with one wake-up per event loop.

A send may return a confirmation: the broker's answer to come. With an
``AckSource`` (RabbitMQ's publisher confirms) the thread does not wait for the
answers of one batch before publishing the next: while confirmations are
pending it waits for either the broker's next frames or a new send (a pipe
wakes it), and tells each caller once its own answer is in. So a call sent
right after another is not held up by the first one's confirmation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from llmgine_celery.errors import BrokerUnavailableError

logger = logging.getLogger(__name__)

#: seconds the thread waits for the broker's frames before it looks again at
#: what is pending (a confirmation past its deadline is settled: it fails)
ACK_WAIT = 1.0


class Confirmation(Protocol):
    """The broker's answer to what a send published."""

    def settled(self) -> bool:
        """Whether the answer is in (or can no longer come): calling returns at once."""

    def __call__(self) -> None:
        """Wait for the answer; raise if the broker refused the message or it was lost."""


class AckSource(Protocol):
    """Where the answers of confirmations come from (a confirm-mode channel)."""

    def await_acks(self, timeout: float, wake: int) -> None:
        """Read the answers that come within ``timeout`` s; return early if ``wake`` is readable."""


class PublisherClosedError(BrokerUnavailableError):
    """The publisher was closed before the broker answered this publish."""

    def __init__(self) -> None:
        super().__init__("the publisher was closed before the broker confirmed the message")


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
    """Runs sends on a dedicated thread, in batches; confirmations are answered as they come."""

    def __init__(
        self,
        acquire_producer: Callable[[], AbstractContextManager[Any]],
        acks: AckSource | None = None,
    ) -> None:
        self._acquire = acquire_producer
        self._acks = acks
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = False
        #: the thread waits on the broker's frames: a new job must write to the pipe
        self._on_acks = False
        #: (read, write) ends of the pipe that wakes it then (with an ack source only)
        self._wake: tuple[int, int] | None = None

    async def submit(self, send: Send) -> None:
        """Run ``send`` on the publisher thread; return once it is sent and confirmed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(_Job(loop, send, functools.partial(_settle, future), always=True))
        await future

    def submit_sync(self, send: Send, timeout: float | None = None) -> None:
        """``submit`` for callers without an event loop (blocks this thread)."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.send_then(send, functools.partial(_settle_sync, future))
        future.result(timeout)

    def post(self, send: Send, on_error: Callback) -> None:
        """Queue ``send``; only a failure calls back (on the caller's loop).

        Saves the caller a wake-up per send when something else (the result)
        will wake it anyway.
        """
        self._enqueue(_Job(asyncio.get_running_loop(), send, on_error, always=False))

    def send_then(self, send: Send, callback: Callback) -> None:
        """Queue ``send``; ``callback`` is told its outcome on the publisher thread.

        For callers with no event loop that must not block: the callback gets
        None once the send is done and confirmed, else what it raised, and must
        be quick (it holds up the thread's next batch).
        """
        self._enqueue(_Job(None, send, callback, always=True))

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued sends (and wait for their confirmations) and stop the thread."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._notify()
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout)
        with self._cond:
            self._thread, self._stopping = None, False
            if thread is None or not thread.is_alive():
                self._close_pipe()

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            self._ensure_thread()
            self._jobs.append(job)
            if len(self._jobs) == 1:
                self._notify()

    def _notify(self) -> None:
        """Wake the thread, waiting on the condition or on the broker (lock held)."""
        self._cond.notify()
        if self._on_acks and self._wake is not None:
            with contextlib.suppress(BlockingIOError):  # full: it is woken already
                os.write(self._wake[1], b"\0")

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                self._jobs = []  # jobs of a parent process cannot be completed after fork
                self._close_pipe()  # a child must not wake (or read) its parent's thread
            if self._wake is None and self._acks is not None:
                self._wake = _pipe()
            self._on_acks = False
            self._thread = threading.Thread(target=self._run, name="llmgine-publisher", daemon=True)
            self._pid = os.getpid()
            self._thread.start()

    def _close_pipe(self) -> None:
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def _run(self) -> None:
        me = threading.current_thread()
        pending: list[tuple[_Job, Confirmation]] = []
        while (batch := self._take(me, pending)) is not None:
            acks, wake = self._acks, self._wake  # the pipe exists when acks do
            if batch:
                if acks is not None and wake is not None:
                    # what has come: acks, or the broker closing an idle connection
                    # (noticed now, the batch goes out on a new one)
                    acks.await_acks(0, wake[0])
                outcomes, waiting = self._publish(batch)
                pending += waiting
            elif acks is not None and wake is not None:
                acks.await_acks(ACK_WAIT, wake[0])
                _drain(wake[0])
                outcomes = []
            else:  # nobody tells answers apart: wait for each in turn
                outcomes, pending = [(job, _confirmed(c)) for job, c in pending], []
            answered, pending = _answered(pending)
            _report(outcomes + answered)

    def _take(
        self, me: threading.Thread, pending: list[tuple[_Job, Confirmation]]
    ) -> list[_Job] | None:
        """The queued jobs (maybe none, while answers are pending); None when the thread ends."""
        with self._cond:
            while self._thread is me and not (self._jobs or self._stopping or pending):
                self._cond.wait()
            if self._thread is me:
                batch, self._jobs = self._jobs, []
                if not batch and not pending:  # stopping, and nothing is left
                    return None
                self._on_acks = not batch
                return batch
        # close() gave up waiting for this thread (a send hung): a newer thread may
        # own the queue and the channel now, so take nothing more and wait for
        # nothing on them
        _report([(job, PublisherClosedError()) for job, _ in pending])
        return None

    def _publish(
        self, batch: list[_Job]
    ) -> tuple[list[tuple[_Job, BaseException | None]], list[tuple[_Job, Confirmation]]]:
        """Send every job; return the outcomes known now and the confirmations to wait for."""
        sent: list[tuple[_Job, Confirmation]] = []
        outcomes: list[tuple[_Job, BaseException | None]] = []
        try:
            with self._acquire() as producer:
                for job in batch:
                    try:
                        confirm = job.send(producer)
                    except BaseException as exc:
                        outcomes.append((job, exc))
                        continue
                    if confirm is None:
                        outcomes.append((job, None))
                    else:
                        sent.append((job, confirm))
        except BaseException as exc:  # no producer: what was not sent fails with it
            done = {id(job) for job, _ in sent} | {id(job) for job, _ in outcomes}
            outcomes += [(job, exc) for job in batch if id(job) not in done]
        return outcomes, sent


def _answered(
    pending: list[tuple[_Job, Confirmation]],
) -> tuple[list[tuple[_Job, BaseException | None]], list[tuple[_Job, Confirmation]]]:
    """The outcomes of the settled confirmations, and those still pending."""
    outcomes: list[tuple[_Job, BaseException | None]] = []
    still: list[tuple[_Job, Confirmation]] = []
    for job, confirm in pending:
        if confirm.settled():
            outcomes.append((job, _confirmed(confirm)))
        else:
            still.append((job, confirm))
    return outcomes, still


def _pipe() -> tuple[int, int]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    return read, write


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _confirmed(confirm: Confirmation) -> BaseException | None:
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
            try:
                job.callback(error)
            except Exception:  # one caller's callback must not stop the thread
                logger.exception("a publish callback failed")
        else:
            by_loop[job.loop].append((job.callback, error))
    for loop, calls in by_loop.items():
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed since: nobody waits there
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
