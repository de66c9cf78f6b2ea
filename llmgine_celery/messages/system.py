"""Events the framework itself publishes."""

from __future__ import annotations

from dataclasses import dataclass

from llmgine_celery.messages.events import Event


@dataclass
class EventHandlerFailedEvent(Event):
    """An event handler failed its last retry; its event went to the dead letters."""

    event_type: str
    event_id: str
    group: str
    handler: str
    error: str
    attempts: int
    dead_letter_id: str


@dataclass
class CommandStartedEvent(Event):
    """A command's handler started in a worker (published with LLMGINE_COMMAND_EVENTS)."""

    command_id: str
    command_type: str


@dataclass
class CommandResultEvent(Event):
    """A command's handler finished (published with LLMGINE_COMMAND_EVENTS)."""

    command_id: str
    command_type: str
    success: bool
    error: str | None = None
    duration_ms: float | None = None
