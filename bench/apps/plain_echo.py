"""The plain Celery side: one ``echo`` task, with llmgine-celery's Celery settings.

Same broker and backend as the llmgine side (``LLMGINE_BROKER_URL``,
``LLMGINE_RESULT_BACKEND``), and the very ``DEFAULTS``/``REQUIRED`` settings
llmgine-celery applies (late acks, prefetch 1, JSON), imported rather than
copied so the comparison stays fair when they change. Its own durable queue
``bench.plain`` is declared exactly as llmgine-celery declares its queues.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task
from kombu.entity import Exchange, Queue

from llmgine_celery.bus.celery_app import DEFAULTS, REQUIRED

QUEUE = "bench.plain"


def build_celery() -> Celery:
    """A plain Celery app configured like llmgine-celery's, on queue ``bench.plain``."""
    app = Celery(
        "plain-echo",
        broker=os.environ["LLMGINE_BROKER_URL"],
        backend=os.environ["LLMGINE_RESULT_BACKEND"],
    )
    conf: dict[str, Any] = {**DEFAULTS, **REQUIRED}
    conf["task_default_queue"] = QUEUE
    conf["task_queues"] = [Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)]
    app.conf.update(conf)
    return app


celery = build_celery()


def _echo(payload: str) -> str:
    """Return ``payload``."""
    return payload


echo: Task = celery.task(name="bench.plain.echo", shared=False)(_echo)
