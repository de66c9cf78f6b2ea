"""A worker's startup objects moved out of the garbage collector's way.

A worker process starts with some 90,000 objects (Celery, kombu, redis-py,
pydantic, the application) that live as long as it does. Each full collection
walks them all: about 30 ms with the GIL held, a stall of every task thread.
Once the worker is ready (and in each prefork child, once it is forked) they
are collected once and frozen (``gc.freeze``): later full collections walk only
what was made since. It also spares a prefork child's copy-on-write pages.
"""

from __future__ import annotations

import gc
from typing import Any

from celery import signals


def freeze_startup_objects(**_: Any) -> None:
    """Collect, then move every surviving object to the permanent generation."""
    gc.collect()
    gc.freeze()


def connect() -> None:
    """Freeze when a worker is ready, and in each pool process it forks (once per process)."""
    signals.worker_ready.connect(
        freeze_startup_objects, weak=False, dispatch_uid="llmgine.freeze.worker_ready"
    )
    signals.worker_process_init.connect(
        freeze_startup_objects, weak=False, dispatch_uid="llmgine.freeze.worker_process_init"
    )
