"""This process's id and a random source for ids, both without a system call per use.

``os.getpid()`` and ``os.urandom()`` are system calls, and ``os.urandom``
releases the GIL: on a busy threads-pool worker every record and every span id
paid for one, and each GIL release hands the interpreter to another thread.
Both are refreshed in a forked child (prefork pools fork), before it runs
anything else.
"""

from __future__ import annotations

import os
import random

_pid = os.getpid()
#: span and trace ids need to be unique, not secret; a private generator, so an
#: application seeding ``random`` cannot make two processes draw the same ids
_ids = random.Random()


def current_pid() -> int:
    """The id of this process."""
    return _pid


def random_hex(bits: int) -> str:
    """``bits`` random bits as ``bits // 4`` lower-case hex digits."""
    return f"{_ids.getrandbits(bits):0{bits // 4}x}"


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    _ids.seed()  # from os.urandom: a child must not repeat its parent's ids


os.register_at_fork(after_in_child=_after_fork_in_child)
