"""The llmgine-celery side of ``bench/events.py``: three subscriber groups.

Three applications, one per group of ``counting.GROUPS``, each with one sync
handler of ``EventsBenchTick`` that counts its run. A worker serves one group:
``celery -A bench.apps.llmgine_events:celery_a worker -Q llmgine.handlers.bench-ev-a``
(its consumer step also consumes the group's event queue).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.apps.counting import GROUPS, record
from llmgine_celery import ApplicationBootstrap, ApplicationConfig, Event

SIDE = "llmgine"


@dataclass
class EventsBenchTick(Event):
    """An event carrying ``payload`` (about 1 KB in the benchmark)."""

    payload: str


class CountingApp(ApplicationBootstrap):
    """One subscriber group (named after the application) with one counting handler."""

    def _register_event_handlers(self) -> None:
        self.register_event_handler(EventsBenchTick, self.count)

    def count(self, event: EventsBenchTick) -> None:
        record(SIDE, self.name, event.id)


apps = {group: CountingApp(ApplicationConfig(name=group)) for group in GROUPS}
celery_a = apps[GROUPS[0]].celery
celery_b = apps[GROUPS[1]].celery
celery_c = apps[GROUPS[2]].celery
#: the module attribute of each group's Celery app, for ``celery -A``
CELERY_ATTRS = dict(zip(GROUPS, ("celery_a", "celery_b", "celery_c"), strict=True))
#: the handler's name, part of its task ids (``<event id>:<group>:count``)
HANDLER = "count"
