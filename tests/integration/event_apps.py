"""Applications (subscriber groups) the event integration tests run in real workers.

Handlers record what they saw in a Redis list per group and handler, so a test
can tell which group ran which handler, how often, and in which process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import redis

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Command, Event
from llmgine_celery.bus.registry import RetryPolicy
from llmgine_celery.messages.system import EventHandlerFailedEvent

RECORDER_URL = os.environ.get("ITEST_RECORDER_URL", "redis://127.0.0.1:6379/14")
FAST_RETRY = RetryPolicy(max_retries=2, backoff=0.05, backoff_max=0.2)


@dataclass
class Said(Event):
    text: str


@dataclass
class Boom(Event):
    text: str


@dataclass
class Chained(Event):
    text: str
    shout: str


@dataclass
class Shout(Command):
    text: str


def recorder() -> redis.Redis:
    return redis.Redis.from_url(RECORDER_URL)


def record_key(group: str, handler: str) -> str:
    return f"itest:seen:{group}:{handler}"


def record(group: str, handler: str, event: Event, **extra: Any) -> None:
    """Append what a handler saw to its list."""
    entry = {"id": event.id, "pid": os.getpid(), "type": type(event).__name__, **extra}
    if hasattr(event, "text"):
        entry["text"] = event.text
    if event.session_id is not None:
        entry["session_id"] = event.session_id
    with recorder() as client:
        client.rpush(record_key(group, handler), json.dumps(entry))


class Alpha(ApplicationBootstrap):
    """Group ``alpha``: records, one handler that always fails, failure events."""

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Said, self.said)
        self.register_event_handler(Boom, self.flaky, retry=FAST_RETRY)
        self.register_event_handler(Boom, self.steady)
        self.register_event_handler(Chained, self.chained)
        self.register_event_handler(EventHandlerFailedEvent, self.handler_failed)

    def said(self, event: Said) -> None:
        time.sleep(0.01)  # long enough for two workers to share a burst
        record(self.name, "said", event)

    def flaky(self, event: Boom) -> None:
        record(self.name, "flaky", event)
        raise RuntimeError(f"flaky cannot handle {event.text}")

    def steady(self, event: Boom) -> None:
        record(self.name, "steady", event)

    def chained(self, event: Chained) -> None:
        record(self.name, "chained", event, shout=event.shout)

    def handler_failed(self, event: EventHandlerFailedEvent) -> None:
        record(
            self.name,
            "handler_failed",
            event,
            failed_event_id=event.event_id,
            failed_handler=event.handler,
            error=event.error,
            attempts=event.attempts,
        )


class Beta(ApplicationBootstrap):
    """Group ``beta``: an async handler that executes a command and publishes an event."""

    def _register_command_handlers(self) -> None:
        # Every worker consumes llmgine.commands; a command only beta handles
        # goes to beta's own queue, or alpha's workers would answer "no handler".
        self.register_command_handler(Shout, self.shout, queue="beta.commands")

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Said, self.said)
        self.register_event_handler(Boom, self.boom_seen)

    def shout(self, command: Shout) -> str:
        return command.text.upper()

    async def said(self, event: Said) -> None:
        await asyncio.sleep(0)
        record(self.name, "said", event)
        if event.text.startswith("chain"):
            result = await self.message_bus.execute(Shout(text=event.text), timeout=30)
            await self.message_bus.publish(
                Chained(text=event.text, shout=str(result.result), session_id=event.session_id)
            )

    def boom_seen(self, event: Boom) -> None:
        record(self.name, "boom_seen", event)


class Gamma(ApplicationBootstrap):
    """Group ``gamma``: started only after events were published to it."""

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Said, self.said)

    def said(self, event: Said) -> None:
        record(self.name, "said", event)


alpha = Alpha(ApplicationConfig(name="alpha"))
beta = Beta(ApplicationConfig(name="beta"))
gamma = Gamma(ApplicationConfig(name="gamma"))
alpha_celery = alpha.celery
beta_celery = beta.celery
gamma_celery = gamma.celery
