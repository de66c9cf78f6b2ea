"""Events dispatched while RabbitMQ's memory alarm holds publishers back are all handled, once.

Under a memory (or disk) alarm RabbitMQ stops reading the connections that
publish. A group's worker must then keep its events unacked, since nothing it
sends can be confirmed, and handle every one once the alarm clears.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llmgine_celery import ApplicationConfig
from llmgine_celery.bus import topology
from tests.integration.event_apps import Alpha, Said, record_key, recorder
from tests.support import (
    DEPLOYMENTS,
    RABBITMQ_URL,
    TEST_VHOST,
    ensure_test_vhost,
    producer_settings,
    rabbitmqctl,
    require_service,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.reliability

EVENTS = 300
#: the group consumer's prefetch: the events a worker holds unacked at most
PREFETCH = 32
#: a memory watermark every broker is over: the alarm is set at once
ALARM_BYTES = 1


def watermark() -> list[str]:
    """The ``set_vm_memory_high_watermark`` arguments that keep the broker's setting.

    A run killed mid-test leaves the alarm's 1-byte watermark: that one is put
    back to RabbitMQ's default at once, or nothing could be published.
    """
    status = json.loads(rabbitmqctl("status", "--formatter", "json").stdout)
    setting = status["vm_memory_high_watermark_setting"]
    if setting == {"absolute": ALARM_BYTES}:
        setting = {"relative": 0.4}
        rabbitmqctl("set_vm_memory_high_watermark", "0.4")
    if "absolute" in setting:
        return ["absolute", str(setting["absolute"])]
    return [str(setting["relative"])]


@contextmanager
def memory_alarm(restore: list[str]) -> Iterator[None]:
    """Set RabbitMQ's memory alarm (a 1-byte watermark); then set ``restore`` again."""
    rabbitmqctl("set_vm_memory_high_watermark", "absolute", str(ALARM_BYTES))
    try:
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *restore)


def group_queue_counts() -> tuple[int, int]:
    """(ready, unacknowledged) messages of group alpha's queue."""
    name = topology.group_queue_name("alpha")
    listed = rabbitmqctl(
        "list_queues", "-p", TEST_VHOST, "name", "messages_ready", "messages_unacknowledged"
    ).stdout
    for line in listed.splitlines():
        fields = line.split("\t")
        if fields[0] == name:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"queue {name} not found: {listed!r}")


def runs() -> list[str]:
    """The event ids alpha's ``said`` handler ran for, one per run."""
    with recorder() as client:
        entries = client.lrange(record_key("alpha", "said"), 0, -1)
    return [json.loads(entry)["id"] for entry in entries]


def test_events_dispatched_during_a_memory_alarm_are_kept_then_handled_once(
    tmp_path: Path,
) -> None:
    require_service(RABBITMQ_URL)
    ensure_test_vhost()
    restore = watermark()
    broker, backend = DEPLOYMENTS["rabbitmq"]
    producer = Alpha(
        ApplicationConfig(name="alpha", settings=producer_settings("rabbitmq", tmp_path))
    )
    producer.declare()
    with producer.celery.connection_for_write() as conn:
        for queue in (topology.group_queue_name("alpha"), topology.handler_queue_name("alpha")):
            conn.default_channel.queue_purge(queue)
    with recorder() as client:
        client.delete(record_key("alpha", "said"))
    events = [Said(text=f"during the alarm {i}") for i in range(EVENTS)]
    for event in events:  # queued before the alarm, with no worker yet
        producer.message_bus.publish_sync(event)
    worker = None
    try:
        with memory_alarm(restore):
            worker = start_worker(
                "tests.integration.event_apps:alpha_celery",
                broker,
                backend,
                log_dir=tmp_path,
                extra_args=("-Q", topology.handler_queue_name("alpha")),
                ready=False,  # its ping reply would be held back too
            )
            # The worker takes its prefetch of events and holds them: their handler
            # tasks cannot be confirmed, so not one event may be acked.
            wait_for(
                lambda: group_queue_counts()[1] == PREFETCH,
                what=f"{PREFETCH} events held unacked by the worker",
            )
            assert group_queue_counts() == (EVENTS - PREFETCH, PREFETCH)
            assert runs() == []
        wait_for(lambda: len(runs()) >= EVENTS, timeout=60, what="every event handled")
        assert sorted(runs()) == sorted(event.id for event in events)  # each once
        wait_for(lambda: group_queue_counts() == (0, 0), what="every event acked")
    finally:
        if worker is not None:
            worker.stop()
        producer.celery.close()
