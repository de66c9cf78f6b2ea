"""Commands: intentions with exactly one handler, and their results."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar


def new_id() -> str:
    """A fresh message id."""
    return str(uuid.uuid4())


def utc_now_iso() -> str:
    """The current time as an ISO 8601 string in UTC."""
    return datetime.now(UTC).isoformat()


@dataclass(kw_only=True)
class Command:
    """Base class of all commands.

    The base is keyword-only, so ``@dataclass`` subclasses may declare fields
    without defaults, exactly as in the LLMgine seed.
    """

    #: bump when a command's fields change incompatibly; travels in the envelope
    schema_version: ClassVar[int] = 1

    id: str = field(default_factory=new_id)
    timestamp: str = field(default_factory=utc_now_iso)
    metadata: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None


@dataclass
class CommandResult:
    """Result of executing one command."""

    schema_version: ClassVar[int] = 1

    command_id: str
    success: bool
    result: Any = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
