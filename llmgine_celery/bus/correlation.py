"""Correlation ids in message headers: set when sending, read when handling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmgine_celery.bus import topology
from llmgine_celery.observability.context import Correlation, current, new_span_id, new_trace_id


def outgoing_headers() -> dict[str, str]:
    """Correlation headers for a message sent now: the current trace, or a new one."""
    here = current()
    if here is None:
        return {topology.HEADER_TRACE_ID: new_trace_id()}
    headers = {
        topology.HEADER_TRACE_ID: here.trace_id,
        topology.HEADER_PARENT_SPAN_ID: here.span_id,
    }
    if here.causation_id is not None:
        headers[topology.HEADER_CAUSATION_ID] = here.causation_id
    return headers


def from_headers(headers: Mapping[str, Any], message_id: str | None) -> Correlation:
    """The correlation of the handler of a message with ``headers``: a new span in its trace."""
    trace_id = _text(headers.get(topology.HEADER_TRACE_ID))
    return Correlation(
        trace_id=trace_id or new_trace_id(),
        span_id=new_span_id(),
        parent_span_id=_text(headers.get(topology.HEADER_PARENT_SPAN_ID)),
        causation_id=message_id,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
