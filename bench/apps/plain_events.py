"""The plain Celery side of ``bench/events.py``: the same fan-out, done by hand.

One plain Celery app per group of ``counting.GROUPS``, each with one task on
its own queue ``bench.plain.<group>`` that counts its run exactly like the
llmgine-celery handler. The producer sends one task per group per event.
Configured like ``plain_echo`` (llmgine-celery's own ``DEFAULTS`` and
``REQUIRED``, so both sides change together), from ``LLMGINE_BROKER_URL`` and
``LLMGINE_RESULT_BACKEND``; no results are stored.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task
from kombu.entity import Exchange, Queue

from bench.apps.counting import GROUPS, record
from llmgine_celery.bus.celery_app import DEFAULTS, REQUIRED

SIDE = "plain"


def queue_name(group: str) -> str:
    return f"bench.plain.{group}"


def build(group: str) -> tuple[Celery, Task]:
    """A plain Celery app on queue ``bench.plain.<group>`` and its counting task."""
    queue = queue_name(group)
    app = Celery(
        f"plain-{group}",
        broker=os.environ["LLMGINE_BROKER_URL"],
        backend=os.environ["LLMGINE_RESULT_BACKEND"],
        set_as_current=False,
    )
    conf: dict[str, Any] = {**DEFAULTS, **REQUIRED}
    conf["task_default_queue"] = queue
    conf["task_queues"] = [Queue(queue, Exchange(queue, type="direct"), routing_key=queue)]
    conf["task_ignore_result"] = True
    app.conf.update(conf)

    def count(envelope: dict[str, Any]) -> None:
        record(SIDE, group, envelope["data"]["id"])

    task: Task = app.task(name=f"{queue}.count", shared=False, ignore_result=True)(count)
    return app, task


_built = {group: build(group) for group in GROUPS}
celery_a = _built[GROUPS[0]][0]
celery_b = _built[GROUPS[1]][0]
celery_c = _built[GROUPS[2]][0]
#: the module attribute of each group's Celery app, for ``celery -A``
CELERY_ATTRS = dict(zip(GROUPS, ("celery_a", "celery_b", "celery_c"), strict=True))
#: each group's counting task, for the producer
tasks = {group: task for group, (_, task) in _built.items()}
apps = {group: app for group, (app, _) in _built.items()}
