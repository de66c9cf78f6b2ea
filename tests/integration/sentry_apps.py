"""The application the Sentry integration tests run in a real worker process.

Workers start as ``celery -A tests.integration.sentry_apps:celery worker`` with
``SENTRY_DSN`` set to a DSN no server answers, and ``TEST_SENTRY_RECORD``
naming a file: instead of sending, :class:`FileRecordingTransport` appends each
envelope to it as one JSON line, so nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Command, Event
from llmgine_celery.bus.registry import RetryPolicy

APP_NAME = "sentrytest"
#: a DSN no server answers (``.invalid`` never resolves); the transports never send
FAKE_DSN = "https://public@sentry.invalid/1"
#: the environment variable naming the worker's envelope file
RECORD_ENV = "TEST_SENTRY_RECORD"
#: set: the worker imports Celery's worker consumer before Sentry is initialised
IMPORT_CONSUMER_FIRST_ENV = "TEST_SENTRY_IMPORT_CONSUMER_FIRST"
FAST_RETRY = RetryPolicy(max_retries=2, backoff=0.05, backoff_max=0.2)


def envelope_json(envelope: Envelope) -> dict[str, Any]:
    """An envelope as plain JSON: its headers and each item's type, headers and payload."""
    items = []
    for item in envelope.items:
        raw = item.payload.get_bytes()
        try:
            payload: Any = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        items.append({"type": item.type, "headers": item.headers, "payload": payload})
    return {"headers": envelope.headers, "items": items}


class FileRecordingTransport(Transport):
    """Appends envelopes as JSON lines to the file named by ``TEST_SENTRY_RECORD``."""

    def capture_envelope(self, envelope: Envelope) -> None:
        path = os.environ[RECORD_ENV]
        line = (json.dumps(envelope_json(envelope), default=str) + "\n").encode()
        # One write of an O_APPEND file: lines of prefork children never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


@dataclass
class Explode(Command):
    message: str


@dataclass
class Calm(Command):
    n: int


@dataclass
class Doomed(Event):
    text: str


class SentryApp(ApplicationBootstrap):
    """A command handler that raises, one that succeeds, an event handler that always fails."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(Explode, self.explode)
        self.register_command_handler(Calm, self.calm)

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Doomed, self.doomed, retry=FAST_RETRY)

    def explode(self, command: Explode) -> None:
        raise ValueError(command.message)

    def calm(self, command: Calm) -> int:
        return command.n * 2

    def doomed(self, event: Doomed) -> None:
        raise RuntimeError(f"doomed: {event.text}")


_worker_app: SentryApp | None = None


def __getattr__(name: str) -> Any:
    """``celery``: the worker's app, built when Celery's CLI asks ``-A`` for it.

    Celery's CLI looks the attribute up while loading the ``-A`` module, as it
    would find a module-level ``celery = app.celery``; built lazily, importing
    this module for its classes (as the tests do) initialises nothing.
    """
    global _worker_app
    if name != "celery":
        raise AttributeError(name)
    if _worker_app is None:
        if os.environ.get(IMPORT_CONSUMER_FIRST_ENV):
            # As if something imported Celery's worker consumer before the app was built
            import celery.worker.consumer  # noqa: F401

        config = ApplicationConfig(
            name=APP_NAME, sentry_options={"transport": FileRecordingTransport}
        )
        _worker_app = SentryApp(config)
    return _worker_app.celery
