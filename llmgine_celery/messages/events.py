"""Events: facts that happened, with zero or more handlers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmgine_celery.messages.commands import new_id, utc_now_iso


@dataclass(kw_only=True)
class Event:
    """Base class of all events (keyword-only base, like ``Command``)."""

    schema_version: ClassVar[int] = 1

    id: str = field(default_factory=new_id)
    timestamp: str = field(default_factory=utc_now_iso)
    metadata: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
