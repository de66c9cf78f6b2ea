"""What every end-to-end handler of ``bench/events.py`` does: count its run in Redis.

One round trip per run: ``INCR`` the run counter of (side, group) and ``SADD``
the event id to the (side, group) id set, so the benchmark can prove that no
event was lost (set size) or handled twice (counter above the set size).
Configured by environment variables the benchmark sets before it starts workers.
"""

from __future__ import annotations

import os
import threading

import redis

#: the subscriber groups of the llmgine-celery side; plain Celery mirrors them
GROUPS = ("bench-ev-a", "bench-ev-b", "bench-ev-c")
#: Redis URL of the counters
REDIS_URL_ENV = "BENCH_EVENTS_REDIS_URL"
#: prefix of every counter key; unique per benchmark run
PREFIX_ENV = "BENCH_EVENTS_PREFIX"

_lock = threading.Lock()
_client: redis.Redis | None = None


def runs_key(side: str, group: str) -> str:
    return f"{os.environ[PREFIX_ENV]}:{side}:{group}:runs"


def ids_key(side: str, group: str) -> str:
    return f"{os.environ[PREFIX_ENV]}:{side}:{group}:ids"


def client() -> redis.Redis:
    """This process's Redis client (thread-safe: one connection pool)."""
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ[REDIS_URL_ENV])
        return _client


def record(side: str, group: str, event_id: str) -> None:
    """Count one handler run of ``event_id`` in ``group``."""
    pipe = client().pipeline(transaction=False)
    pipe.incr(runs_key(side, group))
    pipe.sadd(ids_key(side, group), event_id)
    pipe.execute()
