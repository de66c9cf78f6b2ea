"""llmgine-celery: LLMgine's MessageBus, ObservabilityBus and bootstrap on Celery."""

from llmgine_celery.bootstrap import ApplicationBootstrap, ApplicationConfig
from llmgine_celery.bus import CommandHandle, MessageBus
from llmgine_celery.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    DeadLetterError,
    DeadLetterNotFoundError,
    DeadLetterNotReplayableError,
    DuplicateHandlerError,
    LLMgineError,
    MessageError,
    MessageValidationError,
    RegistrationError,
    UnknownMessageTypeError,
)
from llmgine_celery.messages import Command, CommandResult, Event
from llmgine_celery.observability import LogLevel, ObservabilityBus
from llmgine_celery.settings import Settings

__all__ = [
    # application
    "ApplicationBootstrap",
    "ApplicationConfig",
    # errors
    "BrokerUnavailableError",
    # messages
    "Command",
    # buses
    "CommandHandle",
    "CommandResult",
    "ConfigurationError",
    "DeadLetterError",
    "DeadLetterNotFoundError",
    "DeadLetterNotReplayableError",
    "DuplicateHandlerError",
    "Event",
    "LLMgineError",
    "LogLevel",
    "MessageBus",
    "MessageError",
    "MessageValidationError",
    "ObservabilityBus",
    "RegistrationError",
    "Settings",
    "UnknownMessageTypeError",
]
