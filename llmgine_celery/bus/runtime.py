"""Running handlers: sync ones directly, async ones on a persistent loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopRunner:
    """One event loop per process, in its own thread, shared by every async handler.

    ``asyncio.run`` per task would build and tear down a loop (and every
    client bound to it) for each message; this keeps connections pooled in
    handlers alive across tasks. A new loop is made after a fork.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        """The process's handler loop, started on first use."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="llmgine-handler-loop", daemon=True
                )
                thread.start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the handler loop, in the caller's context, and wait for it.

        The caller's context variables (the task's correlation among them) go
        with it: what the handler sends joins the task's trace.
        """
        loop = self.loop()
        ctx = contextvars.copy_context()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            task = loop.create_task(coro, context=ctx)
            task.add_done_callback(functools.partial(_settle, done))

        loop.call_soon_threadsafe(start)
        return done.result()


def _settle(done: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    if task.cancelled():
        done.cancel()
        return
    error = task.exception()
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(task.result())


_runner = LoopRunner()


def handler_loop() -> asyncio.AbstractEventLoop:
    """The persistent loop async handlers of this process run on."""
    return _runner.loop()


def call_handler(handler: Any, message: Any) -> Any:
    """Call a sync or async handler from a worker thread and return its outcome."""
    outcome = handler(message)
    if inspect.isawaitable(outcome):
        return _runner.run(_await(outcome))
    return outcome


async def _await(awaitable: Any) -> Any:
    return await awaitable
