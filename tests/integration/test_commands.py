"""Commands through real brokers to real worker processes (RabbitMQ and Redis)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from kombu import Connection, Producer

from llmgine_celery import CommandResult, MessageValidationError
from llmgine_celery.bus import topology
from llmgine_celery.bus.amqp_transport import READ_AHEAD_TRANSPORT
from llmgine_celery.bus.waiters import client_name
from llmgine_celery.messages.envelope import load
from tests.integration.apps import (
    AsyncWhereAmI,
    Colour,
    Fail,
    NobodyHandles,
    Owner,
    Point,
    Priority,
    Rich,
    Sleep,
    Special,
    WhereAmI,
)
from tests.integration.conftest import Deployment
from tests.support import REPO, clean_env, wait_for

pytestmark = pytest.mark.integration


def test_execute_returns_the_result_made_in_a_worker_process(deployment: Deployment) -> None:
    command = WhereAmI(tag="hello", session_id="s-1")
    result = deployment.run(deployment.app.message_bus.execute(command, timeout=30))
    assert result.success, result.error
    assert result.command_id == command.id
    assert result.result["tag"] == "hello"
    assert result.result["pid"] != os.getpid()
    assert result.result["pid"] in deployment.worker.pids


def test_the_worker_process_froze_its_startup_objects(deployment: Deployment) -> None:
    result = deployment.run(deployment.app.message_bus.execute(WhereAmI(tag="gc"), timeout=30))
    assert result.success, result.error
    assert result.result["gc_frozen"] > 10_000  # Celery, kombu, the app: out of gc's walks


def test_each_command_type_is_its_own_task_with_the_command_id(deployment: Deployment) -> None:
    command = WhereAmI(tag="names")
    result = deployment.run(deployment.app.message_bus.execute(command, timeout=30))
    assert result.result["task_name"] == "llmgine.command.WhereAmI"
    assert result.result["task_id"] == command.id
    assert result.result["routing_key"] == topology.COMMAND_QUEUE


def test_a_command_type_can_be_routed_to_its_own_queue(deployment: Deployment) -> None:
    result = deployment.run(deployment.app.message_bus.execute(Special(n=3), timeout=30))
    assert result.success, result.error
    assert result.result["routing_key"] == "itest.special"
    assert result.result["n"] == 3


def test_async_handlers_share_one_persistent_loop_per_process(deployment: Deployment) -> None:
    async def many() -> list[CommandResult]:
        bus = deployment.app.message_bus
        return [await bus.execute(AsyncWhereAmI(tag=str(i)), timeout=30) for i in range(12)]

    results = deployment.run(many())
    assert all(r.success for r in results), [r.error for r in results]
    loops_by_pid: dict[int, set[int]] = {}
    served_by_pid: dict[int, list[int]] = {}
    for r in results:
        assert r.result["pid"] in deployment.worker.pids
        assert r.result["loop_thread"] == "llmgine-handler-loop"
        loops_by_pid.setdefault(r.result["pid"], set()).add(r.result["loop"])
        served_by_pid.setdefault(r.result["pid"], []).append(r.result["served"])
    assert all(len(loops) == 1 for loops in loops_by_pid.values()), loops_by_pid
    # One loop that lives on counts every command it served: 1, 2, 3, ...
    assert any(max(served) > 1 for served in served_by_pid.values()), served_by_pid
    for served in served_by_pid.values():
        assert served == sorted(served) and len(set(served)) == len(served)


def test_a_handler_that_raises_gives_a_failed_result(deployment: Deployment) -> None:
    command = Fail(message="the model is down")
    result = deployment.run(deployment.app.message_bus.execute(command, timeout=30))
    assert not result.success
    assert result.command_id == command.id
    assert result.error == "ValueError: the model is down"
    assert "ValueError: the model is down" in result.metadata["traceback"]
    assert ", in fail\n" in result.metadata["traceback"]  # the handler's own frame


def test_a_command_no_worker_handles_fails_promptly_naming_its_type(deployment: Deployment) -> None:
    started = time.monotonic()
    result = deployment.run(deployment.app.message_bus.execute(NobodyHandles(x=1), timeout=60))
    assert not result.success
    assert "NobodyHandles" in (result.error or "")
    assert "no handler" in (result.error or "")
    assert time.monotonic() - started < 30  # answered by the worker, not by the timeout


def test_a_timeout_is_a_failed_result_and_the_command_still_runs(deployment: Deployment) -> None:
    command = Sleep(seconds=1.5)
    bus = deployment.app.message_bus
    result = deployment.run(bus.execute(command, timeout=0.2))
    assert not result.success
    assert "timed out" in (result.error or "")
    assert result.metadata["reason"] == "timeout"
    later = deployment.run(bus.fetch_result(command.id, timeout=30))
    assert later.success and later.result == "slept"
    again = bus.fetch_result_sync(command.id, timeout=30)
    assert again.success and again.result == "slept"


def test_an_invalid_payload_fails_before_anything_is_sent(deployment: Deployment) -> None:
    command = WhereAmI(tag=12345)  # type: ignore[arg-type]
    with pytest.raises(MessageValidationError, match=r"invalid WhereAmI: tag: "):
        deployment.run(deployment.app.message_bus.execute(command, timeout=5))
    # Nothing reached the worker: the result backend never heard of the id.
    assert deployment.app.celery.AsyncResult(command.id).state == "PENDING"


def test_field_types_survive_the_round_trip(deployment: Deployment) -> None:
    command = Rich(
        count=3,
        ratio=0.25,
        name="n",
        flag=True,
        when=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        colour=Colour.BLUE,
        priority=Priority.HIGH,
        numbers=[1, 2],
        weights={"a": 1.5},
        point=Point(x=1.0, y=2.5),
        owner=Owner(name="ada", tags=["x"]),
        metadata={"trace": "t-1"},
        session_id="session-9",
    )
    result = deployment.run(deployment.app.message_bus.execute(command, timeout=30))
    assert result.success, result.error
    assert result.result["types"] == {
        "count": "int", "ratio": "float", "name": "str", "flag": "bool", "when": "datetime",
        "colour": "Colour", "priority": "Priority", "numbers": "list", "weights": "dict",
        "point": "Point", "owner": "Owner", "note": "NoneType", "extra": "dict",
        "id": "str", "timestamp": "str", "metadata": "dict", "session_id": "str",
    }  # fmt: skip
    data = result.result["data"]
    assert (data["id"], data["timestamp"]) == (command.id, command.timestamp)
    assert data["metadata"] == {"trace": "t-1"} and data["session_id"] == "session-9"
    assert data["when"] == "2026-01-02T03:04:05Z" and data["colour"] == "blue"


def test_execute_sync_and_send_work_without_an_event_loop(deployment: Deployment) -> None:
    bus = deployment.app.message_bus
    result = bus.execute_sync(WhereAmI(tag="sync"), timeout=30)
    assert result.success and result.result["tag"] == "sync"
    handle = bus.send(WhereAmI(tag="later"))
    assert handle.ready is None
    assert handle.get(timeout=30).result["tag"] == "later"
    assert deployment.run(handle.wait(timeout=30)).result["tag"] == "later"


def test_a_result_can_be_fetched_by_id_from_another_process(
    deployment: Deployment, tmp_path: Path
) -> None:
    handle = deployment.app.message_bus.send(WhereAmI(tag="elsewhere"))
    broker, backend = deployment.app.settings.broker(), deployment.app.settings.backend()
    script = (
        "import asyncio, sys\n"
        "from tests.integration.conftest import producer_app\n"
        "from pathlib import Path\n"
        f"app = producer_app({broker!r}, {backend!r}, Path({str(tmp_path)!r}))\n"
        f"r1 = app.message_bus.fetch_result_sync({handle.command_id!r}, timeout=30)\n"
        f"r2 = asyncio.run(app.message_bus.fetch_result({handle.command_id!r}, timeout=30))\n"
        "print(r1.result['tag'], r2.result['tag'], r1.command_id == r2.command_id)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=clean_env(), capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["elsewhere", "elsewhere", "True"]


def test_pending_calls_hold_no_thread_each(deployment: Deployment) -> None:
    peak = 0

    async def many() -> list[CommandResult]:
        nonlocal peak
        bus = deployment.app.message_bus
        calls = [
            asyncio.ensure_future(bus.execute(WhereAmI(tag=str(i)), timeout=60)) for i in range(300)
        ]
        while not all(c.done() for c in calls):
            peak = max(peak, threading.active_count())
            await asyncio.sleep(0.005)
        return [c.result() for c in calls]

    before = threading.active_count()
    results = deployment.run(many())
    assert all(r.success for r in results)
    assert [r.result["tag"] for r in results] == [str(i) for i in range(300)]
    assert peak - before <= 3, (before, peak)  # the publisher thread, not one per call


def test_a_pickled_message_is_never_run(deployment: Deployment) -> None:
    app = deployment.app
    task_id = "pickled-" + os.urandom(4).hex()
    body = ([{"type": "WhereAmI", "v": 1, "data": {"tag": "pickle"}}], {}, {})
    with Connection(app.settings.broker()) as conn:
        Producer(conn).publish(
            body,
            routing_key=topology.COMMAND_QUEUE,
            serializer="pickle",
            headers={"id": task_id, "task": "llmgine.command.WhereAmI", "lang": "py"},
        )
    # The worker keeps serving commands after refusing it...
    follow_up = deployment.run(app.message_bus.execute(WhereAmI(tag="after"), timeout=30))
    assert follow_up.success and follow_up.result["tag"] == "after"
    # ...and never ran (nor stored a result for) the pickled one.
    assert app.celery.AsyncResult(task_id).state == "PENDING"
    assert b"ContentDisallowed" in deployment.worker.log.read_bytes() or b"pickle" in (
        deployment.worker.log.read_bytes()
    )


def test_the_worker_consumes_the_command_and_group_queues(deployment: Deployment) -> None:
    inspect = deployment.app.celery.control.inspect(destination=[deployment.worker.node], timeout=5)
    active = inspect.active_queues() or {}
    names = {q["name"] for q in active.get(deployment.worker.node, [])}
    assert {topology.COMMAND_QUEUE, topology.handler_queue_name("itest")} <= names


def test_the_worker_reads_ahead_on_rabbitmq_and_says_so_in_its_stats(
    deployment: Deployment,
) -> None:
    # the stats reply carries the broker connection's info: JSON, so the transport by name
    inspect = deployment.app.celery.control.inspect(destination=[deployment.worker.node], timeout=5)
    stats = (inspect.stats() or {}).get(deployment.worker.node)
    assert stats is not None, "the worker did not answer inspect stats"
    transport = stats["broker"]["transport"]
    if deployment.broker_name == "rabbitmq":
        assert transport == READ_AHEAD_TRANSPORT
    else:
        assert transport == "redis"


def test_the_worker_consumes_its_event_group_queue(deployment: Deployment) -> None:
    if deployment.broker_name != "rabbitmq":
        pytest.skip("only RabbitMQ reports consumer counts")
    with deployment.app.celery.connection_for_write() as conn:
        declared = conn.default_channel.queue_declare(
            topology.group_queue_name("itest"), passive=True
        )
    assert declared.consumer_count >= 1


def waiter_subscriptions(url: str) -> list[int]:
    """Channels each subscribed result-waiter connection of this process listens to."""
    with redis.Redis.from_url(url) as client:
        listed = client.client_list()
    return [int(c["sub"]) for c in listed if c["name"] == client_name() and int(c["sub"]) > 0]


def test_concurrent_executes_wait_on_one_reply_channel_not_one_channel_each(
    deployment: Deployment,
) -> None:
    backend = deployment.app.settings.backend()
    seen: list[list[int]] = []

    async def run() -> list[CommandResult]:
        calls = asyncio.gather(
            *(deployment.app.message_bus.execute(Sleep(seconds=0.3), timeout=60) for _ in range(12))
        )
        # while they run (12 x 0.3 s on 4 worker slots), what the waiter listens to
        seen.append(await asyncio.to_thread(wait_for, lambda: waiter_subscriptions(backend)))
        while not calls.done():
            seen.append(await asyncio.to_thread(waiter_subscriptions, backend))
            await asyncio.sleep(0.05)
        return await calls

    results = deployment.run(run())
    assert all(r.success for r in results), [r.error for r in results]
    assert len(seen) > 3  # looked several times while the calls were pending
    assert {tuple(s) for s in seen} == {(2,)}  # its reply channel and the standing idle one


def test_the_stored_result_is_the_json_text_of_the_command_result(deployment: Deployment) -> None:
    command = WhereAmI(tag="stored")
    result = deployment.run(deployment.app.message_bus.execute(command, timeout=30))
    stored = deployment.app.celery.AsyncResult(command.id)
    assert stored.state == "SUCCESS" and isinstance(stored.result, str)
    assert load(CommandResult, json.loads(stored.result)) == result
    assert deployment.app.message_bus.fetch_result_sync(command.id, timeout=5) == result
