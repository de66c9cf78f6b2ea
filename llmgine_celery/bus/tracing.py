"""The hooks a distributed tracer (Sentry) plugs into the bus; no-ops by default.

Our senders bypass ``apply_async``, which tracing integrations patch, so the
bus asks the tracer for headers itself: in the caller's context (the publisher
thread has none of the caller's scope), and at the dispatcher for the handler
tasks an event becomes. The tracer's module is imported only when it is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: ``(task name, message id, queue, fields)`` -> a context yielding headers to send
SpanFactory = Callable[
    [str, str, str | None, Mapping[str, Any]], contextlib.AbstractContextManager[dict[str, Any]]
]


@contextlib.contextmanager
def _no_span(
    task_name: str, message_id: str, queue: str | None, fields: Mapping[str, Any]
) -> Iterator[dict[str, Any]]:
    yield {}


def _no_forward(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Tracer:
    """Producer spans around sends, and trace headers passed from events to their tasks."""

    producer_span: SpanFactory = _no_span
    forward: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_forward


#: tracing off
NO_TRACER = Tracer()
