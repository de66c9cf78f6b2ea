"""The JSON envelope: encode, decode, validation errors, type registry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum, IntEnum
from typing import Any

import pytest
from pydantic import BaseModel

from llmgine_celery import (
    Command,
    Event,
    MessageError,
    MessageValidationError,
    RegistrationError,
    UnknownMessageTypeError,
)
from llmgine_celery.messages.envelope import TypeRegistry, encode


class Color(str, Enum):  # noqa: UP042 - the (str, Enum) form users write
    RED = "red"
    BLUE = "blue"


class Priority(IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Point:
    x: int
    y: float


class Profile(BaseModel):
    name: str
    age: int
    tags: list[str] = []


@dataclass
class MyCommand(Command):
    param1: str
    param2: int


@dataclass
class RichCommand(Command):
    count: int
    ratio: float
    label: str
    flag: bool
    when: datetime
    color: Color
    priority: Priority
    numbers: list[int]
    weights: dict[str, float]
    point: Point
    profile: Profile
    note: str | None = None
    maybe_point: Point | None = None


@dataclass
class Outer(Command):
    inner: Point


@dataclass
class WithAny(Command):
    payload: Any = None


@dataclass
class MyEvent(Event):
    name: str
    at: datetime


@dataclass
class VersionedCommand(Command):
    schema_version = 2
    value: int


def over_the_wire(envelope: Any) -> Any:
    return json.loads(json.dumps(envelope))


def registry_with(*classes: type) -> TypeRegistry:
    registry = TypeRegistry()
    for cls in classes:
        registry.register(cls)
    return registry


def rich_command(**overrides: Any) -> RichCommand:
    values: dict[str, Any] = {
        "count": 7,
        "ratio": 0.25,
        "label": "hello",
        "flag": True,
        "when": datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))),
        "color": Color.BLUE,
        "priority": Priority.HIGH,
        "numbers": [1, 2, 3],
        "weights": {"a": 1.5, "b": 2.0},
        "point": Point(1, 2.5),
        "profile": Profile(name="ann", age=30, tags=["x"]),
        "session_id": "session-1",
        "metadata": {"trace": {"depth": 1}, "who": "me"},
    }
    values.update(overrides)
    return RichCommand(**values)


# --- shape and round trip ---------------------------------------------------


def test_envelope_shape_is_exactly_type_v_data() -> None:
    envelope = encode(MyCommand("a", 1))
    assert set(envelope) == {"type", "v", "data"}
    assert envelope["type"] == "MyCommand"
    assert envelope["v"] == 1
    assert envelope["data"]["param1"] == "a"
    assert envelope["data"]["param2"] == 1


def test_envelope_is_plain_json() -> None:
    envelope = encode(rich_command())
    assert over_the_wire(envelope) == envelope


def test_envelope_carries_schema_version_of_the_class() -> None:
    assert encode(VersionedCommand(value=1))["v"] == 2


def test_round_trip_equals_the_original_command() -> None:
    original = rich_command()
    decoded = registry_with(RichCommand).decode(over_the_wire(encode(original)))
    assert decoded == original
    assert decoded is not original


def test_round_trip_keeps_scalar_types() -> None:
    decoded = registry_with(RichCommand).decode(over_the_wire(encode(rich_command())))
    assert type(decoded) is RichCommand
    assert type(decoded.count) is int and decoded.count == 7
    assert type(decoded.ratio) is float and decoded.ratio == 0.25
    assert type(decoded.label) is str and decoded.label == "hello"
    assert decoded.flag is True


def test_round_trip_keeps_aware_datetime() -> None:
    original = rich_command()
    decoded = registry_with(RichCommand).decode(over_the_wire(encode(original)))
    assert isinstance(decoded.when, datetime)
    assert decoded.when.utcoffset() == timedelta(hours=2)
    assert decoded.when == original.when
    assert decoded.when.microsecond == 123456


def test_round_trip_keeps_str_enum_and_int_enum() -> None:
    decoded = registry_with(RichCommand).decode(over_the_wire(encode(rich_command())))
    assert decoded.color is Color.BLUE
    assert decoded.priority is Priority.HIGH


def test_round_trip_keeps_containers() -> None:
    original = rich_command(weights={"a": 1.5, "b": 2})
    decoded = registry_with(RichCommand).decode(over_the_wire(encode(original)))
    assert decoded.numbers == [1, 2, 3]
    assert all(type(n) is int for n in decoded.numbers)
    assert decoded.weights == {"a": 1.5, "b": 2.0}
    assert all(type(w) is float for w in decoded.weights.values())


def test_round_trip_keeps_nested_dataclass_and_pydantic_model() -> None:
    decoded = registry_with(RichCommand).decode(over_the_wire(encode(rich_command())))
    assert type(decoded.point) is Point
    assert decoded.point == Point(1, 2.5)
    assert type(decoded.profile) is Profile
    assert decoded.profile == Profile(name="ann", age=30, tags=["x"])


def test_round_trip_keeps_optional_fields_none_and_set() -> None:
    registry = registry_with(RichCommand)
    unset = registry.decode(over_the_wire(encode(rich_command())))
    assert unset.note is None
    assert unset.maybe_point is None
    filled = registry.decode(
        over_the_wire(encode(rich_command(note="n", maybe_point=Point(3, 4.0))))
    )
    assert filled.note == "n"
    assert filled.maybe_point == Point(3, 4.0)


def test_round_trip_keeps_base_fields() -> None:
    original = rich_command()
    decoded = registry_with(RichCommand).decode(over_the_wire(encode(original)))
    assert decoded.id == original.id
    assert decoded.timestamp == original.timestamp
    assert decoded.metadata == {"trace": {"depth": 1}, "who": "me"}
    assert decoded.session_id == "session-1"


def test_event_round_trip() -> None:
    original = MyEvent(name="done", at=datetime(2024, 1, 1, tzinfo=UTC), session_id="s")
    envelope = encode(original)
    assert envelope["type"] == "MyEvent"
    decoded = registry_with(MyEvent).decode(over_the_wire(envelope))
    assert decoded == original
    assert decoded.at.tzinfo is not None


# --- validation on encode -----------------------------------------------------


def test_encode_rejects_str_for_int_naming_type_and_field() -> None:
    cmd = MyCommand("a", "not-an-int")  # type: ignore[arg-type]
    with pytest.raises(MessageValidationError) as info:
        encode(cmd)
    assert "MyCommand" in str(info.value)
    assert "param2" in str(info.value)
    assert "param1" not in str(info.value)
    assert info.value.raw is cmd


def test_encode_rejects_float_with_fraction_for_int() -> None:
    with pytest.raises(MessageValidationError, match="param2"):
        encode(MyCommand("a", 1.5))  # type: ignore[arg-type]


def test_encode_rejects_int_for_str() -> None:
    with pytest.raises(MessageValidationError, match="param1"):
        encode(MyCommand(5, 1))  # type: ignore[arg-type]


def test_encode_names_dotted_path_of_nested_field() -> None:
    with pytest.raises(MessageValidationError) as info:
        encode(Outer(inner=Point("nope", 1.0)))  # type: ignore[arg-type]
    assert "Outer" in str(info.value)
    assert "inner.x" in str(info.value)


def test_encode_names_nested_pydantic_field() -> None:
    profile = Profile.model_construct(name="ann", age="old", tags=[])
    with pytest.raises(MessageValidationError, match=r"profile\.age"):
        encode(rich_command(profile=profile))


def test_encode_rejects_value_that_is_not_json_encodable() -> None:
    cmd = WithAny(payload=object())
    with pytest.raises(MessageValidationError) as info:
        encode(cmd)
    assert "WithAny" in str(info.value)
    assert info.value.raw is cmd


def test_encode_rejects_metadata_that_is_not_json_encodable() -> None:
    with pytest.raises(MessageValidationError):
        encode(MyCommand("a", 1, metadata={"bad": object()}))


def test_message_validation_error_is_a_message_error_and_value_error() -> None:
    with pytest.raises(MessageError):
        encode(MyCommand("a", "x"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode(MyCommand("a", "x"))  # type: ignore[arg-type]


# --- validation on decode -----------------------------------------------------


def test_decode_missing_required_field_names_it() -> None:
    envelope = over_the_wire(encode(MyCommand("a", 1)))
    del envelope["data"]["param2"]
    with pytest.raises(MessageValidationError) as info:
        registry_with(MyCommand).decode(envelope)
    assert "param2" in str(info.value)
    assert "MyCommand" in str(info.value)
    assert info.value.raw == envelope["data"]


def test_decode_wrong_field_type_names_it() -> None:
    envelope = over_the_wire(encode(MyCommand("a", 1)))
    envelope["data"]["param2"] = "seven"
    with pytest.raises(MessageValidationError, match="param2"):
        registry_with(MyCommand).decode(envelope)


def test_decode_unknown_type() -> None:
    envelope = {"type": "NoSuchCommand", "v": 1, "data": {}}
    with pytest.raises(UnknownMessageTypeError) as info:
        registry_with(MyCommand).decode(envelope)
    assert "NoSuchCommand" in str(info.value)


@pytest.mark.parametrize(
    "not_an_envelope",
    [[1, 2], "MyCommand", {"v": 1, "data": {}}, {"type": 5, "data": {}}, None, 42],
    ids=["list", "string", "no-type", "type-not-str", "none", "int"],
)
def test_decode_non_envelope_raises_message_error(not_an_envelope: Any) -> None:
    with pytest.raises(MessageError) as info:
        registry_with(MyCommand).decode(not_an_envelope)
    assert info.value.raw == not_an_envelope


def test_decode_schema_version_mismatch() -> None:
    envelope = over_the_wire(encode(MyCommand("a", 1)))
    envelope["v"] = 2
    with pytest.raises(MessageError, match="schema version") as info:
        registry_with(MyCommand).decode(envelope)
    assert not isinstance(info.value, MessageValidationError)
    assert info.value.raw == envelope


def test_decode_newer_schema_version_matches_class() -> None:
    envelope = over_the_wire(encode(VersionedCommand(value=4)))
    assert registry_with(VersionedCommand).decode(envelope).value == 4
    envelope["v"] = 1
    with pytest.raises(MessageError):
        registry_with(VersionedCommand).decode(envelope)


# --- type registry -------------------------------------------------------------


def make_class_named(name: str) -> type:
    return dataclass(type(name, (Command,), {"__annotations__": {"x": int}}))


def test_registry_rejects_two_classes_with_the_same_name() -> None:
    first, second = make_class_named("Twin"), make_class_named("Twin")
    registry = TypeRegistry()
    registry.register(first)
    with pytest.raises(RegistrationError, match="Twin"):
        registry.register(second)
    assert registry.get("Twin") is first


def test_registry_accepts_the_same_class_twice() -> None:
    registry = TypeRegistry()
    assert registry.register(MyCommand) == "MyCommand"
    assert registry.register(MyCommand) == "MyCommand"
    assert "MyCommand" in registry
    assert registry.get("MyCommand") is MyCommand


def test_registry_get_unknown_name() -> None:
    with pytest.raises(UnknownMessageTypeError):
        TypeRegistry().get("Nope")
