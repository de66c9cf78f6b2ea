"""The ``llmgine-celery`` command: demo, worker, declare, dead-letters, trace, logs."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from llmgine_celery.bootstrap import ApplicationBootstrap
from llmgine_celery.bus import dead_letter_admin as admin
from llmgine_celery.bus import topology
from llmgine_celery.bus.dead_letters import DeadLetter
from llmgine_celery.errors import ConfigurationError, LLMgineError
from llmgine_celery.messages.envelope import dump
from llmgine_celery.observability import logview, trace_render
from llmgine_celery.observability import trace as tracing
from llmgine_celery.observability.bus import LogLevel
from llmgine_celery.settings import Settings

#: characters of a reason shown by ``dead-letters list``
REASON_WIDTH = 80


def load_app(spec: str) -> ApplicationBootstrap:
    """The ApplicationBootstrap named by ``module:attribute``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    app = getattr(module, attr or "app", None)
    if not isinstance(app, ApplicationBootstrap):
        raise ConfigurationError(f"{spec!r} is not an ApplicationBootstrap instance")
    return app


def _demo(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(args.module)
    except ImportError as exc:
        raise SystemExit(
            f"llmgine-celery: cannot import the demo module {args.module!r} ({exc}); "
            "run the demo from the repository root, where the example application lives"
        ) from exc
    asyncio.run(module.main())
    return 0


def _worker(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    app.celery.worker_main(["worker", *args.celery_args])
    return 0


def _declare(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    for queue in app.declare():
        print(queue)
    return 0


def summary_line(record: DeadLetter) -> str:
    """One line of ``dead-letters list``: who failed, when, on which event, and why."""
    event = record.event if isinstance(record.event, dict) else {}
    fields = event.get("data")
    data = fields if isinstance(fields, dict) else {}
    reason = " ".join(record.reason.split())  # a reason or raw body may span lines
    if len(reason) > REASON_WIDTH:
        reason = reason[: REASON_WIDTH - 3] + "..."
    return "  ".join(
        [
            record.id,
            record.kind,
            f"{record.group or '-'}/{record.handler or '-'}",
            f"attempts={record.attempts}",
            record.dead_lettered_at or "-",
            f"{event.get('type', '-')}:{data.get('id', '-')}",
            reason,
        ]
    )


def _dead_list(args: argparse.Namespace) -> int:
    records = admin.list_dead_letters(load_app(args.app).celery)
    for record in records:
        print(summary_line(record))
    print(f"{len(records)} dead letter(s) on {topology.DEAD_LETTER_QUEUE}", file=sys.stderr)
    return 0


def _dead_show(args: argparse.Namespace) -> int:
    record = admin.get_dead_letter(load_app(args.app).celery, args.id)
    print(json.dumps(dump(record), indent=2))
    return 0


def _dead_replay(args: argparse.Namespace) -> int:
    record = admin.replay_dead_letter(load_app(args.app).celery, args.id)
    name, task_id, queue = admin.replay_target(record)
    print(f"replayed dead letter {record.id}: sent task {name} (id {task_id}) to {queue}")
    return 0


def _dead_purge(args: argparse.Namespace) -> int:
    celery = load_app(args.app).celery
    if not args.yes:
        count = len(admin.list_dead_letters(celery))
        answer = _ask(f"purge {count} dead letter(s) from {topology.DEAD_LETTER_QUEUE}? [y/N] ")
        if answer not in {"y", "yes"}:
            print("llmgine-celery: nothing purged", file=sys.stderr)
            return 1
    print(f"purged {admin.purge_dead_letters(celery)} dead letter(s)")
    return 0


def _ask(prompt: str) -> str:
    try:
        return input(prompt).strip().lower()
    except EOFError:  # no terminal to answer: the safe answer is no
        print()
        return ""


def _add_dead_letters(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("dead-letters", help=f"inspect and replay {topology.DEAD_LETTER_QUEUE}")
    actions = parser.add_subparsers(dest="action", required=True)
    commands = [
        ("list", _dead_list, "one line per dead letter (none is removed)"),
        ("show", _dead_show, "one dead letter as JSON, traceback included"),
        ("replay", _dead_replay, "send its event to its one handler again, then remove it"),
        ("purge", _dead_purge, "remove every dead letter"),
    ]
    for name, run, help_text in commands:
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("app", help="module:attribute naming an ApplicationBootstrap")
        if name in {"show", "replay"}:
            action.add_argument("id", help="the dead letter's id (see list)")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="do not ask first")
        action.set_defaults(run=run)


def _log_dir(args: argparse.Namespace) -> Path:
    if args.log_dir is not None:
        return Path(args.log_dir)
    try:
        return Settings().logs
    except ValidationError as exc:
        raise ConfigurationError(f"invalid LLMGINE_* settings: {exc}") from exc


def _warn(message: str | None) -> None:
    if message:
        print(f"llmgine-celery: {message}", file=sys.stderr)


def _trace(args: argparse.Namespace) -> int:
    log_dir = _log_dir(args)
    if not logview.log_files(log_dir):
        _warn(f"no JSONL logs in {log_dir} (set --log-dir or LLMGINE_LOG_DIR)")
        return 1
    skipped = logview.Skipped()
    index = tracing.TraceIndex(logview.read_records(log_dir, skipped))
    _warn(skipped.message())
    keys = index.resolve(args.id)
    if not keys:
        _warn(f"no command or event {args.id!r} in the logs in {log_dir}")
        return 1
    if len(keys) > 1:
        found = ", ".join(f"{kind} {ident}" for kind, ident in keys[:10])
        _warn(f"{args.id!r} names {len(keys)} messages: {found}; give more of the id")
        return 1
    found_trace = tracing.build_trace(index, keys[0])
    if args.json:
        print(json.dumps(trace_render.to_json(found_trace), indent=2, ensure_ascii=False))
    else:
        print(trace_render.render(found_trace), end="")
    return 0


def _logs(args: argparse.Namespace) -> int:
    log_dir = _log_dir(args)
    keep = logview.RecordFilter(
        level=int(LogLevel[args.level]) if args.level else 0,
        command_id=args.command_id,
        event_id=args.event_id,
        session_id=args.session_id,
        events=tuple(args.event or ()),
        services=tuple(args.service or ()),
    )

    def show(record: logview.Rec) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        print(line if args.json else logview.format_line(record), flush=args.follow)

    skipped = logview.Skipped()
    if args.follow:
        try:
            lines = 10 if args.lines is None else args.lines
            logview.follow(log_dir, keep, show, skipped, initial=lines, warn=_warn)
        except KeyboardInterrupt:
            pass
        return 0
    if not logview.log_files(log_dir):
        _warn(f"no JSONL logs in {log_dir} (set --log-dir or LLMGINE_LOG_DIR)")
        return 1
    for record in logview.last_matching(log_dir, keep, args.lines, skipped):
        show(record)
    _warn(skipped.message())
    return 0


def _add_observability(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    folder = "folder of the JSONL logs (default: LLMGINE_LOG_DIR, else <LLMGINE_DATA_DIR>/logs)"
    trace = sub.add_parser(
        "trace",
        help="print the causal tree of a command or event from the JSONL logs",
        description="The command (or event) ID, its handler runs, the events and commands "
        "they caused, recursively, read from every service's JSONL files.",
    )
    trace.add_argument("id", help="a command id (= its task id) or an event id")
    trace.add_argument("--log-dir", help=folder)
    trace.add_argument("--json", action="store_true", help="print the tree as JSON")
    trace.set_defaults(run=_trace)

    logs = sub.add_parser(
        "logs",
        help="print (and follow) JSONL records, filtered",
        description="Records of every service's JSONL files in time order, filtered; "
        "all criteria given must hold.",
    )
    logs.add_argument("--log-dir", help=folder)
    logs.add_argument(
        "--level", type=str.upper, choices=list(LogLevel.__members__), help="lowest level shown"
    )
    logs.add_argument("--command-id", help="records of this command (its id is its task id)")
    logs.add_argument("--event-id", help="records of this event and its handler runs")
    logs.add_argument("--session-id", help="records of this session")
    logs.add_argument(
        "--event",
        action="append",
        metavar="NAME",
        help="record name, e.g. command.result; 'handler.' or 'handler*' is a prefix (repeatable)",
    )
    logs.add_argument("--service", action="append", help="records of this service (repeatable)")
    logs.add_argument(
        "-n", "--lines", type=_count, metavar="N", help="only the last N matching records"
    )
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new records until Ctrl-C"
    )
    logs.add_argument("--json", action="store_true", help="print each record as its JSON line")
    logs.set_defaults(run=_logs)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmgine-celery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the example application on the embedded default")
    demo.add_argument("--module", default="tasks.demo", help="module whose main() runs the demo")
    demo.set_defaults(run=_demo)

    worker = sub.add_parser("worker", help="run a Celery worker for APP (module:attribute)")
    worker.add_argument("app")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery worker")
    worker.set_defaults(run=_worker)

    declare = sub.add_parser("declare", help="declare APP's queues, exchanges and bindings")
    declare.add_argument("app")
    declare.set_defaults(run=_declare)
    _add_dead_letters(sub)
    _add_observability(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmgine-celery`` console script."""
    # Like ``celery -A``: application modules are found from the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except LLMgineError as exc:
        print(f"llmgine-celery: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, as Unix tools do, and
        # point stdout at /dev/null so the interpreter's last flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
