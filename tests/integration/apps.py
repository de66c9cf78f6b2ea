"""The application the integration tests run in real worker processes.

Workers start as ``celery -A tests.integration.apps:celery worker``; the
tests build their own producer instance of the same application class.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import gc
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import current_task
from pydantic import BaseModel

from llmgine_celery import (
    ApplicationBootstrap,
    ApplicationConfig,
    Command,
    CommandResult,
    Event,
    LogLevel,
    Settings,
)
from llmgine_celery.bus import topology
from llmgine_celery.messages.envelope import dump

APP_NAME = "itest"
RECORDER_URL = os.environ.get("ITEST_RECORDER_URL", "redis://127.0.0.1:6379/14")
SPECIAL_QUEUE = "itest.special"


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Point:
    x: float
    y: float


class Owner(BaseModel):
    name: str
    tags: list[str]


@dataclass
class WhereAmI(Command):
    tag: str


@dataclass
class AsyncWhereAmI(Command):
    tag: str


@dataclass
class Fail(Command):
    message: str


@dataclass
class Sleep(Command):
    seconds: float


@dataclass
class Marked(Command):
    """Marks its start in Redis, then takes ``seconds``: a window to kill a worker in."""

    seconds: float


@dataclass
class Special(Command):
    n: int


@dataclass
class Rich(Command):
    count: int
    ratio: float
    name: str
    flag: bool
    when: dt.datetime
    colour: Colour
    priority: Priority
    numbers: list[int]
    weights: dict[str, float]
    point: Point
    owner: Owner
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class NobodyHandles(Command):
    x: int


@dataclass
class Noted(Event):
    text: str


def where() -> dict[str, Any]:
    """Where a handler runs: process, thread and Celery task."""
    request = current_task.request
    return {
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "task_id": request.id,
        "task_name": current_task.name,
        "routing_key": (request.delivery_info or {}).get("routing_key"),
        "gc_frozen": gc.get_freeze_count(),
    }


class IntegrationApp(ApplicationBootstrap):
    """Handlers that report where and how they ran."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(WhereAmI, self.where_am_i)
        self.register_command_handler(AsyncWhereAmI, self.async_where_am_i)
        self.register_command_handler(Fail, self.fail)
        self.register_command_handler(Sleep, self.sleep)
        self.register_command_handler(Rich, self.rich)
        self.register_command_handler(Marked, self.marked)
        self.register_command_handler(Special, self.special, queue=SPECIAL_QUEUE)

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Noted, self.noted)

    def noted(self, event: Noted) -> None:
        self.obs_bus.log(LogLevel.INFO, f"noted: {event.text}")

    def where_am_i(self, command: WhereAmI) -> dict[str, Any]:
        return {**where(), "tag": command.tag}

    async def async_where_am_i(self, command: AsyncWhereAmI) -> dict[str, Any]:
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        # Counts the commands this loop has served: a loop per task restarts at 1.
        served = getattr(loop, "llmgine_test_served", 0) + 1
        loop.llmgine_test_served = served  # type: ignore[attr-defined]
        return {
            "pid": os.getpid(),
            "loop": id(loop),
            "served": served,
            "loop_thread": threading.current_thread().name,
            "tag": command.tag,
        }

    def fail(self, command: Fail) -> CommandResult:
        raise ValueError(command.message)

    def sleep(self, command: Sleep) -> str:
        time.sleep(command.seconds)
        return "slept"

    def marked(self, command: Marked) -> int:
        with redis.Redis.from_url(RECORDER_URL) as client:
            client.rpush(f"itest:marked:{command.id}", os.getpid())
        time.sleep(command.seconds)
        return os.getpid()

    def rich(self, command: Rich) -> dict[str, Any]:
        types = {name: type(getattr(command, name)).__name__ for name in vars(command)}
        return {"types": types, "data": dump(command)}

    def special(self, command: Special) -> dict[str, Any]:
        return {**where(), "n": command.n}


def producer(
    broker: str, backend: str, data_dir: Any, celery_config: str | None = None
) -> IntegrationApp:
    """A test's own instance of the application, to send with: queues declared, commands purged."""
    settings = Settings(
        broker_url=broker, result_backend=backend, embedded_worker=False, data_dir=data_dir,
        celery_config=celery_config,
    )  # fmt: skip
    made = IntegrationApp(ApplicationConfig(name=APP_NAME, settings=settings))
    made.declare()
    with made.celery.connection_for_write() as conn:
        conn.default_channel.queue_purge(topology.COMMAND_QUEUE)
    return made


app = IntegrationApp(ApplicationConfig(name=APP_NAME))
celery = app.celery
