"""The MessageBus and how it maps onto Celery."""

from llmgine_celery.bus.message_bus import CommandHandle, MessageBus

__all__ = ["CommandHandle", "MessageBus"]
