"""The ``llmgine-celery`` command: demo, worker, declare."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence

from llmgine_celery.bootstrap import ApplicationBootstrap
from llmgine_celery.errors import LLMgineError


def load_app(spec: str) -> ApplicationBootstrap:
    """The ApplicationBootstrap named by ``module:attribute``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"llmgine-celery: cannot import {module_name!r}: {exc}") from exc
    app = getattr(module, attr or "app", None)
    if not isinstance(app, ApplicationBootstrap):
        raise SystemExit(f"llmgine-celery: {spec!r} is not an ApplicationBootstrap instance")
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
