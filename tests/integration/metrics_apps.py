"""The application the metrics integration tests run in real workers.

Workers start as ``celery -A tests.integration.metrics_apps:celery worker``.
One command succeeds and one raises; one event's handler succeeds and one
always raises, to be retried once and dead-lettered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Command, Event
from llmgine_celery.bus.registry import RetryPolicy

APP_NAME = "metrics-app"
ONE_FAST_RETRY = RetryPolicy(max_retries=1, backoff=0.05, backoff_max=0.1)


@dataclass
class Succeed(Command):
    n: int


@dataclass
class Explode(Command):
    why: str


@dataclass
class Pinged(Event):
    n: int


@dataclass
class Broken(Event):
    n: int


class MetricsApp(ApplicationBootstrap):
    """Handlers that succeed or fail on purpose."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(Succeed, self.succeed)
        self.register_command_handler(Explode, self.explode)

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Pinged, self.pinged)
        self.register_event_handler(Broken, self.broken, retry=ONE_FAST_RETRY)

    def succeed(self, command: Succeed) -> int:
        return os.getpid()

    def explode(self, command: Explode) -> None:
        raise RuntimeError(command.why)

    def pinged(self, event: Pinged) -> None:
        pass

    def broken(self, event: Broken) -> None:
        raise ValueError(f"cannot handle {event.n}")


app = MetricsApp(ApplicationConfig(name=APP_NAME))
celery = app.celery
