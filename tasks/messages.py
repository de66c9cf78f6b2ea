"""Commands and events of the example LLM application."""

from dataclasses import dataclass

from llmgine_celery import Command, Event


@dataclass
class AskModel(Command):
    """Ask a language model one question."""

    prompt: str
    model: str = "echo-1"
    max_tokens: int = 64


@dataclass
class CountTokens(Command):
    """Count the (whitespace) tokens of a text."""

    text: str


@dataclass
class ModelAnswered(Event):
    """A model answered a prompt."""

    prompt: str
    answer: str
    tokens: int
