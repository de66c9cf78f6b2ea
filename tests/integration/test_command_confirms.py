"""Commands published on RabbitMQ are confirmed by the broker: one it refuses fails its call."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmgine_celery import (
    ApplicationBootstrap,
    ApplicationConfig,
    BrokerUnavailableError,
    Command,
    Settings,
)
from tests.support import (
    RABBITMQ_URL,
    REDIS_URL,
    TEST_VHOST,
    close_connections,
    connections_named,
    ensure_test_vhost,
    message_count,
    rabbitmq_connections,
    rabbitmqctl,
    require_service,
    wait_for,
)

pytestmark = pytest.mark.integration

#: a queue the broker holds one message in, and refuses (nacks) more for
FULL_QUEUE = "itest.confirms.commands.full"
#: a queue without limits
OPEN_QUEUE = "itest.confirms.commands.open"
POLICY = "llmgine-itest-full-commands"
#: seconds a refused call may take at most: far less than its own timeout
PROMPT = 10.0


@dataclass
class Ping(Command):
    """Routed to the full queue."""

    text: str


@dataclass
class Pong(Command):
    """Routed to the open queue."""

    text: str


class Pinger(ApplicationBootstrap):
    """A producer whose two command types go to the two test queues (no worker runs)."""

    def _register_command_handlers(self) -> None:
        self.register_command_handler(Ping, self.echo, queue=FULL_QUEUE)
        self.register_command_handler(Pong, self.echo, queue=OPEN_QUEUE)

    def echo(self, command: Ping | Pong) -> str:
        return command.text


def delete_queues(app: Pinger) -> None:
    with app.celery.connection_for_write() as conn:
        for name in (FULL_QUEUE, OPEN_QUEUE):
            conn.default_channel.queue_delete(name)


@pytest.fixture
def pinger(tmp_path: Path) -> Iterator[Pinger]:
    require_service(RABBITMQ_URL)
    if "TEST_RABBITMQ_URL" in os.environ:
        pytest.skip("sets a policy with rabbitmqctl, on the tests' own vhost only")
    ensure_test_vhost()
    settings = Settings(
        broker_url=RABBITMQ_URL, result_backend=REDIS_URL, embedded_worker=False, data_dir=tmp_path
    )
    app = Pinger(ApplicationConfig(name="command-confirms", settings=settings))
    delete_queues(app)  # left by an interrupted run, they would lack the policy
    # A full queue with reject-publish makes RabbitMQ nack what is routed to it.
    # A policy, not queue arguments: the bus declares its queues without any.
    limits = json.dumps({"max-length": 1, "overflow": "reject-publish"})
    pattern = f"^{re.escape(FULL_QUEUE)}$"
    rabbitmqctl("set_policy", "-p", TEST_VHOST, "--apply-to", "queues", POLICY, pattern, limits)
    try:
        yield app
    finally:
        delete_queues(app)
        rabbitmqctl("clear_policy", "-p", TEST_VHOST, POLICY)
        app.celery.close()


def test_send_returns_once_confirmed_and_raises_when_the_broker_refuses(pinger: Pinger) -> None:
    bus = pinger.message_bus
    bus.send(Ping(text="fits"))
    # Confirmed means routed and stored: the count is final when send returns.
    assert message_count(pinger, FULL_QUEUE) == 1
    with pytest.raises(BrokerUnavailableError, match="refused"):
        bus.send(Ping(text="refused"))
    assert message_count(pinger, FULL_QUEUE) == 1
    # a refusal is one message's: the channel goes on confirming the others
    bus.send(Pong(text="accepted"))
    assert message_count(pinger, OPEN_QUEUE) == 1


def test_execute_of_a_refused_command_fails_at_once(pinger: Pinger) -> None:
    pinger.message_bus.send(Ping(text="fits"))

    async def run() -> list[BaseException | object]:
        bus = pinger.message_bus
        try:
            calls = [bus.execute(Ping(text=f"refused {i}"), timeout=60) for i in range(20)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await bus.aclose()

    started = time.monotonic()
    outcomes = asyncio.run(run())
    assert time.monotonic() - started < PROMPT  # told by the broker, not by the timeout
    assert all(isinstance(o, BrokerUnavailableError) for o in outcomes), outcomes
    assert all("refused" in str(o) for o in outcomes)
    assert message_count(pinger, FULL_QUEUE) == 1


def test_a_connection_the_broker_closed_while_idle_is_replaced_before_the_next_send(
    pinger: Pinger,
) -> None:
    # The broker may close an idle connection (an operator, a node restart): the
    # next send notices before it publishes, instead of failing on the dead one.
    name = f"itest-confirms-closed-{os.getpid()}"
    bus = pinger.message_bus
    with connections_named("rabbitmq", pinger.celery, name):
        bus.send(Pong(text="before"))
    close_connections("rabbitmq", name)
    # closed by the broker; it waits for the client's close-ok for up to 30 s
    wait_for(
        lambda: ["running"] not in rabbitmq_connections(name, "state"),
        what="the broker to close it",
    )
    bus.send(Pong(text="after"))  # raised BrokerUnavailableError before
    assert message_count(pinger, OPEN_QUEUE) == 2


def test_a_forked_child_confirms_on_a_connection_of_its_own(pinger: Pinger) -> None:
    # A prefork worker's child inherits the parent's confirm channel: sharing its
    # socket would mix both processes' frames and acks.
    bus = pinger.message_bus
    bus.send(Pong(text="parent"))
    parents = bus._confirms._conn if bus._confirms is not None else None
    assert parents is not None
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which reports by exit status
        status = 1
        try:
            bus.send(Pong(text="child"))
            status = 0 if bus._confirms is not None and bus._confirms._conn is not parents else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    bus.send(Pong(text="parent again"))  # the parent's connection still works
    assert message_count(pinger, OPEN_QUEUE) == 3
