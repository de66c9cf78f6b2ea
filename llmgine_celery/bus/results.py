"""Turning handler outcomes and Celery task states into ``CommandResult``s.

A worker stores a command's result as the JSON text of its ``CommandResult``
(``to_text``): Celery's result is then a string, which Celery reprs for its log
line and Flower's task-succeeded event in a few microseconds, where walking a
result dict (``saferepr``) cost a threads-pool worker about 5% of its CPU per
command. ``from_meta`` reads that text, and results stored as JSON objects too.
"""

from __future__ import annotations

import traceback
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from llmgine_celery.bus import topology
from llmgine_celery.messages.commands import Command, CommandResult
from llmgine_celery.messages.envelope import adapter_for, load

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def failure(command_id: str, error: str, **metadata: Any) -> CommandResult:
    """A failed result with a message a person can act on."""
    return CommandResult(command_id=command_id, success=False, error=error, metadata=metadata)


def from_exception(command_id: str, exc: BaseException) -> CommandResult:
    """The failed result of a handler that raised ``exc``."""
    return failure(
        command_id,
        f"{type(exc).__name__}: {exc}",
        exception_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        traceback="".join(traceback.format_exception(exc)),
    )


def from_outcome(command: Command, outcome: Any) -> CommandResult:
    """What a handler returned, as a result that belongs to ``command``.

    A plain value becomes a successful result; a ``CommandResult`` keeps its
    fields but always carries the id of the command it answers.
    """
    if isinstance(outcome, CommandResult):
        outcome.command_id = command.id
        return outcome
    return CommandResult(command_id=command.id, success=True, result=outcome)


def to_text(result: CommandResult) -> str:
    """The JSON text a worker stores; an unencodable result becomes a failure."""
    adapter = adapter_for(CommandResult)
    try:
        return adapter.dump_json(result).decode()
    except PydanticSerializationError as exc:
        failed = failure(result.command_id, f"handler result cannot be sent as JSON: {exc}")
        return adapter.dump_json(failed).decode()


def outcome_of(result: CommandResult) -> dict[str, Any]:
    """What the task observer needs of a result: success, error and the failure's reason."""
    reason = result.metadata.get("reason") if not result.success else None
    return {"success": result.success, "error": result.error, "metadata": {"reason": reason}}


def from_text(command_id: str, text: str) -> CommandResult:
    """The result a worker stored as text; any other string is a plain successful value."""
    try:
        return adapter_for(CommandResult).validate_json(text)
    except ValidationError:
        return CommandResult(command_id=command_id, success=True, result=text)


def no_handler(command_id: str, command_type: str) -> CommandResult:
    """The failed result of a command type that no handler serves."""
    return failure(
        command_id,
        f"no handler registered for command type {command_type} "
        f"(task {topology.command_task_name(command_type)})",
        reason="no_handler",
    )


def timed_out(command_id: str, command_type: str, timeout: float) -> CommandResult:
    """The failed result of a wait that expired; the command itself goes on."""
    return failure(
        command_id,
        f"timed out after {timeout:g}s waiting for {command_type} {command_id}; the command "
        "stays queued or running: fetch its result later with fetch_result(command_id)",
        reason="timeout",
        timeout=timeout,
    )


def from_meta(command_id: str, meta: dict[str, Any]) -> CommandResult:
    """The result a Celery task state (as stored in the backend) stands for."""
    status = meta.get("status")
    payload = meta.get("result")
    if status == "SUCCESS":
        if isinstance(payload, str):
            return from_text(command_id, payload)
        if isinstance(payload, dict) and "success" in payload:
            return load(CommandResult, payload)
        return CommandResult(command_id=command_id, success=True, result=payload)
    if status == "REVOKED":
        return failure(command_id, "command was revoked before it ran", reason="revoked")
    exc_type, exc_message = _exception_parts(payload)
    if exc_type == "NotRegistered":
        task_name = exc_message.strip("'\"")
        return no_handler(command_id, task_name.removeprefix(topology.COMMAND_TASK_PREFIX))
    return failure(
        command_id,
        f"{exc_type}: {exc_message}",
        reason="task_failed",
        traceback=meta.get("traceback"),
    )


def _exception_parts(payload: Any) -> tuple[str, str]:
    if isinstance(payload, dict):
        message = payload.get("exc_message", "")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
        return str(payload.get("exc_type", "Exception")), str(message)
    if isinstance(payload, BaseException):
        return type(payload).__name__, str(payload)
    return "Exception", str(payload)
