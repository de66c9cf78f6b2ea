"""Correlation: which trace, span and message the running code belongs to.

A command or event handler runs inside a :class:`Correlation` (set by the
worker's signal receivers from the message headers); anything it sends carries
the same ``trace_id``, its span as the parent, and the id of the message being
handled as ``causation_id``. Outside any handler, a send starts a new trace.
Context variables follow ``await`` and ``asyncio`` tasks; ``runtime`` copies
them to the loop that runs async handlers. Message headers carrying these ids
are the bus's business (``bus.correlation``): this module knows no wire names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

from llmgine_celery.observability.process import random_hex


def new_trace_id() -> str:
    """A fresh trace id: 32 hex digits, as W3C trace context and Sentry use."""
    return random_hex(128)


def new_span_id() -> str:
    """A fresh span id: 16 hex digits."""
    return random_hex(64)


@dataclass(frozen=True)
class Correlation:
    """The ids records made here share, and messages sent from here carry."""

    trace_id: str
    span_id: str
    #: the span that sent the message being handled
    parent_span_id: str | None = None
    #: the command or event being handled (the cause of what is sent from here)
    causation_id: str | None = None

    def child(self, causation_id: str | None = None) -> Correlation:
        """A new span of the same trace, under this one."""
        return replace(
            self,
            span_id=new_span_id(),
            parent_span_id=self.span_id,
            causation_id=causation_id or self.causation_id,
        )


_current: ContextVar[Correlation | None] = ContextVar("llmgine_correlation", default=None)


def current() -> Correlation | None:
    """The correlation of the running code, if it handles a message or is in a span."""
    return _current.get()


@contextlib.contextmanager
def correlated(correlation: Correlation) -> Iterator[Correlation]:
    """Run the block inside ``correlation``."""
    token = _current.set(correlation)
    try:
        yield correlation
    finally:
        _current.reset(token)


def activate(correlation: Correlation | None) -> Any:
    """Set ``correlation`` until :func:`deactivate` (for signal pairs like prerun/postrun)."""
    return _current.set(correlation)


def deactivate(token: Any) -> None:
    """Undo :func:`activate`; a token from another context is ignored."""
    with contextlib.suppress(ValueError, RuntimeError):
        _current.reset(token)
