"""A solo-pool worker with a backlog takes its next command as soon as it acked the last one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.apps import WhereAmI, producer
from tests.support import DEPLOYMENTS, ensure_test_vhost, require_service, start_worker

pytestmark = pytest.mark.integration

#: task events off: their flush timer would wake the hub ten times a second
CONFIG = "tests.integration.no_task_events"
#: commands queued before the worker starts
CALLS = 300
#: seconds all the results are waited for, together; the worker needs about
#: one for the 300. Its hub reads the next message in the same turn as it
#: sends the ack of the last, in an order that varies. A hub that then sleeps
#: in its poll with the new ack still queued gets nothing more from the broker
#: (late acks, a prefetch of one) until something else wakes it: here, with no
#: timer, tens of seconds. Without the fix 7 runs of 8 failed this way; with
#: task events (and their 50 ms flush timer) on, it drained ~10 commands/s.
TIMEOUT = 4.0


def test_a_solo_worker_works_through_a_backlog(tmp_path: Path) -> None:
    broker, backend = DEPLOYMENTS["rabbitmq"]
    require_service(broker)
    ensure_test_vhost()
    app = producer(broker, backend, tmp_path, CONFIG)
    handles = [app.message_bus.send(WhereAmI(tag=f"solo {i}")) for i in range(CALLS)]
    worker = start_worker(
        "tests.integration.apps:celery", broker, backend, pool="solo", concurrency=1,
        log_dir=tmp_path, env={"LLMGINE_CELERY_CONFIG": CONFIG},
        extra_args=("--without-heartbeat",),  # its 2 s timer would cut a stall short
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    try:
        results = [h.get(timeout=max(0.1, deadline - time.monotonic())) for h in handles]
    finally:
        worker.stop(timeout=2)  # an idle solo hub is slow to see SIGTERM: then killed
        app.celery.close()
    assert [r.error for r in results if not r.success] == []
    assert {r.result["pid"] for r in results} == {worker.proc.pid}  # solo: the worker itself
