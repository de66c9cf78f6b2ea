"""The llmgine-celery side: one command type whose handler echoes its payload.

Configured from ``LLMGINE_BROKER_URL`` and ``LLMGINE_RESULT_BACKEND`` when
imported. The worker runs ``celery -A bench.apps.llmgine_echo:celery worker``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Command


@dataclass
class Echo(Command):
    """Asks for ``payload`` back."""

    payload: str


class EchoApp(ApplicationBootstrap):
    """An application with one trivial, synchronous command handler."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(Echo, self.echo)

    def echo(self, command: Echo) -> str:
        return command.payload


app = EchoApp(ApplicationConfig(name="bench-echo"))
celery = app.celery
