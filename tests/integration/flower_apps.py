"""The application the Flower test runs in a real worker, with Flower watching.

Workers and Flower start as ``celery -A tests.integration.flower_apps:celery ...``.
One command carries a credential (``api_key``), so the test can check that
Flower never shows its value; its handler never returns it either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Command, Event

APP_NAME = "flowertest"


@dataclass
class AskWithKey(Command):
    """Ask a (fake) model with a per-call credential."""

    prompt: str
    api_key: str


@dataclass
class CountWords(Command):
    """Count the words of a text."""

    text: str


@dataclass
class Answered(Event):
    """A prompt was answered."""

    prompt: str
    words: int


def key_digest(key: str) -> str:
    """A short digest of a credential: proof it was seen, useless to an attacker."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class FlowerApp(ApplicationBootstrap):
    """Two command types and two handlers of one event type."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(AskWithKey, self.ask)
        self.register_command_handler(CountWords, self.count_words)

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Answered, self.archive_answer)
        self.register_event_handler(Answered, self.bill_answer)

    def ask(self, command: AskWithKey) -> dict[str, str]:
        # A digest shows the key arrived; the key itself is never echoed,
        # since Flower shows a command's result as it is.
        return {
            "answer": " ".join(reversed(command.prompt.split())),
            "key_digest": key_digest(command.api_key),
        }

    def count_words(self, command: CountWords) -> int:
        return len(command.text.split())

    def archive_answer(self, event: Answered) -> str:
        return event.prompt

    def bill_answer(self, event: Answered) -> int:
        return event.words


app = FlowerApp(ApplicationConfig(name=APP_NAME))
celery = app.celery
