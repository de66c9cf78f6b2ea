"""The one error tree of llmgine-celery.

Handler failures are not exceptions to the caller: ``execute`` turns them into
a failed ``CommandResult``. What is raised here is misuse and infrastructure.
"""

from __future__ import annotations


class LLMgineError(Exception):
    """Base class of every error raised by llmgine-celery."""


class ConfigurationError(LLMgineError):
    """Settings or Celery configuration that cannot work."""


class BrokerUnavailableError(ConfigurationError):
    """The broker or result backend cannot be reached (URL shown redacted)."""


class RegistrationError(LLMgineError):
    """A handler or message type was registered wrongly."""


class DuplicateHandlerError(RegistrationError):
    """A command type already has its one handler."""


class MessageError(LLMgineError):
    """A message could not be encoded or decoded."""

    def __init__(self, message: str, raw: object = None) -> None:
        super().__init__(message)
        #: what was being encoded or decoded, for dead letters and logs
        self.raw = raw


class MessageValidationError(MessageError, ValueError):
    """A message's fields do not match its type; the message names them."""


class UnknownMessageTypeError(MessageError):
    """An envelope names a type this application has not registered."""


class DeadLetterError(LLMgineError):
    """A dead-letter operation asked for something the queue cannot give."""


class DeadLetterNotFoundError(DeadLetterError):
    """No dead letter with that id is on the dead-letter queue."""


class DeadLetterNotReplayableError(DeadLetterError):
    """The dead letter lacks the event or the handler needed to replay it."""
