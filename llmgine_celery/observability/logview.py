"""Reading the JSONL logs: every service's files merged, filtered, and followed.

A log folder holds ``<service>.jsonl`` per service and its backups ``.1``
(newest) to ``.N``. A line that is not a JSON object (a corrupt line, or a last
line cut short) is skipped and counted in :class:`Skipped`, never fatal.
:class:`Follower` tails the current files like ``tail -F``: when a file is
renamed to ``.1`` it drains the old file (a writer may still finish a line
there) and reads the new one from its start.
"""

from __future__ import annotations

import heapq
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from llmgine_celery.observability.bus import LogLevel
from llmgine_celery.observability.jsonl import CORE_KEYS

Rec = dict[str, Any]

SUFFIX = ".jsonl"


@dataclass
class Skipped:
    """Lines that were not JSON objects, counted per file name."""

    lines: Counter[str] = field(default_factory=Counter)

    def add(self, path: Path) -> None:
        self.lines[path.name] += 1

    @property
    def total(self) -> int:
        return sum(self.lines.values())

    def message(self) -> str | None:
        """One sentence for stderr, or None when nothing was skipped."""
        if not self.lines:
            return None
        where = ", ".join(f"{name} ({n})" for name, n in sorted(self.lines.items()))
        return f"skipped {self.total} unreadable line(s) (corrupt or cut short): {where}"


def parse_line(raw: bytes) -> Rec | None:
    """The JSON object on one line, or None when the line is not one."""
    try:
        value = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return None
    return value if isinstance(value, dict) else None


def _backup_number(path: Path) -> int:
    suffix = path.name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def log_files(log_dir: Path) -> list[Path]:
    """Every JSONL file of ``log_dir``: per service, the oldest backup first, the current last."""
    if not log_dir.is_dir():
        return []
    services: dict[str, list[Path]] = {}
    for path in log_dir.iterdir():
        base, dot, number = path.name.rpartition(".")
        if path.name.endswith(SUFFIX):
            services.setdefault(path.name, []).append(path)
        elif dot and number.isdigit() and base.endswith(SUFFIX):
            services.setdefault(base, []).append(path)
    return [
        path
        for name in sorted(services)
        for path in sorted(services[name], key=_backup_number, reverse=True)
        if path.is_file()
    ]


def read_file(path: Path, skipped: Skipped) -> Iterator[Rec]:
    """The records of one file, in file order; a vanished file yields nothing."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:  # rotated away meanwhile: its lines are in the next name
        return
    with handle:
        for raw in handle:
            record = parse_line(raw)
            if record is None:
                if raw.strip():
                    skipped.add(path)
                continue
            yield record


def read_records(log_dir: Path, skipped: Skipped) -> Iterator[Rec]:
    """Every record of every file of ``log_dir``, file by file (not merged)."""
    for path in log_files(log_dir):
        yield from read_file(path, skipped)


def ts_key(record: Rec) -> float:
    """Seconds since the epoch of the record's ``ts``; 0 when missing or unreadable."""
    ts = record.get("ts")
    if not isinstance(ts, str):
        return 0.0
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def merged(records: Iterable[Rec]) -> list[Rec]:
    """``records`` in ``ts`` order (stable: equal times keep their file order)."""
    return sorted(records, key=ts_key)


def level_of(record: Rec) -> int:
    """The numeric level of a record (INFO when missing or unknown)."""
    name = record.get("level")
    if isinstance(name, str) and name.upper() in LogLevel.__members__:
        return int(LogLevel[name.upper()])
    return int(LogLevel.INFO)


@dataclass(frozen=True)
class RecordFilter:
    """Which records ``logs`` prints; every criterion given must hold."""

    level: int = 0
    command_id: str | None = None
    event_id: str | None = None
    session_id: str | None = None
    #: record names; one ending in '.' or '*' is a prefix (``handler.`` matches handler.*)
    events: tuple[str, ...] = ()
    services: tuple[str, ...] = ()

    def __call__(self, record: Rec) -> bool:
        if self.level and level_of(record) < self.level:
            return False
        if self.events and not any(_name_matches(record.get("event"), e) for e in self.events):
            return False
        if self.services and record.get("service") not in self.services:
            return False
        if self.session_id is not None and record.get("session_id") != self.session_id:
            return False
        return self._ids_match(record)

    def _ids_match(self, record: Rec) -> bool:
        # A command's id is its task's id, so task.* records of a command match too;
        # a handler task's id is "<event id>:<group>:<handler>".
        if self.command_id is not None and self.command_id not in (
            record.get("command_id"),
            record.get("task_id"),
        ):
            return False
        if self.event_id is not None and record.get("event_id") != self.event_id:
            task_id = record.get("task_id")
            return isinstance(task_id, str) and task_id.startswith(f"{self.event_id}:")
        return True


def _name_matches(name: object, wanted: str) -> bool:
    if not isinstance(name, str):
        return False
    if wanted.endswith(("*", ".")):
        return name.startswith(wanted.rstrip("*"))
    return name == wanted


def short_ts(ts: object) -> str:
    """``ts`` as ``YYYY-MM-DD HH:MM:SS.mmm`` in UTC (as given when it does not parse)."""
    if not isinstance(ts, str):
        return "-"
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return ts
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _value(value: object) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def fields_text(record: Rec, skip: Iterable[str] = ()) -> str:
    """``key=value`` for each field but the core ones and ``skip``; values quoted when needed."""
    hidden = {*CORE_KEYS, *skip}
    return " ".join(f"{k}={_value(v)}" for k, v in record.items() if k not in hidden)


def format_line(record: Rec) -> str:
    """One compact human line: time, level, service@host:pid, event, then key=value."""
    where = f"{record.get('service', '-')}@{record.get('hostname', '-')}:{record.get('pid', '-')}"
    head = f"{short_ts(record.get('ts'))} {record.get('level', '-'):<8} {where} "
    extras = fields_text(record)
    line = head + str(record.get("event", "-"))
    return f"{line} {extras}" if extras else line


def last_matching(
    log_dir: Path, keep: RecordFilter, count: int | None, skipped: Skipped
) -> list[Rec]:
    """The last ``count`` records (all when None) that ``keep`` accepts, in ``ts`` order."""
    matching = (r for r in read_records(log_dir, skipped) if keep(r))
    if count is None:
        return merged(matching)

    def order(pair: tuple[int, Rec]) -> tuple[float, int]:
        return (ts_key(pair[1]), pair[0])  # equal times keep their file order, as in merged

    # only the newest ``count`` stay in memory, however large the files
    newest = heapq.nlargest(count, enumerate(matching), key=order)
    return [record for _, record in sorted(newest, key=order)]


@dataclass
class _Tail:
    """One open file being followed."""

    path: Path
    handle: BinaryIO
    inode: tuple[int, int]
    partial: bytes = b""


def _deleted(tail: _Tail) -> bool:
    """Whether the file ``tail`` reads has no name left in the filesystem."""
    return os.fstat(tail.handle.fileno()).st_nlink == 0


class Follower:
    """Follows every file of a folder across rotations and new services, like ``tail -F``.

    Every file is held open while it is in the folder: a file renamed to ``.1``
    is still read (a writer may finish a line in it), a backup not open yet (a
    file that rotated twice between two polls) is read from its start, and an
    inode number cannot be reused by a new file while its old file is open. A
    file is let go when retention deletes it.
    """

    def __init__(self, log_dir: Path, skipped: Skipped) -> None:
        self.log_dir = log_dir
        self.skipped = skipped
        self._current: dict[Path, _Tail] = {}
        self._backups: list[_Tail] = []
        for path in log_files(log_dir):
            if path.name.endswith(SUFFIX):
                self._open(path, current=True)

    def snapshot(self) -> list[Rec]:
        """Every record of the folder so far, merged in ``ts`` order."""
        for path in log_files(self.log_dir):
            if not path.name.endswith(SUFFIX) and _inode(path) not in self._open_inodes():
                self._open(path, current=False)
        return merged(r for tail in self._tails() for r in self._read(tail))

    def poll(self) -> list[Rec]:
        """The records written since the last call, in ``ts`` order within the batch."""
        found = [r for tail in self._tails() for r in self._read(tail)]
        present: set[tuple[int, int]] = set()
        for path in log_files(self.log_dir):  # a service's backups, oldest first, then current
            inode = _inode(path)
            if inode is None:
                continue
            present.add(inode)
            opened = self._notice(path, inode)
            if opened is not None:
                found.extend(self._read(opened))
        for path in [p for p, tail in self._current.items() if tail.inode not in present]:
            self._backups.append(self._current.pop(path))  # renamed, not yet recreated
        # Gone from a listing is not gone: a rotation renames files between the
        # listing and the stat. Only a file with no name left is deleted; letting
        # go of one that was merely renamed would read it again from its start.
        for tail in [t for t in self._backups if _deleted(t)]:
            found.extend(self._read(tail))  # deleted by retention: a last look
            self._backups.remove(tail)
            self._let_go(tail)
        return merged(found)

    def close(self) -> list[Rec]:
        """Close every file; return the records written since the last poll."""
        found = [r for tail in self._tails() for r in self._read(tail)]
        for tail in self._tails():
            self._let_go(tail)
        self._current.clear()
        self._backups.clear()
        return merged(found)

    def _tails(self) -> list[_Tail]:
        return [*self._backups, *self._current.values()]

    def _open_inodes(self) -> set[tuple[int, int]]:
        return {tail.inode for tail in self._tails()}

    def _notice(self, path: Path, inode: tuple[int, int]) -> _Tail | None:
        """Open ``path`` if it is a file not followed yet."""
        if not path.name.endswith(SUFFIX):
            return None if inode in self._open_inodes() else self._open(path, current=False)
        known = self._current.get(path)
        if known is not None and known.inode == inode:
            return None
        if known is not None:  # renamed to .1 and replaced: keep reading the old one
            self._backups.append(self._current.pop(path))
        return self._open(path, current=True)

    def _open(self, path: Path, *, current: bool) -> _Tail | None:
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return None
        st = os.fstat(handle.fileno())
        tail = _Tail(path, handle, (st.st_dev, st.st_ino))
        if current:
            self._current[path] = tail
        else:
            self._backups.append(tail)
        return tail

    def _read(self, tail: _Tail) -> list[Rec]:
        """Complete lines appended to ``tail`` since the last read."""
        if os.fstat(tail.handle.fileno()).st_size < tail.handle.tell():
            tail.handle.seek(0)  # truncated in place (copytruncate): start over
            tail.partial = b""
        data = tail.handle.read()
        if not data:
            return []
        *lines, tail.partial = (tail.partial + data).split(b"\n")
        found = []
        for raw in lines:
            record = parse_line(raw)
            if record is not None:
                found.append(record)
            elif raw.strip():
                self.skipped.add(tail.path)
        return found

    def _let_go(self, tail: _Tail) -> None:
        # a line still unfinished when its file is let go was cut short for good
        if tail.partial.strip():
            self.skipped.add(tail.path)
        tail.handle.close()


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def follow(
    log_dir: Path,
    keep: RecordFilter,
    show: Callable[[Rec], None],
    skipped: Skipped,
    *,
    initial: int = 10,
    warn: Callable[[str | None], None] = lambda message: None,
    stop: threading.Event | None = None,
    interval: float = 0.25,
) -> None:
    """Show the last ``initial`` matching records, then each new one, until ``stop`` is set."""
    stop = stop or threading.Event()
    follower = Follower(log_dir, skipped)
    reported = 0
    try:
        matching = [r for r in follower.snapshot() if keep(r)]
        for record in matching[-initial:] if initial else []:
            show(record)
        warn(f"following {log_dir} (Ctrl-C stops)")
        while not stop.is_set():
            for record in follower.poll():
                if keep(record):
                    show(record)
            if skipped.total > reported:
                reported = skipped.total
                warn(skipped.message())
            stop.wait(interval)
    finally:
        for record in follower.close():
            if keep(record):
                show(record)
