"""One thin Celery task per command type: decode, call the handler, map errors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from llmgine_celery.bus import results
from llmgine_celery.bus.registry import CommandRoute, HandlerRegistry
from llmgine_celery.bus.result_backend import first_delivery
from llmgine_celery.bus.runtime import call_handler
from llmgine_celery.errors import MessageError

if TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)


def run_command(registry: HandlerRegistry, task_id: str, envelope: Any) -> dict[str, Any]:
    """Run the handler of the command in ``envelope``; always return a result."""
    try:
        command = registry.types.decode(envelope)
    except MessageError as exc:
        logger.warning("command %s rejected: %s", task_id, exc)
        return results.to_wire(results.failure(task_id, str(exc), reason="invalid_message"))
    route = registry.command_route(type(command))
    if route is None:
        return results.to_wire(results.no_handler(command.id, type(command).__name__))
    try:
        outcome = call_handler(route.handler, command)
    except Exception as exc:  # a handler failure is a result, not a task failure
        logger.info("handler of %s %s raised %r", type(command).__name__, command.id, exc)
        return results.to_wire(results.from_exception(command.id, exc))
    return results.to_wire(results.from_outcome(command, outcome))


def register_command_task(celery: Celery, registry: HandlerRegistry, route: CommandRoute) -> Task:
    """Create (once) the Celery task serving ``route``'s command type."""
    if route.task_name in celery.tasks:
        return celery.tasks[route.task_name]

    def command_task(self: Task, envelope: Any) -> dict[str, Any]:
        task_id = self.request.id or ""
        if not first_delivery(self.request):
            # A copy of a command that may have run: a stored success stands.
            meta = self.backend.get_task_meta(task_id)
            if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict):
                logger.info("command %s already succeeded; not running it again", task_id)
                stored: dict[str, Any] = meta["result"]
                return stored
        return run_command(registry, task_id, envelope)

    command_task.__doc__ = f"Run the handler of {route.command_type.__name__} commands."
    # No ``queue`` option (deprecated in Celery 6): MessageBus passes the
    # route's queue with each send, and Celery's task_routes apply otherwise.
    task: Task = celery.task(name=route.task_name, bind=True, shared=False)(command_task)
    return task
