"""Commands, events and results keep the LLMgine seed's dataclass syntax."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

import pytest

from llmgine_celery import Command, CommandResult, Event


@dataclass
class MyCommand(Command):
    param1: str
    param2: int


@dataclass
class MyEvent(Event):
    name: str
    count: int


def test_command_fields_without_defaults_construct_positionally() -> None:
    cmd = MyCommand("hello", 3)
    assert (cmd.param1, cmd.param2) == ("hello", 3)


def test_command_fields_without_defaults_construct_by_keyword() -> None:
    cmd = MyCommand(param2=3, param1="hello")
    assert (cmd.param1, cmd.param2) == ("hello", 3)


def test_command_requires_its_own_fields() -> None:
    with pytest.raises(TypeError):
        MyCommand("only-one")  # type: ignore[call-arg]


def test_command_base_fields_have_defaults() -> None:
    cmd = MyCommand("a", 1)
    uuid.UUID(cmd.id)
    assert cmd.metadata == {}
    assert cmd.session_id is None


def test_command_timestamp_is_iso_utc_string_of_now() -> None:
    before = datetime.now(UTC)
    cmd = MyCommand("a", 1)
    after = datetime.now(UTC)
    assert isinstance(cmd.timestamp, str)
    parsed = datetime.fromisoformat(cmd.timestamp)
    assert parsed.utcoffset() == timedelta(0)
    assert before <= parsed <= after


def test_command_ids_are_unique_per_instance() -> None:
    ids = {MyCommand("a", 1).id for _ in range(100)}
    assert len(ids) == 100


def test_command_metadata_is_a_fresh_dict_per_instance() -> None:
    first, second = MyCommand("a", 1), MyCommand("a", 1)
    first.metadata["k"] = "v"
    assert second.metadata == {}
    assert first.metadata is not second.metadata


def test_command_base_fields_can_be_set_by_keyword() -> None:
    cmd = MyCommand("a", 1, id="cmd-1", session_id="s-1", metadata={"k": "v"})
    assert (cmd.id, cmd.session_id, cmd.metadata) == ("cmd-1", "s-1", {"k": "v"})


def test_command_subclass_fields_come_after_base_fields() -> None:
    names = [f.name for f in fields(MyCommand)]
    assert names == ["id", "timestamp", "metadata", "session_id", "param1", "param2"]


def test_event_fields_without_defaults_construct_positionally_and_by_keyword() -> None:
    assert (MyEvent("x", 2).name, MyEvent("x", 2).count) == ("x", 2)
    evt = MyEvent(count=2, name="x")
    assert (evt.name, evt.count) == ("x", 2)


def test_event_base_fields_have_defaults() -> None:
    evt = MyEvent("x", 2)
    uuid.UUID(evt.id)
    assert datetime.fromisoformat(evt.timestamp).utcoffset() == timedelta(0)
    assert evt.metadata == {}
    assert evt.session_id is None


def test_event_ids_and_metadata_are_per_instance() -> None:
    first, second = MyEvent("x", 1), MyEvent("x", 1)
    assert first.id != second.id
    first.metadata["k"] = 1
    assert second.metadata == {}


def test_command_result_as_in_the_seed() -> None:
    result = CommandResult(command_id="c-1", success=True, result={"answer": 42})
    assert result.command_id == "c-1"
    assert result.success is True
    assert result.result == {"answer": 42}
    assert result.error is None
    assert result.metadata == {}


def test_command_result_metadata_is_fresh_per_instance() -> None:
    first = CommandResult(command_id="c-1", success=True)
    second = CommandResult(command_id="c-2", success=False, error="nope")
    first.metadata["k"] = "v"
    assert second.metadata == {}
    assert second.error == "nope"
