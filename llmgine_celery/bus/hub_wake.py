"""Waking kombu's hub for callbacks its own thread queued."""

from __future__ import annotations

from typing import Any


def wake_for_waiting_callbacks(hub: Any) -> None:
    """Make the hub's next poll return at once if callbacks wait for its next turn.

    A callback queued from another thread wakes the poll (kombu's waker); one
    queued on the hub's own thread does not, and waits out the poll: up to the
    next timer. kombu keeps no public way to ask this; without its private
    attributes the hub behaves as it always did.
    """
    waker = getattr(hub, "_waker", None)
    if getattr(hub, "_ready", None) and waker is not None:
        waker.wake()
