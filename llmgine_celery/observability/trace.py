"""The causal tree of a command or an event, built from JSONL records.

Correlation (see docs/tracing.md): a command's id is its Celery task id; every
record of one causal chain shares ``trace_id``; a command or event sent while a
handler runs carries the handled message's id as ``causation_id``, and the
handler's span as ``parent_span_id``. A :class:`Node` is one command or event
with its handler :class:`Run` s; under each run, the messages it caused. Every
function here is pure: records in (any iterable of dicts), tree out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from llmgine_celery.bus import topology
from llmgine_celery.observability import records as names
from llmgine_celery.observability.logview import Rec, ts_key

Kind = Literal["command", "event"]
Key = tuple[Kind, str]

_KINDS: tuple[Kind, ...] = ("command", "event")

_SENT = {"command": names.COMMAND_SENT, "event": names.EVENT_PUBLISHED}
_STARTS = frozenset({names.COMMAND_STARTED, names.HANDLER_STARTED})
_ENDS = frozenset(
    {
        *(names.COMMAND_RESULT, names.HANDLER_SUCCEEDED, names.HANDLER_RETRIED),
        *(names.HANDLER_FAILED, names.HANDLER_SKIPPED),
    }
)
_COMMAND_RECORDS = frozenset(
    {names.COMMAND_SENT, names.COMMAND_STARTED, names.COMMAND_RESULT, names.COMMAND_TIMED_OUT}
)
_HANDLER_RECORDS = frozenset(_STARTS | _ENDS) - {names.COMMAND_STARTED, names.COMMAND_RESULT}
#: stages of a task worth showing beside the llmgine records (the others repeat them)
_TASK_NOTES = frozenset({names.TASK_REJECTED, names.TASK_UNKNOWN, names.TASK_REVOKED})


@dataclass
class Attempt:
    """One execution of a handler: its start and end records (either may be missing)."""

    start: Rec | None = None
    end: Rec | None = None
    #: what the handler logged meanwhile (records carrying this run's span id)
    logs: list[Rec] = field(default_factory=list)

    def get(self, key: str) -> Any:
        """``key`` from the end record, else from the start record."""
        for record in (self.end, self.start):
            if record is not None and record.get(key) is not None:
                return record[key]
        return None

    @property
    def status(self) -> str:
        """running, succeeded, retried, failed, skipped, or a command's outcome."""
        if self.end is None:
            return "running"
        if self.end.get("event") == names.COMMAND_RESULT:
            return str(self.end.get("outcome") or "finished")
        return str(self.end.get("event", "")).rpartition(".")[2]

    @property
    def ts(self) -> float:
        return ts_key(self.start if self.start is not None else self.end or {})


@dataclass
class Run:
    """The runs of one handler on one message: a command's handler, or a group's handler."""

    group: str | None
    handler: str | None
    attempts: list[Attempt] = field(default_factory=list)
    dead_letters: list[Rec] = field(default_factory=list)
    caused: list[Node] = field(default_factory=list)
    spans: set[str] = field(default_factory=set)

    @property
    def status(self) -> str:
        """The last attempt's status ("unknown" when only a dead letter was seen)."""
        return self.attempts[-1].status if self.attempts else "unknown"


@dataclass
class Node:
    """A command or an event: who sent it, its handler runs, and what it caused."""

    kind: Kind
    id: str
    type: str | None = None
    sent: Rec | None = None
    cause: str | None = None
    cause_kind: Kind | None = None
    session_id: str | None = None
    trace_id: str | None = None
    runs: list[Run] = field(default_factory=list)
    caused: list[Node] = field(default_factory=list)
    notes: list[Rec] = field(default_factory=list)
    #: already shown elsewhere in the tree (a duplicate or a cycle): not expanded again
    repeated: bool = False
    ts: float = 0.0


@dataclass
class Trace:
    """A causal tree, and the messages of its trace whose cause it does not hold."""

    root: Node
    detached: list[Node] = field(default_factory=list)


class TraceIndex:
    """The command and event records of some logs, by message and by cause."""

    def __init__(self, records: Iterable[Rec]) -> None:
        self.messages: dict[Key, list[Rec]] = {}
        #: application log lines and spans, by the span they were made in
        self.logs: dict[str, list[Rec]] = {}
        seen: set[str] = set()
        for record in records:
            key = message_key(record)
            span = _log_span(record) if key is None else None
            if key is None and span is None:
                continue
            fingerprint = json.dumps(record, sort_keys=True, default=str)
            if fingerprint in seen:  # the same line twice (copied logs, a replayed file)
                continue
            seen.add(fingerprint)
            if key is not None:
                self.messages.setdefault(key, []).append(record)
            elif span is not None:
                self.logs.setdefault(span, []).append(record)
        for found in [*self.messages.values(), *self.logs.values()]:
            found.sort(key=ts_key)
        self.causes = {key: _cause(key, found) for key, found in self.messages.items()}
        self.children: dict[str, list[Key]] = {}
        for key, cause in sorted(self.causes.items(), key=lambda kv: self.first_ts(kv[0])):
            if cause is not None:
                self.children.setdefault(cause, []).append(key)

    def first_ts(self, key: Key) -> float:
        found = self.messages.get(key)
        return ts_key(found[0]) if found else 0.0

    def resolve(self, ident: str) -> list[Key]:
        """Messages ``ident`` names: an exact id, a handler task id, else a unique-ish prefix."""
        exact = [key for key in (("command", ident), ("event", ident)) if key in self.messages]
        if exact:
            return exact  # type: ignore[return-value]
        event_id = _handler_task_event(ident)
        if event_id is not None and ("event", event_id) in self.messages:
            return [("event", event_id)]
        if len(ident) < 4:
            return []
        return sorted(key for key in self.messages if key[1].startswith(ident))


def message_key(record: Rec) -> Key | None:
    """The command or event a record is about, or None for records trace ignores."""
    event = record.get("event")
    task_name = str(record.get("task_name") or "")
    if event in _COMMAND_RECORDS:
        ident = record.get("command_id") or record.get("task_id")
        return ("command", str(ident)) if ident else None
    if event == names.EVENT_PUBLISHED or event in _HANDLER_RECORDS or event == names.DEAD_LETTER:
        ident = record.get("event_id") or _handler_task_event(record.get("task_id"))
        if ident:
            return ("event", str(ident))
        if event == names.DEAD_LETTER and record.get("command_id"):
            return ("command", str(record["command_id"]))
        return None
    if event in _TASK_NOTES and record.get("task_id"):
        task_id = str(record["task_id"])
        if task_name.startswith(topology.HANDLER_TASK_PREFIX):
            return ("event", _handler_task_event(task_id) or task_id)
        if task_name.startswith(topology.COMMAND_TASK_PREFIX) or record.get("command_id"):
            return ("command", str(record.get("command_id") or task_id))
    return None


def _log_span(record: Rec) -> str | None:
    """The span an application's log line (or a ``span`` record) was made in."""
    event = record.get("event")
    key = "parent_span_id" if event == names.SPAN else "span_id"
    if event in names.LIFECYCLE and event != names.SPAN:
        return None
    span = record.get(key)
    return str(span) if span else None


def _handler_task_event(task_id: object) -> str | None:
    """The event id in a handler task id ``<event id>:<group>:<handler>``."""
    if not isinstance(task_id, str):
        return None
    parts = task_id.split(":")
    return parts[0] if len(parts) == 3 and all(parts) else None


def _cause(key: Key, found: list[Rec]) -> str | None:
    """The id of what caused a message: its sent record's causation_id, else any record's."""
    sent = [r for r in found if r.get("event") == _SENT[key[0]]]
    for record in [*sent, *found]:
        cause = record.get("causation_id")
        # in a worker the handled message may itself be the context's causation
        if cause and cause != key[1]:
            return str(cause)
    return None


def build_trace(index: TraceIndex, key: Key) -> Trace:
    """The tree rooted at ``key``, plus messages of its trace whose cause is not logged."""
    placed: set[Key] = set()
    root = _build(index, key, placed)
    if root.trace_id is None:
        return Trace(root)
    known = {ident for _, ident in index.messages}
    orphans = [
        k
        for k, found in index.messages.items()
        if k not in placed
        and index.causes.get(k) not in known | {None}
        and any(r.get("trace_id") == root.trace_id for r in found)
    ]
    orphans.sort(key=index.first_ts)
    return Trace(root, [_build(index, k, placed) for k in orphans if k not in placed])


def _build(index: TraceIndex, key: Key, placed: set[Key]) -> Node:
    found = index.messages.get(key, [])
    node = Node(kind=key[0], id=key[1], ts=index.first_ts(key), repeated=key in placed)
    node.type = _first(found, "command_type" if key[0] == "command" else "event_type")
    if node.repeated:
        return node
    placed.add(key)
    node.sent = next((r for r in found if r.get("event") == _SENT[key[0]]), None)
    node.cause = index.causes.get(key)
    if node.cause is not None:
        node.cause_kind = next(
            (kind for kind in _KINDS if (kind, node.cause) in index.messages), None
        )
    node.session_id = _first(found, "session_id")
    node.trace_id = _first(found, "trace_id")
    node.runs, node.notes = _runs(key[0], found)
    for attempt in (a for run in node.runs for a in run.attempts):
        attempt.logs = index.logs.get(str(attempt.get("span_id")), [])
    for child_key in index.children.get(key[1], []):
        _attach(node, _build(index, child_key, placed), index.messages.get(child_key, []))
    return node


def _first(found: list[Rec], name: str) -> str | None:
    return next((str(r[name]) for r in found if r.get(name) is not None), None)


def _runs(kind: Kind, found: list[Rec]) -> tuple[list[Run], list[Rec]]:
    """The handler runs in ``found``, and the records that belong to no run."""
    runs: dict[tuple[str | None, str | None], Run] = {}
    notes: list[Rec] = []
    for record in found:
        event = record.get("event")
        run_record = event in _STARTS or event in _ENDS
        if event == names.DEAD_LETTER and (record.get("group") or record.get("handler")):
            run_record = True
        if not run_record:
            if event not in _SENT.values():
                notes.append(record)
            continue
        run_key = (None, None) if kind == "command" else _group_handler(record)
        run = runs.setdefault(run_key, Run(*run_key))
        if kind == "command" and run.handler is None and record.get("handler"):
            run.handler = str(record["handler"])
        if record.get("span_id"):
            run.spans.add(str(record["span_id"]))
        if event == names.DEAD_LETTER:
            run.dead_letters.append(record)
        else:
            _add_to_attempts(run.attempts, record)
    ordered = sorted(runs.values(), key=lambda r: (_run_ts(r), r.group or "", r.handler or ""))
    return ordered, notes


def _group_handler(record: Rec) -> tuple[str | None, str | None]:
    group, handler = record.get("group"), record.get("handler")
    task_id = record.get("task_id")
    if (group is None or handler is None) and _handler_task_event(task_id) is not None:
        _, task_group, task_handler = str(task_id).split(":")
        group, handler = group or task_group, handler or task_handler
    return (str(group) if group else None, str(handler) if handler else None)


def _run_ts(run: Run) -> float:
    times = [a.ts for a in run.attempts] + [ts_key(r) for r in run.dead_letters]
    return min(times) if times else 0.0


def _add_to_attempts(attempts: list[Attempt], record: Rec) -> None:
    """Pair a start or end record with its attempt (records come in ``ts`` order)."""
    if record.get("event") in _STARTS:
        attempts.append(Attempt(start=record))
        return
    open_ones = [a for a in attempts if a.end is None and a.start is not None]
    for same in (_same_process, _same_retries, lambda a, r: True):
        match = next((a for a in reversed(open_ones) if same(a, record)), None)
        if match is not None:
            match.end = record
            return
    attempts.append(Attempt(end=record))  # its start record is missing


def _same_process(attempt: Attempt, record: Rec) -> bool:
    start = attempt.start or {}
    keys = ("hostname", "pid", "retries")
    return all(start.get(k) == record.get(k) for k in keys) and _same_retries(attempt, record)


def _same_retries(attempt: Attempt, record: Rec) -> bool:
    return (attempt.start or {}).get("retries") == record.get("retries")


def _attach(parent: Node, child: Node, child_records: list[Rec]) -> None:
    """Put ``child`` under the run of ``parent`` that sent it, else under ``parent``."""
    sent = child.sent or (child_records[0] if child_records else {})
    spans = {str(sent[k]) for k in ("parent_span_id", "span_id") if sent.get(k)}
    for run in parent.runs:
        if spans & run.spans:
            run.caused.append(child)
            return
    name = (sent.get("group"), sent.get("handler"))
    by_name = [r for r in parent.runs if r.group and name == (r.group, r.handler)]
    if len(by_name) == 1:
        by_name[0].caused.append(child)
    elif parent.kind == "command" and len(parent.runs) == 1:
        parent.runs[0].caused.append(child)
    else:
        parent.caused.append(child)
