"""HandlerRegistry: one handler per command, grouped event handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from llmgine_celery import Command, DuplicateHandlerError, Event, RegistrationError
from llmgine_celery.bus import topology
from llmgine_celery.bus.registry import HandlerRegistry


@dataclass
class AskCommand(Command):
    question: str


@dataclass
class OtherCommand(Command):
    n: int


@dataclass
class SomethingHappened(Event):
    what: str


@dataclass
class SomethingSpecific(SomethingHappened):
    detail: str = ""


@dataclass
class Unrelated(Event):
    x: int


@dataclass
class NotAMessage:
    x: int


def handle_ask(command: AskCommand) -> str:
    return command.question


def handle_ask_again(command: AskCommand) -> str:
    return command.question * 2


def on_something(event: SomethingHappened) -> None:
    return None


def on_unrelated(event: Unrelated) -> None:
    return None


def make_handler_named(name: str) -> Any:
    def handler(event: Any) -> None:
        return None

    handler.__name__ = name
    return handler


# --- commands ------------------------------------------------------------------


def test_command_route_records_handler_queue_and_task_name() -> None:
    registry = HandlerRegistry("app")
    route = registry.add_command(AskCommand, handle_ask, "fast")
    assert registry.command_route(AskCommand) is route
    assert route.handler is handle_ask
    assert route.queue == "fast"
    assert route.task_name == topology.COMMAND_TASK_PREFIX + "AskCommand"
    assert "AskCommand" in registry.types


def test_unknown_command_type_has_no_route() -> None:
    assert HandlerRegistry("app").command_route(AskCommand) is None


def test_second_command_handler_raises_duplicate_naming_the_type() -> None:
    registry = HandlerRegistry("app")
    registry.add_command(AskCommand, handle_ask, None)
    with pytest.raises(DuplicateHandlerError) as info:
        registry.add_command(AskCommand, handle_ask_again, None)
    assert "AskCommand" in str(info.value)
    assert "handle_ask" in str(info.value)
    assert registry.command_route(AskCommand).handler is handle_ask  # type: ignore[union-attr]


def test_duplicate_handler_error_is_a_registration_error() -> None:
    assert issubclass(DuplicateHandlerError, RegistrationError)


def test_second_command_handler_after_a_lambda_raises_duplicate() -> None:
    registry = HandlerRegistry("app")
    registry.add_command(AskCommand, lambda command: "first", None)
    with pytest.raises(DuplicateHandlerError, match="AskCommand"):
        registry.add_command(AskCommand, handle_ask_again, None)


@pytest.mark.parametrize("not_a_command", [SomethingHappened, NotAMessage, str, "AskCommand"])
def test_command_handler_for_non_command_type_is_rejected(not_a_command: Any) -> None:
    with pytest.raises(RegistrationError, match="not a Command"):
        HandlerRegistry("app").add_command(not_a_command, handle_ask, None)


def test_command_handler_must_be_callable() -> None:
    with pytest.raises(RegistrationError, match="not callable"):
        HandlerRegistry("app").add_command(AskCommand, "handle_ask", None)  # type: ignore[arg-type]


def test_command_types_with_the_same_name_are_rejected() -> None:
    first = AskCommand
    second: type[Command] = dataclass(
        type("AskCommand", (Command,), {"__annotations__": {"q": str}})
    )
    registry = HandlerRegistry("app")
    registry.add_command(first, handle_ask, None)
    with pytest.raises(RegistrationError, match="AskCommand"):
        registry.add_command(second, handle_ask_again, None)


# --- events ----------------------------------------------------------------------


def test_event_handler_defaults_to_the_registry_group() -> None:
    registry = HandlerRegistry("billing")
    route = registry.add_event(SomethingHappened, on_something, None, None)
    assert route.group == "billing"
    assert route.name == "on_something"
    assert route.task_name == topology.handler_task_name("billing", "on_something")
    assert registry.groups == ["billing"]
    assert "SomethingHappened" in registry.types


def test_event_handler_in_an_explicit_group_with_explicit_name() -> None:
    registry = HandlerRegistry("app")
    route = registry.add_event(SomethingHappened, on_something, "audit", "record")
    assert (route.group, route.name) == ("audit", "record")
    assert registry.groups == ["audit"]


def test_event_routes_for_matches_subclasses_within_the_group() -> None:
    registry = HandlerRegistry("app")
    base = registry.add_event(SomethingHappened, on_something, None, None)
    registry.add_event(Unrelated, on_unrelated, None, None)
    registry.add_event(SomethingHappened, on_something, "audit", None)
    assert registry.event_routes_for("app", SomethingSpecific("x", detail="d")) == [base]
    assert registry.event_routes_for("app", SomethingHappened("x")) == [base]


def test_event_routes_for_does_not_match_superclass_or_other_groups() -> None:
    registry = HandlerRegistry("app")
    registry.add_event(SomethingSpecific, make_handler_named("specific"), None, None)
    assert registry.event_routes_for("app", SomethingHappened("x")) == []
    assert registry.event_routes_for("other", SomethingSpecific("x")) == []


def test_same_event_can_have_many_handlers_in_one_group() -> None:
    registry = HandlerRegistry("app")
    registry.add_event(SomethingHappened, make_handler_named("one"), None, None)
    registry.add_event(SomethingHappened, make_handler_named("two"), None, None)
    names = [r.name for r in registry.event_routes_for("app", SomethingHappened("x"))]
    assert names == ["one", "two"]


def test_two_different_functions_with_the_same_name_in_one_group_are_rejected() -> None:
    registry = HandlerRegistry("app")
    registry.add_event(SomethingHappened, make_handler_named("notify"), None, None)
    with pytest.raises(RegistrationError, match="notify"):
        registry.add_event(Unrelated, make_handler_named("notify"), None, None)


def test_same_function_name_in_different_groups_is_fine() -> None:
    registry = HandlerRegistry("app")
    registry.add_event(SomethingHappened, make_handler_named("notify"), "a", None)
    registry.add_event(SomethingHappened, make_handler_named("notify"), "b", None)
    assert registry.groups == ["a", "b"]


def test_same_handler_for_same_event_twice_in_one_group_is_rejected() -> None:
    registry = HandlerRegistry("app")
    registry.add_event(SomethingHappened, on_something, None, None)
    with pytest.raises(RegistrationError):
        registry.add_event(SomethingHappened, on_something, None, None)
    assert len(registry.event_routes) == 1


@pytest.mark.parametrize("not_an_event", [AskCommand, NotAMessage, int])
def test_event_handler_for_non_event_type_is_rejected(not_an_event: Any) -> None:
    with pytest.raises(RegistrationError, match="not an Event"):
        HandlerRegistry("app").add_event(not_an_event, on_something, None, None)


@pytest.mark.parametrize("bad_group", ["my group", "a/b", "-leading", "tab\there", "a:b"])
def test_bad_group_names_are_rejected(bad_group: str) -> None:
    registry = HandlerRegistry("app")
    with pytest.raises(ValueError, match="group"):
        registry.add_event(SomethingHappened, on_something, bad_group, None)


@pytest.mark.parametrize("bad_group", ["my group", "a/b"])
def test_bad_default_group_is_rejected(bad_group: str) -> None:
    with pytest.raises(ValueError, match="group"):
        HandlerRegistry(bad_group)


def test_bad_explicit_handler_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="handler name"):
        HandlerRegistry("app").add_event(SomethingHappened, on_something, None, "a b")


def test_check_name_accepts_safe_names() -> None:
    for name in ["app", "my-group", "group_1", "a.b"]:
        assert topology.check_name("group", name) == name
