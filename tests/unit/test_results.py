"""results.py: handler outcomes and Celery task states as CommandResults."""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmgine_celery import Command, CommandResult
from llmgine_celery.bus import results
from llmgine_celery.messages.envelope import load


@dataclass
class AskCommand(Command):
    question: str


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


# --- from_meta --------------------------------------------------------------------


def test_from_meta_success_with_result_payload() -> None:
    payload = {
        "command_id": "c-1",
        "success": True,
        "result": {"answer": 42},
        "error": None,
        "metadata": {"k": "v"},
    }
    result = results.from_meta("c-1", {"status": "SUCCESS", "result": payload})
    assert isinstance(result, CommandResult)
    assert result == CommandResult(
        command_id="c-1", success=True, result={"answer": 42}, metadata={"k": "v"}
    )


def test_from_meta_success_with_failed_result_payload_stays_failed() -> None:
    payload = json.loads(results.to_text(results.failure("c-1", "bad input")))
    result = results.from_meta("c-1", {"status": "SUCCESS", "result": payload})
    assert result.success is False
    assert result.error == "bad input"


def test_from_meta_reads_a_result_stored_as_text() -> None:
    original = CommandResult(
        command_id="c-1", success=False, result=[1, 2.5], error="no", metadata={"k": "v"}
    )
    stored = {"status": "SUCCESS", "result": results.to_text(original)}
    assert results.from_meta("c-1", stored) == original


def test_from_meta_keeps_any_other_string_as_a_plain_value() -> None:
    for text in ("hello", '{"a": 1}', "[1, 2]", "{not json"):
        result = results.from_meta("c-1", {"status": "SUCCESS", "result": text})
        assert result == CommandResult(command_id="c-1", success=True, result=text)


def test_from_meta_success_with_plain_value_wraps_it() -> None:
    result = results.from_meta("c-1", {"status": "SUCCESS", "result": [1, 2]})
    assert result == CommandResult(command_id="c-1", success=True, result=[1, 2])


def test_from_meta_not_registered_names_the_command_type() -> None:
    meta = {
        "status": "FAILURE",
        "result": {"exc_type": "NotRegistered", "exc_message": "'llmgine.command.Foo'"},
    }
    result = results.from_meta("c-1", meta)
    assert result.success is False
    assert result.command_id == "c-1"
    assert "no handler registered for command type Foo " in (result.error or "")
    assert result.metadata["reason"] == "no_handler"


def test_from_meta_not_registered_with_message_as_args_list() -> None:
    meta = {
        "status": "FAILURE",
        "result": {"exc_type": "NotRegistered", "exc_message": ["'llmgine.command.Foo'"]},
    }
    result = results.from_meta("c-1", meta)
    assert result.success is False
    assert "no handler registered for command type Foo " in (result.error or "")


def test_from_meta_failure_keeps_exception_type_message_and_traceback() -> None:
    meta = {
        "status": "FAILURE",
        "result": {"exc_type": "KeyError", "exc_message": ["missing"]},
        "traceback": "Traceback ...",
    }
    result = results.from_meta("c-1", meta)
    assert result.success is False
    assert result.error == "KeyError: missing"
    assert result.metadata["traceback"] == "Traceback ..."
    assert result.metadata["reason"] == "task_failed"


def test_from_meta_revoked_is_a_failure() -> None:
    result = results.from_meta("c-1", {"status": "REVOKED", "result": None})
    assert result.success is False
    assert "revoked" in (result.error or "")


# --- from_exception / from_outcome --------------------------------------------------


def test_from_exception_names_type_and_message_and_keeps_traceback() -> None:
    result = results.from_exception("c-1", raised(ValueError("boom")))
    assert result.command_id == "c-1"
    assert result.success is False
    assert result.error == "ValueError: boom"
    assert "ValueError" in result.metadata["traceback"]
    assert "raised" in result.metadata["traceback"]
    assert result.metadata["exception_type"] == "builtins.ValueError"


def test_from_exception_result_is_sendable_as_json() -> None:
    text = results.to_text(results.from_exception("c-1", raised(ValueError("boom"))))
    assert json.loads(text)["error"] == "ValueError: boom"


def test_from_outcome_plain_value_is_success() -> None:
    cmd = AskCommand("q")
    result = results.from_outcome(cmd, {"answer": 1})
    assert result == CommandResult(command_id=cmd.id, success=True, result={"answer": 1})


def test_from_outcome_none_is_success() -> None:
    cmd = AskCommand("q")
    result = results.from_outcome(cmd, None)
    assert result.success is True
    assert result.result is None
    assert result.command_id == cmd.id


def test_from_outcome_command_result_gets_the_command_id() -> None:
    cmd = AskCommand("q")
    returned = CommandResult(command_id="someone-else", success=False, error="no", result=3)
    result = results.from_outcome(cmd, returned)
    assert result.command_id == cmd.id
    assert (result.success, result.error, result.result) == (False, "no", 3)


# --- to_text -------------------------------------------------------------------------


def test_to_text_round_trips_through_json() -> None:
    original = CommandResult(command_id="c-1", success=True, result={"a": [1, 2.5, "x"]})
    assert load(CommandResult, json.loads(results.to_text(original))) == original


def test_to_text_of_unencodable_result_becomes_a_failure() -> None:
    wire = json.loads(
        results.to_text(CommandResult(command_id="c-1", success=True, result=object()))
    )
    assert wire["command_id"] == "c-1"
    assert wire["success"] is False
    assert "cannot be sent as JSON" in wire["error"]
    assert wire["result"] is None


def test_outcome_of_gives_the_observer_success_error_and_reason() -> None:
    assert results.outcome_of(results.no_handler("c-1", "Foo")) == {
        "success": False,
        "error": "no handler registered for command type Foo (task llmgine.command.Foo)",
        "metadata": {"reason": "no_handler"},
    }
    done = results.outcome_of(CommandResult(command_id="c-1", success=True, result=1))
    assert done == {"success": True, "error": None, "metadata": {"reason": None}}


def test_timed_out_names_timeout_and_command() -> None:
    result = results.timed_out("c-1", "AskCommand", 2.5)
    assert result.success is False
    assert "2.5s" in (result.error or "")
    assert "AskCommand" in (result.error or "")
    assert result.metadata == {"reason": "timeout", "timeout": 2.5}
