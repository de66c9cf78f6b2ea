"""Messages: commands, events, results and their wire envelope."""

from llmgine_celery.messages.commands import Command, CommandResult
from llmgine_celery.messages.events import Event

__all__ = ["Command", "CommandResult", "Event"]
