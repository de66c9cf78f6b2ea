"""A worker killed in the middle of a command loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from tests.integration.apps import RECORDER_URL, Marked, producer
from tests.support import DEPLOYMENTS, ensure_test_vhost, require_service, start_worker

pytestmark = pytest.mark.reliability

CONFIG = "tests.reliability.fast_redelivery"
#: its own Redis database: a 5 s visibility timeout would also hand back other
#: tests' in-flight messages in a shared one
REDIS_DB_URL = "redis://127.0.0.1:6379/12"


def marks(command_id: str) -> list[int]:
    with redis.Redis.from_url(RECORDER_URL) as client:
        return [int(p) for p in client.lrange(f"itest:marked:{command_id}", 0, -1)]


@pytest.mark.parametrize("broker_name", ["rabbitmq", "redis"])
def test_a_command_whose_worker_dies_runs_again_on_another(
    broker_name: str, tmp_path: Path
) -> None:
    broker, backend = DEPLOYMENTS[broker_name]
    if broker_name == "redis":
        broker = backend = REDIS_DB_URL
    require_service(broker)
    if broker_name == "rabbitmq":
        ensure_test_vhost()
    app = producer(broker, backend, tmp_path, CONFIG)
    env = {"LLMGINE_CELERY_CONFIG": CONFIG}
    first = start_worker(
        "tests.integration.apps:celery", broker, backend, pool="threads", log_dir=tmp_path, env=env
    )
    command = Marked(seconds=2)  # shorter than the visibility timeout

    outcome_error: str | None = None

    async def execute_through_the_loss() -> tuple[int, bool]:
        nonlocal outcome_error
        bus = app.message_bus
        try:
            pending = asyncio.ensure_future(bus.execute(command, timeout=90))
            deadline = time.monotonic() + 30
            while not marks(command.id):  # the handler has started in the first worker
                assert time.monotonic() < deadline, "the first worker never started the command"
                await asyncio.sleep(0.05)
            os.kill(first.proc.pid, signal.SIGKILL)  # no warm shutdown, no ack
            first.proc.wait()
            second = start_worker(
                "tests.integration.apps:celery", broker, backend, pool="threads",
                log_dir=tmp_path, env=env,
            )  # fmt: skip
            try:
                result = await pending
                outcome_error = result.error
                return result.result, result.success and result.result in second.pids
            finally:
                second.stop()
        finally:
            await bus.aclose()

    try:
        pid, ran_on_second = asyncio.run(execute_through_the_loss())
    finally:
        first.stop()
        app.celery.close()
    assert ran_on_second, (pid, outcome_error)
    started = marks(command.id)
    assert len(started) == 2 and started[0] in first.pids | {first.proc.pid}
