"""Which handler serves which message type, per application."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmgine_celery.bus import topology
from llmgine_celery.errors import DuplicateHandlerError, RegistrationError
from llmgine_celery.messages.commands import Command
from llmgine_celery.messages.envelope import TypeRegistry, type_name
from llmgine_celery.messages.events import Event

Handler = Callable[[Any], Any]


@dataclass(frozen=True)
class CommandRoute:
    """The one handler of a command type, and the queue its task goes to."""

    command_type: type[Command]
    handler: Handler
    queue: str | None = None

    @property
    def task_name(self) -> str:
        return topology.command_task_name(type_name(self.command_type))


@dataclass(frozen=True)
class RetryPolicy:
    """How an event handler is retried: exponential backoff with full jitter."""

    #: retries after the first attempt; then the event is dead-lettered
    max_retries: int = 3
    #: seconds before the first retry; doubled for each later one
    backoff: float = 0.5
    #: ceiling of one delay, in seconds
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.backoff_max < 0:
            raise RegistrationError(f"{self} has a negative value")

    def delay(self, retries: int, rand: Callable[[], float]) -> float:
        """Seconds before retry number ``retries + 1``: uniform in [0, capped backoff]."""
        ceiling: float = min(self.backoff_max, self.backoff * 2.0**retries)
        return rand() * ceiling


@dataclass(frozen=True)
class EventRoute:
    """One event handler in one subscriber group."""

    event_type: type[Event]
    handler: Handler
    group: str
    name: str
    retry: RetryPolicy = RetryPolicy()

    @property
    def task_name(self) -> str:
        return topology.handler_task_name(self.group, self.name)


def handler_name(handler: Handler) -> str:
    """A readable, wire-safe name of a handler function or bound method."""
    name = getattr(handler, "__name__", type(handler).__name__)
    return topology.check_name("handler name", name)


class HandlerRegistry:
    """Commands (one handler each) and events (any number, grouped) of one app."""

    def __init__(self, default_group: str) -> None:
        self.default_group = topology.check_name("group", default_group)
        self.types = TypeRegistry()
        self._commands: dict[type, CommandRoute] = {}
        self._events: list[EventRoute] = []

    def add_command(
        self, command_type: type[Command], handler: Handler, queue: str | None
    ) -> CommandRoute:
        """Register the handler of ``command_type``; a second one is an error."""
        if not (isinstance(command_type, type) and issubclass(command_type, Command)):
            raise RegistrationError(f"{command_type!r} is not a Command subclass")
        if not callable(handler):
            raise RegistrationError(f"handler for {command_type.__name__} is not callable")
        known = self._commands.get(command_type)
        if known is not None:
            raise DuplicateHandlerError(
                f"command type {type_name(command_type)} already has a handler "
                f"({getattr(known.handler, '__qualname__', repr(known.handler))}); "
                "a command has exactly one"
            )
        self.types.register(command_type)
        route = CommandRoute(command_type, handler, queue)
        self._commands[command_type] = route
        return route

    def add_event(
        self,
        event_type: type[Event],
        handler: Handler,
        group: str | None,
        name: str | None,
        retry: RetryPolicy | None = None,
    ) -> EventRoute:
        """Subscribe ``handler`` to ``event_type`` in ``group`` (default: the app's)."""
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise RegistrationError(f"{event_type!r} is not an Event subclass")
        if not callable(handler):
            raise RegistrationError(f"handler for {event_type.__name__} is not callable")
        route = EventRoute(
            event_type,
            handler,
            topology.check_name("group", group or self.default_group),
            topology.check_name("handler name", name) if name else handler_name(handler),
            retry or RetryPolicy(),
        )
        for known in self._events:
            same_slot = (known.group, known.name) == (route.group, route.name)
            if same_slot and (known.handler != handler or known.retry != route.retry):
                raise RegistrationError(
                    f"two different handlers (or retry policies) are named {route.name!r} "
                    f"in group {route.group!r}; pass name=... to register_event_handler"
                )
            if same_slot and known.event_type is event_type:
                raise RegistrationError(
                    f"{route.name} already handles {type_name(event_type)} in group {route.group}"
                )
        self.types.register(event_type)
        self._events.append(route)
        return route

    def command_route(self, command_type: type) -> CommandRoute | None:
        """The route of ``command_type``, if this application handles it."""
        return self._commands.get(command_type)

    @property
    def command_routes(self) -> list[CommandRoute]:
        return list(self._commands.values())

    @property
    def event_routes(self) -> list[EventRoute]:
        return list(self._events)

    @property
    def groups(self) -> list[str]:
        """Subscriber groups with at least one handler, in registration order."""
        return list(dict.fromkeys(route.group for route in self._events))

    def event_routes_for(self, group: str, event: Event) -> list[EventRoute]:
        """Handlers in ``group`` for ``event``'s type (subclasses included)."""
        return [r for r in self._events if r.group == group and isinstance(event, r.event_type)]
