"""The ``llmgine-celery`` command: demo, worker, declare, dead-letters."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Sequence

from llmgine_celery.bootstrap import ApplicationBootstrap
from llmgine_celery.bus import dead_letter_admin as admin
from llmgine_celery.bus import topology
from llmgine_celery.bus.dead_letters import DeadLetter
from llmgine_celery.errors import ConfigurationError, LLMgineError
from llmgine_celery.messages.envelope import dump

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
    return code


if __name__ == "__main__":
    sys.exit(main())
