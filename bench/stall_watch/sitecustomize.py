"""Dump every thread's stack when a Celery worker's event loop stops turning.

For benchmark runs, not for production: put this folder on ``PYTHONPATH``
(``PYTHONPATH=bench/stall_watch .venv/bin/python bench/events.py``; the bench
scripts pass ``PYTHONPATH`` on to the workers they start). Python imports
``sitecustomize`` at start-up; in a ``celery ... worker`` process this one
wraps kombu's epoll ``poll`` and starts a watcher thread. When the hub has
been out of its poll for ``STALL_SECONDS`` (blocked in a callback, a socket
call or a lock), the watcher writes the stacks of all threads, and the kernel
wait channel of each, to ``$LLMGINE_STALL_DIR`` (default
``/tmp/llmgine-stalls``) as ``<pid>-<n>.txt``, at most once per
``REPEAT_SECONDS``. A hub idle in its poll is not a stall.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

#: seconds out of the poll that count as a stall
STALL_SECONDS = 8.0
#: seconds between two dumps of one stall
REPEAT_SECONDS = 30.0


class _Hub:
    """When the hub last left its poll, and whether it is in it now."""

    def __init__(self) -> None:
        self.left_poll = 0.0
        self.in_poll = False


def _install() -> None:
    try:
        from kombu.utils import eventio
    except ImportError:
        return
    hub = _Hub()
    poll = eventio._epoll.poll

    def watched_poll(self: Any, *args: Any, **kwargs: Any) -> Any:
        hub.in_poll = True
        try:
            return poll(self, *args, **kwargs)
        finally:
            hub.in_poll = False
            hub.left_poll = time.monotonic()

    eventio._epoll.poll = watched_poll  # type: ignore[method-assign]
    folder = Path(os.environ.get("LLMGINE_STALL_DIR", "/tmp/llmgine-stalls"))
    threading.Thread(target=_watch, args=(hub, folder), name="stall-watch", daemon=True).start()


def _watch(hub: _Hub, folder: Path) -> None:
    dumped = -REPEAT_SECONDS
    count = 0
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        stalled = hub.left_poll and not hub.in_poll and now - hub.left_poll > STALL_SECONDS
        if stalled and now - dumped > REPEAT_SECONDS:
            dumped, count = now, count + 1
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{os.getpid()}-{count}.txt"
            path.write_text(_report(now - hub.left_poll))


def _report(stalled_for: float) -> str:
    lines = [f"argv: {sys.argv}", f"out of the poll for {stalled_for:.1f}s at {time.time():.3f}"]
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        lines.append(f"\n--- thread {names.get(ident)} ({ident})")
        lines.append("".join(traceback.format_stack(frame)).rstrip())
    tasks = Path(f"/proc/{os.getpid()}/task")
    for task in sorted(tasks.iterdir()) if tasks.exists() else []:
        try:
            wchan = (task / "wchan").read_text()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        lines.append(f"tid {task.name}: state {state}, wchan {wchan}")
    return "\n".join(lines) + "\n"


if "worker" in sys.argv and any("celery" in arg for arg in sys.argv[:3]):
    _install()
