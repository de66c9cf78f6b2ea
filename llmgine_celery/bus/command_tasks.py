"""One thin Celery task per command type: decode, call the handler, map errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmgine_celery.bus import results
from llmgine_celery.bus.registry import CommandRoute, HandlerRegistry
from llmgine_celery.bus.result_backend import first_delivery
from llmgine_celery.bus.runtime import call_handler
from llmgine_celery.bus.task_request import llmgine_task
from llmgine_celery.errors import MessageError
from llmgine_celery.messages.commands import Command, CommandResult
from llmgine_celery.messages.events import Event
from llmgine_celery.messages.system import CommandResultEvent, CommandStartedEvent

if TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)

#: characters of a command's result that Celery logs and Flower shows
RESULT_REPR_CHARS = 200


@dataclass(frozen=True)
class CommandHooks:
    """What else happens around a command handler: error reporting, lifecycle events."""

    #: called with a handler's exception (Sentry: the task itself succeeds)
    on_error: Callable[[BaseException], None] | None = None
    #: publishes CommandStartedEvent / CommandResultEvent when set
    announce: Callable[[Event], None] | None = None


def run_command(
    registry: HandlerRegistry, task_id: str, envelope: Any, hooks: CommandHooks = CommandHooks()
) -> CommandResult:
    """Run the handler of the command in ``envelope``; always return a result."""
    try:
        command = registry.types.decode(envelope)
    except MessageError as exc:
        logger.warning("command %s rejected: %s", task_id, exc)
        return results.failure(task_id, str(exc), reason="invalid_message")
    route = registry.command_route(type(command))
    if route is None:
        return results.no_handler(command.id, type(command).__name__)
    started = time.perf_counter()
    if hooks.announce is not None:
        hooks.announce(_started_event(command, envelope))
    try:
        outcome = results.from_outcome(command, call_handler(route.handler, command))
    except Exception as exc:  # a handler failure is a result, not a task failure
        logger.info("handler of %s %s raised %r", type(command).__name__, command.id, exc)
        if hooks.on_error is not None:
            hooks.on_error(exc)
        outcome = results.from_exception(command.id, exc)
    if hooks.announce is not None:
        elapsed = round((time.perf_counter() - started) * 1000, 3)
        hooks.announce(_result_event(command, envelope, outcome, elapsed))
    return outcome


def _started_event(command: Command, envelope: Any) -> CommandStartedEvent:
    return CommandStartedEvent(
        command_id=command.id, command_type=envelope["type"], session_id=command.session_id
    )


def _result_event(
    command: Command, envelope: Any, outcome: CommandResult, elapsed: float
) -> CommandResultEvent:
    return CommandResultEvent(
        command_id=command.id,
        command_type=envelope["type"],
        success=outcome.success,
        error=outcome.error,
        duration_ms=elapsed,
        session_id=command.session_id,
    )


def register_command_task(
    celery: Celery,
    registry: HandlerRegistry,
    route: CommandRoute,
    hooks: CommandHooks = CommandHooks(),
) -> Task:
    """Create (once) the Celery task serving ``route``'s command type."""
    if route.task_name in celery.tasks:
        return celery.tasks[route.task_name]

    def command_task(self: Task, envelope: Any) -> str | dict[str, Any]:
        task_id = self.request.id or ""
        if not first_delivery(self.request):
            # A copy of a command that may have run: a stored success stands.
            meta = self.backend.get_task_meta(task_id)
            stored = meta.get("result")
            if meta.get("status") == "SUCCESS" and isinstance(stored, str | dict):
                logger.info("command %s already succeeded; not running it again", task_id)
                self.request.llmgine_outcome = results.outcome_of(results.from_meta(task_id, meta))
                return stored
        outcome = run_command(registry, task_id, envelope, hooks)
        self.request.llmgine_outcome = results.outcome_of(outcome)  # read by the observer
        return results.to_text(outcome)

    command_task.__doc__ = f"Run the handler of {route.command_type.__name__} commands."
    # No ``queue`` option (deprecated in Celery 6): MessageBus passes the
    # route's queue with each send, and Celery's task_routes apply otherwise.
    # The result is text (``results.to_text``): Celery reprs it (its log line,
    # the task-succeeded event) cut to RESULT_REPR_CHARS.
    return llmgine_task(celery, route.task_name, command_task, resultrepr_maxsize=RESULT_REPR_CHARS)
