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
