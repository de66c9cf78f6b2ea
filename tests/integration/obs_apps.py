"""The application the observability integration tests run in real workers.

A command handler (async, so the correlation must cross to the handler loop)
logs, publishes an event and returns its pid; a listener group handles the
event; another handler always fails, to be retried and dead-lettered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Command, Event, LogLevel
from llmgine_celery.bus.registry import RetryPolicy
from llmgine_celery.messages.system import CommandResultEvent

APP_NAME = "obs-app"
ROUTED_NAME = "obs-routed"
#: the queue RoutedObsApp sends Ask to (a prefork worker of its own consumes it)
PREFORK_QUEUE = "obs.prefork"
LISTENERS = "obs-listeners"
FAST_RETRY = RetryPolicy(max_retries=2, backoff=0.05, backoff_max=0.2)


@dataclass
class Ask(Command):
    prompt: str
    api_key: str = ""


@dataclass
class Fail(Command):
    why: str


@dataclass
class Answered(Event):
    command_id: str
    text: str


@dataclass
class Doomed(Event):
    text: str


class ObsApp(ApplicationBootstrap):
    """Commands that publish, a listener group, a handler that always fails."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(Ask, self.ask)
        self.register_command_handler(Fail, self.fail)

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Answered, self.heard, group=LISTENERS)
        self.register_event_handler(Doomed, self.doomed, group=LISTENERS, retry=FAST_RETRY)
        self.register_event_handler(CommandResultEvent, self.finished, group=LISTENERS)

    async def ask(self, command: Ask) -> int:
        self.obs_bus.log(LogLevel.INFO, "answering", prompt=command.prompt)
        answered = Answered(command_id=command.id, text=command.prompt.upper())
        answered.session_id = command.session_id
        await self.message_bus.publish(answered)
        return os.getpid()

    def fail(self, command: Fail) -> None:
        raise RuntimeError(command.why)

    def heard(self, event: Answered) -> None:
        self.obs_bus.log(LogLevel.INFO, "heard", text=event.text)

    def finished(self, event: CommandResultEvent) -> None:
        fields = {"command_type": event.command_type, "success": event.success}
        self.obs_bus.log(LogLevel.INFO, "command finished", command_id=event.command_id, **fields)

    def doomed(self, event: Doomed) -> None:
        raise ValueError(f"cannot handle {event.text}")


class RoutedObsApp(ObsApp):
    """The same handlers, with Ask routed to its own queue."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(Ask, self.ask, queue=PREFORK_QUEUE)
        self.register_command_handler(Fail, self.fail)


app = ObsApp(ApplicationConfig(name=APP_NAME))
celery = app.celery
routed = RoutedObsApp(ApplicationConfig(name=ROUTED_NAME))
routed_celery = routed.celery
