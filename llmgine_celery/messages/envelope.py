"""One way to put messages on the wire: a JSON envelope and a type registry.

An envelope is ``{"type": <registered name>, "v": <schema version>,
"data": <JSON-mode fields>}``. pydantic validates every message when it is
encoded (so a wrong payload fails before anything is sent) and again when it
is decoded in another process (one cached ``TypeAdapter`` per type).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from llmgine_celery.errors import (
    MessageError,
    MessageValidationError,
    RegistrationError,
    UnknownMessageTypeError,
)

T = TypeVar("T")

Envelope = dict[str, Any]


_adapters: dict[type, TypeAdapter[Any]] = {}


def adapter_for(cls: type[T]) -> TypeAdapter[T]:
    """The pydantic adapter of a message type (built once per type)."""
    adapter = _adapters.get(cls)
    if adapter is None:
        adapter = _adapters[cls] = TypeAdapter(cls)
    return adapter


def type_name(cls: type) -> str:
    """The name a message type has on the wire and in task names."""
    return cls.__name__


def describe_validation_error(cls: type, exc: ValidationError) -> str:
    """One line naming every field that failed, and why."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors()
    )
    return f"invalid {type_name(cls)}: {problems}"


def dump(obj: Any) -> dict[str, Any]:
    """Validate ``obj`` against its own type and return its JSON-mode fields."""
    cls = type(obj)
    adapter = adapter_for(cls)
    try:
        data = adapter.dump_python(obj, mode="json", warnings=False)
        adapter.validate_python(data)
    except ValidationError as exc:
        raise MessageValidationError(describe_validation_error(cls, exc), raw=obj) from exc
    except PydanticSerializationError as exc:
        raise MessageValidationError(
            f"{type_name(cls)} cannot be encoded as JSON: {exc}", raw=obj
        ) from exc
    if not isinstance(data, dict):
        raise MessageError(f"{type_name(cls)} did not encode to a JSON object", raw=obj)
    return data


def load(cls: type[T], data: Any) -> T:
    """Build a ``cls`` from JSON-mode fields, naming any field that is wrong."""
    try:
        return adapter_for(cls).validate_python(data)
    except ValidationError as exc:
        raise MessageValidationError(describe_validation_error(cls, exc), raw=data) from exc


def encode(obj: Any) -> Envelope:
    """The envelope of a message instance."""
    cls = type(obj)
    return {"type": type_name(cls), "v": getattr(cls, "schema_version", 1), "data": dump(obj)}


class TypeRegistry:
    """The message types one application can decode, by wire name."""

    def __init__(self) -> None:
        self._types: dict[str, type] = {}

    def register(self, cls: type) -> str:
        """Register ``cls`` and return its wire name; two types may not share one."""
        name = type_name(cls)
        known = self._types.get(name)
        if known is not None and known is not cls:
            raise RegistrationError(
                f"two message types share the wire name {name!r}: "
                f"{known.__module__}.{known.__qualname__} and {cls.__module__}.{cls.__qualname__}"
            )
        self._types[name] = cls
        return name

    def get(self, name: str) -> type:
        """The type registered under ``name``."""
        try:
            return self._types[name]
        except KeyError:
            raise UnknownMessageTypeError(f"unknown message type {name!r}", raw=name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def decode(self, envelope: Any) -> Any:
        """The message an envelope carries, validated against its registered type."""
        if not isinstance(envelope, Mapping) or not isinstance(envelope.get("type"), str):
            raise MessageError("not a message envelope (expected {type, v, data})", raw=envelope)
        cls = self.get(envelope["type"])
        version = envelope.get("v", 1)
        expected = getattr(cls, "schema_version", 1)
        if version != expected:
            raise MessageError(
                f"{envelope['type']} has schema version {version!r}; this process knows {expected}",
                raw=envelope,
            )
        return load(cls, envelope.get("data"))


def known_event_type(name: str) -> bool:
    """True when some ``Event`` subclass imported in this process has that wire name."""
    from llmgine_celery.messages.events import Event

    pending: list[type] = [Event]
    while pending:
        cls = pending.pop()
        if type_name(cls) == name:
            return True
        pending.extend(cls.__subclasses__())
    return False
