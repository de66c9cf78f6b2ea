"""The LLMgine seed's integration example, with llmgine_celery import paths.

Run it with nothing configured: commands and events go through an embedded
broker under ./.llmgine and an in-process Celery worker.
"""

import asyncio
from dataclasses import dataclass

from llmgine_celery.bootstrap import ApplicationBootstrap
from llmgine_celery.messages.commands import Command, CommandResult
from llmgine_celery.messages.events import Event
from llmgine_celery.observability import LogLevel


# Define your commands
@dataclass
class MyCommand(Command):
    param1: str
    param2: int


# Define your events
@dataclass
class MyEvent(Event):
    data: str


# Create your application
class MyApplication(ApplicationBootstrap):
    def _register_command_handlers(self):
        self.register_command_handler(MyCommand, self.handle_my_command)

    def _register_event_handlers(self):
        self.register_event_handler(MyEvent, self.handle_my_event)

    def handle_my_command(self, command: MyCommand) -> CommandResult:
        # Process the command
        return CommandResult(
            command_id=command.id,
            success=True,
            result="Command processed",
        )

    def handle_my_event(self, event: MyEvent) -> None:
        # Process the event
        self.obs_bus.log(LogLevel.INFO, f"Event handled: {event.data}")


async def main() -> None:
    # Initialize the application
    app = MyApplication()

    # Start everything
    await app.bootstrap()

    # Execute commands
    result = await app.message_bus.execute(MyCommand(param1="value", param2=42))
    print(f"Command result: success={result.success} result={result.result!r}")

    # Publish events
    await app.message_bus.publish(MyEvent(data="Something happened"))

    # When done
    await app.shutdown()
    print("Shutdown complete")


if __name__ == "__main__":
    asyncio.run(main())
