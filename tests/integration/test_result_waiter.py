"""The result waiter on real Redis: replies on one channel, and results it would miss otherwise."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from llmgine_celery import ApplicationConfig, Settings
from llmgine_celery.bus import waiters
from llmgine_celery.bus.waiters import RedisResultWaiter, client_name
from tests.integration.apps import APP_NAME, IntegrationApp
from tests.support import REDIS_URL, require_service

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(tmp_path: Path) -> Any:
    require_service(REDIS_URL)
    settings = Settings(
        broker_url=REDIS_URL, result_backend=REDIS_URL, embedded_worker=False, data_dir=tmp_path
    )
    return IntegrationApp(ApplicationConfig(name=APP_NAME, settings=settings)).celery.backend


def meta(task_id: str) -> dict[str, Any]:
    return {"status": "SUCCESS", "result": {"n": 1}, "task_id": task_id, "traceback": None}


async def wait_one(
    backend: Any, before_wait: Any, *, replied: bool = True, timeout: float = 10
) -> tuple[Any, str]:
    """Expect one task, run ``before_wait(waiter, task_id)``, then wait for its result."""
    waiter = RedisResultWaiter(REDIS_URL, backend)
    task_id = f"waiter-test-{uuid.uuid4()}"
    try:
        waiter.expect(task_id, replied=replied)
        await before_wait(waiter, task_id)
        return await waiter.wait(task_id, timeout), task_id
    finally:
        await waiter.aclose()
        backend.forget(task_id)


async def until(probe: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``probe`` (in a thread: it talks to Redis) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(probe):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def waiter_connections() -> list[dict[str, Any]]:
    """This process's result-waiter connections, as Redis' CLIENT LIST shows them."""
    with redis.Redis.from_url(REDIS_URL) as client:
        return [c for c in client.client_list() if c["name"] == client_name()]


def store_quietly(backend: Any, task_id: str) -> None:
    """Store a result without publishing it anywhere (as an older worker's lost publish)."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.set(backend.get_key_for_task(task_id), backend.encode(meta(task_id)), ex=60)


def test_a_result_published_on_the_reply_channel_wakes_the_call(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiters, "SWEEP_INTERVAL", 1000.0)  # only the publish can deliver

    async def publish_reply(waiter: RedisResultWaiter, task_id: str) -> None:
        def listening() -> bool:
            return any(int(c["sub"]) == 2 for c in waiter_connections())

        await until(listening, "the reply subscription")
        assert waiter.reply_to is not None
        with redis.Redis.from_url(REDIS_URL) as client:  # published, never stored
            assert client.publish(waiter.reply_to, backend.encode(meta(task_id))) == 1

    got, task_id = asyncio.run(wait_one(backend, publish_reply))
    assert got is not None and got["task_id"] == task_id and got["result"] == {"n": 1}


def test_a_result_stored_before_the_reply_subscription_held_is_read(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiters, "SWEEP_INTERVAL", 1000.0)  # only the confirmation's read

    async def store_now(waiter: RedisResultWaiter, task_id: str) -> None:
        store_quietly(backend, task_id)  # before the loop has even sent the SUBSCRIBE

    got, task_id = asyncio.run(wait_one(backend, store_now))
    assert got is not None and got["task_id"] == task_id


def test_a_result_whose_publish_was_missed_is_found_by_the_sweep(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiters, "SWEEP_INTERVAL", 0.2)

    async def store_later(waiter: RedisResultWaiter, task_id: str) -> None:
        def read_once() -> bool:  # the waiter's read after its subscription held
            return any(c["cmd"] == "mget" for c in waiter_connections())

        async def later() -> None:
            await until(read_once, "the read after the subscription")
            store_quietly(backend, task_id)  # nothing will publish it or read it but the sweep

        asyncio.get_running_loop().create_task(later())

    got, task_id = asyncio.run(wait_one(backend, store_later))
    assert got is not None and got["task_id"] == task_id


def test_a_call_not_sent_with_a_reply_channel_waits_on_the_tasks_own_channel(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiters, "SWEEP_INTERVAL", 1000.0)

    async def publish_on_key(waiter: RedisResultWaiter, task_id: str) -> None:
        key = backend.get_key_for_task(task_id)
        with redis.Redis.from_url(REDIS_URL) as client:  # published once it has a listener
            await until(
                lambda: client.publish(key, backend.encode(meta(task_id))) > 0, "a listener"
            )

    got, task_id = asyncio.run(wait_one(backend, publish_on_key, replied=False))
    assert got is not None and got["task_id"] == task_id


def test_closing_while_the_subscription_is_in_flight_leaves_no_reader(backend: Any) -> None:
    # A call can fail before the waiter's first SUBSCRIBE is answered (the broker
    # refused the command, say) and the caller close the bus at once: nothing of
    # the waiter may outlive that, at whatever step the subscription was.
    async def close_after(steps: int) -> None:
        waiter = RedisResultWaiter(REDIS_URL, backend)
        waiter.expect(f"waiter-test-{uuid.uuid4()}", replied=True)
        for _ in range(steps):
            await asyncio.sleep(0)
        await waiter.aclose()
        left = asyncio.all_tasks() - {asyncio.current_task()}
        assert not left, f"after {steps} steps: {left}"

    async def every_step() -> None:
        for steps in range(12):
            await close_after(steps)
        await until(lambda: not waiter_connections(), "the waiters' connections to close")

    asyncio.run(every_step())
