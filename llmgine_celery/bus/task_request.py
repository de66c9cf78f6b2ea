"""How llmgine's Celery tasks are made: bound, the app's own, each message decoded once.

Celery's consumer decodes a task message's body while it builds the request
(the request keeps the task's positional and keyword arguments), on the
consumer's own thread. Then it hands the pool the raw bytes, and the pool
decodes them a second time before it runs the task. This request hands the
pool the body the consumer decoded instead, so the pool runs the task with no
second decode: for a command, one JSON parse of its envelope less per task.
Nothing is checked less: the consumer decoded with the worker's accepted
content types (JSON only), as the pool would have.

A message Celery decoded some other way (protocol 1, hybrid) is left as Celery
made it. Command and handler tasks are made by ``llmgine_task``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.worker.request import Request

if TYPE_CHECKING:
    from celery import Celery, Task


class DecodedOnceRequest(Request):
    """Celery's request, passing the pool the body the consumer already decoded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Celery 5.7's attributes, read with a default: a Celery that renames
        # them gets its own request back, slower but whole.
        if getattr(self, "_decoded", True) is False:
            payload = getattr(self, "_payload", None)
            if payload is not None:
                # Celery's pool trace decodes a body with a content type and takes
                # a body without one as the (args, kwargs, embed) it already is.
                self._body = payload
                self._content_type = self._content_encoding = None
                self._decoded = True


def llmgine_task(celery: Celery, name: str, fn: Callable[..., Any], **options: Any) -> Task:
    """``fn`` as the Celery task ``name``: bound, this app's own, each message decoded once."""
    task: Task = celery.task(
        name=name, bind=True, shared=False, Request=DecodedOnceRequest, **options
    )(fn)
    return task
