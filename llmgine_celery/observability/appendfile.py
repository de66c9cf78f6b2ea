"""AppendFile: a size-rotated file that many processes append whole lines to.

Atomicity. The file is opened with ``O_APPEND`` and each line goes out in one
``os.write``. For a regular file on a local Linux filesystem (ext4, xfs, btrfs,
tmpfs) the kernel moves the offset to end-of-file and copies the buffer while it
holds the inode lock, so concurrent appends from any number of processes never
interleave or overwrite each other, whatever their size (``PIPE_BUF`` limits
pipes only). NFS emulates ``O_APPEND`` in the client: keep logs on a local disk.

Rotation. Before each write a process ``stat``s the *path*; an inode that is not
its fd's means someone rotated, so it reopens. When the line would push the file
past ``max_bytes`` it takes an exclusive ``flock`` on ``<file>.lock``, re-checks
the path's size (another process may have just rotated), renames ``x.N`` to
``x.N+1`` and ``x`` to ``x.1``, releases the lock and reopens. A line written
through an fd whose file was just renamed lands in ``x.1``: kept, and only once.
It is lost only if its writer stalls between ``stat`` and ``write`` for
``backups + 1`` rotations, when retention would have dropped that file anyway.
A forked child opens its own fds: a ``flock`` belongs to the open file
description, which the child would otherwise share with its parent.
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

_DATA_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
_MODE = 0o640  # logs are redacted, but best-effort redaction is no reason to share them


@dataclass(frozen=True)
class Rotation:
    """Size-based rotation: ``max_bytes`` 0 never rotates; ``backups`` files are kept."""

    max_bytes: int = 50 * 1024 * 1024
    backups: int = 5

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.backups < 1:
            raise ValueError(f"invalid {self!r}: max_bytes >= 0 and backups >= 1 required")


class AppendFile:
    """Whole lines appended by one ``O_APPEND`` write each; rotation safe across processes."""

    def __init__(self, path: Path | str, rotation: Rotation | None = None) -> None:
        self.path = Path(path)
        self.rotation = rotation or Rotation()
        self._mutex = threading.Lock()  # flock cannot exclude threads sharing one fd
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._inode = (0, 0)
        self._pid = 0
        _OPEN_FILES.add(self)

    def write(self, line: bytes) -> None:
        """Append ``line`` (newline included), rotating first when it is due."""
        with self._mutex:
            fd = self._current_fd(len(line))
            while line:  # one write, unless the disk fills up: then finish the line
                line = line[os.write(fd, line) :]

    def close(self) -> None:
        """Close the fds; a later ``write`` reopens them."""
        with self._mutex:
            self._close_fds()

    def _current_fd(self, incoming: int) -> int:
        """The fd for the next ``incoming`` bytes, reopened or rotated when needed."""
        if self._fd is None or self._pid != os.getpid():
            self._open()
        try:
            st = os.stat(self.path)
            size = st.st_size if (st.st_dev, st.st_ino) == self._inode else self._reopen()
        except FileNotFoundError:  # renamed away by someone else, not yet recreated
            size = self._reopen()
        if self._due(size, incoming):
            self._rotate(incoming)
        assert self._fd is not None
        return self._fd

    def _due(self, size: int, incoming: int) -> bool:
        limit = self.rotation.max_bytes
        return limit > 0 and size > 0 and size + incoming > limit

    def _rotate(self, incoming: int) -> None:
        """Shift the files under the lock, unless another process just did."""
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = 0
            if self._due(size, incoming):
                self._shift()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._reopen()

    def _shift(self) -> None:
        """Rename ``x.N`` to ``x.N+1``, ..., ``x`` to ``x.1``; the oldest is replaced."""
        base = str(self.path)
        last = 1  # files after the first gap need not move
        while last < self.rotation.backups and os.path.exists(f"{base}.{last}"):
            last += 1
        for n in range(last - 1, 0, -1):
            os.replace(f"{base}.{n}", f"{base}.{n + 1}")
        os.replace(base, f"{base}.1")

    def _open(self) -> None:
        """Open our own fds: on first use, after ``close``, or in a forked child."""
        self._close_fds()  # a child closing inherited copies leaves the parent's intact
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{self.path}.lock", _LOCK_FLAGS, _MODE)
        self._pid = os.getpid()
        self._reopen()

    def _reopen(self) -> int:
        """Point the data fd at the file the path names now; return its size."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.path, _DATA_FLAGS, _MODE)
        st = os.fstat(self._fd)
        self._inode = (st.st_dev, st.st_ino)
        return st.st_size

    def _close_fds(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    def _after_fork(self) -> None:
        # another thread may have held the mutex at fork time (logging's bpo-6721)
        self._mutex = threading.Lock()


_OPEN_FILES: weakref.WeakSet[AppendFile] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for file in _OPEN_FILES:
        file._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
