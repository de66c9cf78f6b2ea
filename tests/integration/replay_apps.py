"""The application the dead-letter integration tests run in a real worker.

Group ``replayer`` has one handler that fails while a Redis flag key exists and
otherwise records its run, so a test can break it, let an event be
dead-lettered, mend it, and replay the event.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import redis
from celery import current_task

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Event
from llmgine_celery.bus.registry import RetryPolicy

RECORDER_URL = os.environ.get("ITEST_RECORDER_URL", "redis://127.0.0.1:6379/14")
GROUP = "replayer"
HANDLER = "fragile"
#: while this key exists the handler fails
BROKEN_KEY = "itest:replay:broken"
#: a list of the handler's successful runs, as JSON
RUNS_KEY = "itest:replay:runs"
FAST_RETRY = RetryPolicy(max_retries=1, backoff=0.01, backoff_max=0.05)


@dataclass
class Fragile(Event):
    text: str


def recorder() -> redis.Redis:
    return redis.Redis.from_url(RECORDER_URL)


class Replayer(ApplicationBootstrap):
    """Group ``replayer``: one handler, broken on demand."""

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Fragile, self.fragile, name=HANDLER, retry=FAST_RETRY)

    def fragile(self, event: Fragile) -> None:
        with recorder() as client:
            if client.exists(BROKEN_KEY):
                raise RuntimeError(f"fragile is broken for {event.text}")
            run = {"id": event.id, "text": event.text, "task_id": current_task.request.id}
            client.rpush(RUNS_KEY, json.dumps(run))


replayer = Replayer(ApplicationConfig(name=GROUP))


def __getattr__(name: str) -> Any:
    # ``celery -A tests.integration.replay_apps:celery`` builds the app in the
    # worker, from the environment the test gave it; importing this module in
    # the test process builds nothing.
    if name == "celery":
        return replayer.celery
    raise AttributeError(name)
