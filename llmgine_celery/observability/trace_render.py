"""The causal tree of ``llmgine-celery trace`` as text (box-drawing branches) or JSON.

Times under the root are offsets from the root's first record, so one glance
shows the order and the gaps (hosts' clocks may differ by a little).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmgine_celery.observability.logview import Rec, fields_text, short_ts, ts_key
from llmgine_celery.observability.trace import Attempt, Kind, Node, Run, Trace

#: ids a log line under a run shares with the run: not repeated
_CORRELATION = ("trace_id", "span_id", "parent_span_id", "causation_id", "session_id")


@dataclass
class Line:
    """One line of the printed tree and the lines under it."""

    text: str
    children: list[Line] = field(default_factory=list)


def render(trace: Trace) -> str:
    """The tree as indented text with box-drawing branches."""
    t0 = trace.root.ts
    out: list[str] = []
    _draw(_node_line(trace.root, t0, root=True), "", "", out)
    for node in trace.detached:
        out.append("")
        out.append(f"also in trace {trace.root.trace_id}, cause not in these logs:")
        _draw(_node_line(node, t0), "", "", out)
    return "\n".join(out) + "\n"


def _draw(line: Line, head: str, indent: str, out: list[str]) -> None:
    out.append(head + line.text)
    for i, child in enumerate(line.children):
        last = i == len(line.children) - 1
        _draw(child, indent + ("└─ " if last else "├─ "), indent + ("   " if last else "│  "), out)


def _node_line(node: Node, t0: float, root: bool = False) -> Line:
    title = f"{node.kind} {node.type or '?'} {node.id}"
    if node.repeated:
        return Line(f"{title} (shown above: not repeated)")
    if root and node.session_id:
        title += f"  session {node.session_id}"
    if root and node.trace_id:
        title += f"  trace {node.trace_id}"
    line = Line(title)
    if root and node.cause:
        line.children.append(Line(f"caused by {node.cause_kind or 'message'} {node.cause}"))
    line.children.append(_sent_line(node, t0, root))
    line.children.extend(_run_line(node.kind, run, t0) for run in node.runs)
    line.children.extend(_note_line(note, t0) for note in node.notes)
    line.children.extend(_node_line(child, t0) for child in node.caused)
    return line


def _sent_line(node: Node, t0: float, root: bool) -> Line:
    verb = "sent" if node.kind == "command" else "published"
    sent = node.sent
    if sent is None:
        return Line(f"{verb}: no record (the sender's log is not in this folder)")
    when = f"{short_ts(sent.get('ts'))} UTC" if root else _offset(ts_key(sent), t0)
    text = f"{verb} {when} by {sent.get('service', '?')} on {_where(sent)}"
    if sent.get("queue"):
        text += f" to {sent['queue']}"
    return Line(text)


def _run_line(kind: Kind, run: Run, t0: float) -> Line:
    if kind == "command":
        name = f"handler {run.handler}" if run.handler else "handler"
    else:
        name = f"{run.group or '?'}/{run.handler or '?'}"
    dead = ", dead-lettered" if run.dead_letters else ""
    if len(run.attempts) == 1:
        (attempt,) = run.attempts
        line = Line(f"{name}: {_attempt_text(attempt, t0)}{dead}", _log_lines(attempt, t0))
    else:
        count = len(run.attempts)
        line = Line(f"{name}: {run.status} after {count} attempt{'s' * (count != 1)}{dead}")
        for n, attempt in enumerate(run.attempts, 1):
            text = f"attempt {n}: {_attempt_text(attempt, t0)}"
            line.children.append(Line(text, _log_lines(attempt, t0)))
    for record in run.dead_letters:
        line.children.append(_note_line(record, t0))
    line.children.extend(_node_line(child, t0) for child in run.caused)
    return line


def _attempt_text(attempt: Attempt, t0: float) -> str:
    text = attempt.status
    if attempt.get("duration_ms") is not None:
        text += f" in {_ms(attempt.get('duration_ms'))}"
    if attempt.get("queue_wait_ms") is not None:
        text += f" (queue wait {_ms(attempt.get('queue_wait_ms'))})"
    text += f" on {_where(attempt.start or attempt.end)}, {_offset(attempt.ts, t0)}"
    error, exception = attempt.get("error"), attempt.get("exception")
    if exception and not str(error or "").startswith(str(exception)):
        error = f"{exception}: {error}" if error else exception
    return f"{text}; error: {error}" if error and attempt.status != "succeeded" else text


def _log_lines(attempt: Attempt, t0: float) -> list[Line]:
    """What the handler logged during ``attempt``, one line each."""
    lines = []
    for record in attempt.logs:
        fields = fields_text(record, _CORRELATION)
        when = _offset(ts_key(record), t0)
        text = f"log {record.get('level', '?')} {record.get('event', '?')} {when}"
        lines.append(Line(f"{text}: {fields}" if fields else text))
    return lines


def _note_line(record: Rec, t0: float) -> Line:
    details = [str(record[k]) for k in ("kind", "reason", "error") if record.get(k)]
    text = f"{record.get('event', '?')} {_offset(ts_key(record), t0)}"
    return Line(f"{text}: {'; '.join(details)}" if details else text)


def _where(record: Rec | None) -> str:
    record = record or {}
    text = f"{record.get('hostname', '?')} pid {record.get('pid', '?')}"
    worker = record.get("worker")
    return f"{text} ({worker})" if worker and worker != record.get("hostname") else text


def _offset(ts: float, t0: float) -> str:
    return f"at +{_ms((ts - t0) * 1000)}" if ts and t0 else "at ?"


def _ms(value: object) -> str:
    try:
        ms = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return f"{ms / 1000:.3f} s" if abs(ms) >= 1000 else f"{ms:.1f} ms"


def to_json(trace: Trace) -> dict[str, Any]:
    """The tree as plain JSON data (``trace --json``)."""
    return {"root": _node_json(trace.root), "detached": [_node_json(n) for n in trace.detached]}


def _node_json(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": node.kind, "id": node.id, "type": node.type}
    if node.repeated:
        return {**data, "repeated": True}
    return {
        **data,
        "cause": node.cause,
        "cause_kind": node.cause_kind,
        "session_id": node.session_id,
        "trace_id": node.trace_id,
        "sent": node.sent,
        "runs": [_run_json(run) for run in node.runs],
        "notes": node.notes,
        "caused": [_node_json(child) for child in node.caused],
    }


def _run_json(run: Run) -> dict[str, Any]:
    keys = ("hostname", "pid", "worker", "retries", "duration_ms", "queue_wait_ms")
    attempts = [
        {
            "status": a.status,
            "started": (a.start or {}).get("ts"),
            "ended": (a.end or {}).get("ts"),
            "logs": a.logs,
            **{k: a.get(k) for k in (*keys, "outcome", "error", "exception")},
        }
        for a in run.attempts
    ]
    return {
        "group": run.group,
        "handler": run.handler,
        "status": run.status,
        "attempts": attempts,
        "dead_letters": run.dead_letters,
        "caused": [_node_json(child) for child in run.caused],
    }
