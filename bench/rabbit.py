"""Looking at RabbitMQ from the benchmark: queue depths, consumers, bindings, confirms.

Queue depths and consumer counts come over AMQP (passive ``queue.declare``).
Bindings and channel modes are not visible over AMQP: they come from a local
``rabbitmqctl`` when the broker runs on this machine, else they are unknown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kombu.connection import Connection

from bench.workers import BenchError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", socket.gethostname()})
#: seconds a queue may take to show what was published to it
SETTLE_TIMEOUT = 15.0


# -- over AMQP ---------------------------------------------------------------


def queue_state(channel: Any, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of an existing queue."""
    _, messages, consumers = channel.queue_declare(queue=name, passive=True)
    return messages, consumers


def purge(channel: Any, names: Sequence[str]) -> None:
    for name in names:
        channel.queue_purge(name)


def wait_depths(channel: Any, names: Sequence[str], expected: int) -> str | None:
    """Wait until every queue holds ``expected`` messages; what is wrong otherwise."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        depths = {name: queue_state(channel, name)[0] for name in names}
        over = {n: d for n, d in depths.items() if d > expected}
        if over:
            return f"more than {expected} messages (doubled?): {over}"
        if all(d == expected for d in depths.values()):
            return None
        if time.monotonic() > deadline:
            return f"fewer than {expected} messages after {SETTLE_TIMEOUT:.0f}s (lost?): {depths}"
        time.sleep(0.05)


def wait_consumers(channel: Any, names: Sequence[str], timeout: float = 60.0) -> None:
    """Wait until every queue has a consumer (the workers' consumers started)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [n for n in names if queue_state(channel, n)[1] < 1]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"no consumer on {missing} after {timeout:.0f}s")
        time.sleep(0.05)


def snapshot(channel: Any, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(ready messages, consumers) of each queue."""
    return {name: queue_state(channel, name) for name in names}


def tidy(channel: Any, before: dict[str, tuple[int, int]], added: int) -> str:
    """Purge the queues that hold nothing but the ``added`` copies this run sent them.

    Only a queue that was empty with no consumer before and holds exactly
    ``added`` messages now (no one else's) is purged; the others are left alone.
    """
    notes = []
    for name, (messages, consumers) in before.items():
        now, consumers_now = queue_state(channel, name)
        if messages == consumers == consumers_now == 0 and now == added:
            channel.queue_purge(name)
            notes.append(f"{name} (purged: held only this run's {added} copies)")
        else:
            notes.append(f"{name} (left alone: {now} messages, {consumers_now} consumers)")
    return ", ".join(notes) or "none"


def local_port(connection: Connection) -> int:
    """The local TCP port of an open kombu AMQP connection."""
    return int(connection.connection.sock.getsockname()[1])


# -- through rabbitmqctl -----------------------------------------------------


def _ctl(broker: str, *args: str) -> list[list[str]] | None:
    """Rows of a ``rabbitmqctl`` listing, or None when it cannot tell us."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or Connection(broker).hostname not in LOCAL_HOSTS:
        return None
    try:
        done = subprocess.run(
            [ctl, "-q", "--no-table-headers", *args], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [line.split("\t") for line in done.stdout.splitlines() if line.strip()]


def other_bound_queues(broker: str, exchange: str, ours: Sequence[str]) -> list[str] | None:
    """Queues bound to ``exchange`` that are not ``ours`` (None: cannot tell)."""
    vhost = Connection(broker).virtual_host or "/"
    rows = _ctl(broker, "list_bindings", "-p", vhost, "source_name", "destination_name")
    if rows is None:
        return None
    return sorted({r[1] for r in rows if len(r) == 2 and r[0] == exchange} - set(ours))


def confirm_mode(broker: str, exclude_ports: Sequence[int]) -> str:
    """Whether this process has channels in publisher-confirm mode (except ``exclude_ports``)."""
    rows = _ctl(broker, "list_channels", "name", "confirm")
    if rows is None:
        return "unknown (needs a local rabbitmqctl)"
    ports = _broker_ports(Connection(broker).port or 5672) - set(exclude_ports)
    mine = [r for r in rows if len(r) == 2 and _client_port(r[0]) in ports]
    confirming = sum(1 for r in mine if r[1] == "true")
    return f"{'yes' if confirming else 'no'} ({confirming} of {len(mine)} open channels)"


def _client_port(channel_name: str) -> int | None:
    """The client port in a channel name like ``127.0.0.1:53744 -> 127.0.0.1:5672 (1)``."""
    try:
        return int(channel_name.split(" -> ", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def _broker_ports(broker_port: int) -> set[int]:
    """Local ports of this process's TCP connections to ``broker_port``, from /proc."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == broker_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports
