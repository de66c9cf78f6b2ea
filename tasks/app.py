"""The example LLM application: ``celery -A tasks.app:celery worker`` runs it."""

from __future__ import annotations

import asyncio

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, CommandResult, LogLevel
from tasks.messages import AskModel, CountTokens, ModelAnswered


def fake_model(prompt: str, max_tokens: int) -> str:
    """A deterministic stand-in for a language model (no network here)."""
    words = prompt.split()
    return " ".join(reversed(words[:max_tokens]))


class LLMApplication(ApplicationBootstrap):
    """Answers prompts with a model and keeps a transcript of answers."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(AskModel, self.ask_model)
        self.register_command_handler(CountTokens, self.count_tokens)

    def _register_event_handlers(self) -> None:
        self.register_event_handler(ModelAnswered, self.record_answer)

    async def ask_model(self, command: AskModel) -> CommandResult:
        await asyncio.sleep(0.01)  # where a real model call would await the network
        answer = fake_model(command.prompt, command.max_tokens)
        await self.message_bus.publish(
            ModelAnswered(
                prompt=command.prompt,
                answer=answer,
                tokens=len(answer.split()),
                session_id=command.session_id,
            )
        )
        return CommandResult(command_id=command.id, success=True, result=answer)

    def count_tokens(self, command: CountTokens) -> int:
        return len(command.text.split())

    def record_answer(self, event: ModelAnswered) -> None:
        self.obs_bus.log(LogLevel.INFO, f"answer recorded: {event.answer!r}", tokens=event.tokens)


app = LLMApplication(ApplicationConfig(name="llm-app"))
celery = app.celery
