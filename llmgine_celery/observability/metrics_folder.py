"""prometheus-client's multiprocess mode: the folder of a process's metric files.

prometheus-client picks its value store once, when ``prometheus_client.values``
is imported: mmap files in ``PROMETHEUS_MULTIPROC_DIR`` if the variable is set
then, in memory otherwise. Anything may import it before us (Flower does), so
:func:`configure_multiprocess` does not depend on import order: it sets the
variable (forked and spawned children inherit it) and installs a multiprocess
value class, which every metric created afterwards uses. llmgine's metrics are
created on the first record, so calling it before the first record is enough.

Each process writes its own files (``counter_<pid>.db``, ...). Stale files of
an earlier run would inflate every counter, but several processes (a worker's
prefork children, several workers, producers) share a folder, so nobody may
wipe it on start. Every process using the folder holds a shared ``flock`` on
its lock file for its whole life (forked children share their parent's); the
first process to find no holder wipes the ``*.db`` files, then joins. So a
folder is emptied exactly when a new run starts after every user of the last
one has exited, and a restarted worker's counters keep counting up while any
process of the run still serves them.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import mark_process_dead

from llmgine_celery.errors import ConfigurationError

logger = logging.getLogger("llmgine_celery.observability.metrics")

ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: held with a shared flock by every process that uses the folder
LOCK_FILE: Final = ".llmgine-metrics.lock"


@dataclass
class _State:
    """This process's multiprocess state."""

    folder: Path | None = None
    #: a value class per folder ever used, reused on a switch back (two would corrupt a file)
    value_classes: dict[Path, Any] = field(default_factory=dict)
    #: open descriptors holding a shared flock on each folder's lock file
    locks: dict[Path, int] = field(default_factory=dict)
    #: metrics were recorded in memory before any configure_multiprocess()
    recorded_in_memory: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()


def configure_multiprocess(folder: Path) -> None:
    """Put this process, and the children it forks or spawns, in multiprocess mode on ``folder``.

    Call it before the first record reaches a ``MetricsSink``. Calling it again
    with the same folder does nothing; with another folder, later measurements
    go there (prometheus-client has one folder per process: the last call wins).
    """
    folder = Path(folder).resolve()
    with _state.lock:
        if _state.folder == folder:
            return
        if _state.folder is None and _state.recorded_in_memory:
            raise ConfigurationError(
                "metrics were recorded in this process before configure_multiprocess(); "
                "call it before the first record reaches a MetricsSink"
            )
        if _state.folder is not None:
            logger.warning("metrics folder changes from %s to %s", _state.folder, folder)
        previous = os.environ.get(ENV)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if folder not in _state.locks:
                _state.locks[folder] = _claim(folder)
        except OSError as exc:
            raise ConfigurationError(f"cannot use metrics folder {folder}: {exc}") from exc
        os.environ[ENV] = str(folder)
        prometheus_values.ValueClass = _value_class(folder, previous)
        if _state.folder is None:
            atexit.register(_close_files)
        _state.folder = folder


def multiprocess_folder() -> Path | None:
    """The folder :func:`configure_multiprocess` set in this process, if any."""
    return _state.folder


def note_in_memory_metrics() -> None:
    """Remember that metrics were made in memory (then multiprocess mode comes too late)."""
    _state.recorded_in_memory = True


def process_exited(pid: int) -> None:
    """Drop the live gauges of process ``pid`` (a prefork child that exited)."""
    folder = _state.folder
    if folder is not None:
        mark_process_dead(pid, str(folder))


def _value_class(folder: Path, previous: str | None) -> Any:
    known = _state.value_classes.get(folder)
    if known is None:
        current = prometheus_values.ValueClass
        # Imported with the variable already naming this folder: that class may
        # have files open there, and a second class on one file would corrupt it.
        same = previous is not None and Path(previous).resolve() == folder
        multiprocess = getattr(current, "_multiprocess", False)
        known = current if same and multiprocess else prometheus_values.MultiProcessValue()
        _state.value_classes[folder] = known
    return known


def _close_files() -> None:
    # At exit, rather than as garbage (which warns of unclosed files). Registered
    # after the writer threads' own flush, so it runs first: records still queued
    # are counted now, or a write into a closed file would lose them.
    from llmgine_celery.observability.threaded import flush_all

    flush_all()
    close = getattr(prometheus_values, "close_all_multiprocess_files", None)
    if close is not None:
        close()


def _claim(folder: Path) -> int:
    """Hold a shared lock on ``folder`` for this process's life; wipe it if nobody held one."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # A live process holds it: its files and its dead children's are part
        # of the totals it serves. Wait out a wipe in progress, then join.
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd
