"""Events through real brokers to subscriber groups in real worker processes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer

from llmgine_celery import ApplicationConfig
from llmgine_celery.bus import topology
from llmgine_celery.bus.celery_app import transport_of
from llmgine_celery.bus.dead_letters import DeadLetter, dead_letter_queue, parse_dead_letter
from llmgine_celery.bus.events import events_exchange, group_queue
from tests.integration.event_apps import Alpha, Boom, Chained, Said, record_key, recorder
from tests.support import (
    DEPLOYMENTS,
    REPO,
    TEST_VHOST,
    WorkerProcess,
    clean_env,
    producer_settings,
    rabbitmqctl,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUPS = ("alpha", "beta", "gamma")
#: a RabbitMQ policy one test sets on alpha's handler queue (and clears)
REFUSING_POLICY = "itest-alpha-handler-tasks-refused"
#: Celery queues each group's workers consume (beta alone serves the Shout command)
QUEUES = {
    "alpha": [topology.handler_queue_name("alpha")],
    "beta": [topology.handler_queue_name("beta"), "beta.commands"],
    "gamma": [topology.handler_queue_name("gamma")],
}


def seen(group: str, handler: str, event_id: str | None = None) -> list[dict[str, Any]]:
    """What a handler recorded, optionally for one event only."""
    with recorder() as client:
        entries = [json.loads(e) for e in client.lrange(record_key(group, handler), 0, -1)]
    return [e for e in entries if event_id is None or e["id"] == event_id]


@dataclass
class Cluster:
    """A producer and workers of groups alpha and beta on one broker."""

    broker_name: str
    producer: Alpha
    tmp: Path
    workers: dict[str, list[WorkerProcess]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)

    def publish(self, event: Any) -> None:
        self.producer.message_bus.publish_sync(event)

    def start(self, group: str) -> WorkerProcess:
        broker, backend = DEPLOYMENTS[self.broker_name]
        worker = start_worker(
            f"tests.integration.event_apps:{group}_celery",
            broker,
            backend,
            pool="threads",
            concurrency=4,
            log_dir=self.tmp,
            extra_args=("-Q", ",".join(QUEUES[group])),
            env={"LLMGINE_REBIND_INTERVAL": "0.5"},
        )
        self.workers.setdefault(group, []).append(worker)
        return worker

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter so far (drained from the queue into this list)."""
        with self.producer.celery.connection_for_write() as conn:
            queue = conn.SimpleQueue(dead_letter_queue())
            try:
                while True:
                    message = queue.get(block=True, timeout=0.2)
                    self.dead.append(parse_dead_letter(message.payload))
                    message.ack()
            except queue.Empty:
                pass
            finally:
                queue.close()
        return self.dead


def purge_everything(app: Alpha) -> None:
    names = [topology.group_queue_name(g) for g in GROUPS]
    names += [topology.handler_queue_name(g) for g in GROUPS]
    names += [topology.DEAD_LETTER_QUEUE, topology.COMMAND_QUEUE, "beta.commands"]
    with app.celery.connection_for_write() as conn:
        for name in names:
            try:
                conn.default_channel.queue_purge(name)
            except Exception:  # not declared yet: nothing to purge
                conn.close()
    with recorder() as client:
        for key in client.scan_iter("itest:seen:*"):
            client.delete(key)


def delete_group_queues(app: Alpha) -> None:
    """Group queues left bound would collect every later test's events."""
    with app.celery.connection_for_write() as conn:
        for group in GROUPS:
            queue = group_queue(group, transport_of(app.settings.broker()))(conn.default_channel)
            queue.declare()  # kombu's Redis transport unbinds only what it declared
            queue.delete()


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    broker_name = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    tmp = tmp_path_factory.mktemp(f"events-{broker_name}")
    settings = producer_settings(broker_name, tmp)
    producer = Alpha(ApplicationConfig(name="alpha", settings=settings))
    if broker_name == "rabbitmq":  # left by a run killed mid-test, it would refuse alpha's tasks
        rabbitmqctl("clear_policy", "-p", TEST_VHOST, REFUSING_POLICY, check=False)
    producer.declare()
    purge_everything(producer)
    # gamma is declared (by the CLI, as a deployment would) but has no worker yet
    declared = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmgine_celery.cli",
            "declare",
            "tests.integration.event_apps:gamma",
        ],
        cwd=REPO,
        env=clean_env(LLMGINE_BROKER_URL=broker, LLMGINE_RESULT_BACKEND=backend),
        capture_output=True,
        timeout=60,
    )
    assert declared.returncode == 0, declared.stderr.decode()
    assert topology.group_queue_name("gamma") in declared.stdout.decode().split()
    found = Cluster(broker_name, producer, tmp)
    try:
        found.start("alpha")
        found.start("beta")
        yield found
    finally:
        for workers in found.workers.values():
            for worker in workers:
                worker.stop()
        delete_group_queues(producer)
        producer.celery.close()


def test_every_group_handles_every_event_with_its_fields_and_ids(cluster: Cluster) -> None:
    event = Said(text="hello groups", session_id="s-42", metadata={"k": "v"})
    cluster.publish(event)
    alpha = wait_for(lambda: seen("alpha", "said", event.id), what="alpha")
    beta = wait_for(lambda: seen("beta", "said", event.id), what="beta")
    assert alpha[0]["text"] == beta[0]["text"] == "hello groups"
    assert alpha[0]["session_id"] == beta[0]["session_id"] == "s-42"
    assert alpha[0]["pid"] in cluster.workers["alpha"][0].pids
    assert beta[0]["pid"] in cluster.workers["beta"][0].pids
    # Handler runs keep no result: nobody waits for one.
    task_id = topology.handler_task_id(event.id, "alpha", "said")
    assert cluster.producer.celery.backend.get_task_meta(task_id)["status"] == "PENDING"


def test_a_handler_can_execute_commands_and_publish_events(cluster: Cluster) -> None:
    event = Said(text="chain reaction", session_id="s-7")
    cluster.publish(event)
    chained = wait_for(
        lambda: [e for e in seen("alpha", "chained") if e["text"] == "chain reaction"],
        what="the chained event",
    )
    assert chained[0]["shout"] == "CHAIN REACTION"
    assert chained[0]["session_id"] == "s-7"


def test_a_failing_handler_is_retried_then_dead_lettered_alone(cluster: Cluster) -> None:
    event = Boom(text="bad input")
    cluster.publish(event)
    failed = wait_for(
        lambda: [e for e in seen("alpha", "handler_failed") if e["failed_event_id"] == event.id],
        what="EventHandlerFailedEvent",
    )
    assert failed[0]["failed_handler"] == "flaky" and failed[0]["attempts"] == 3
    assert failed[0]["error"] == "RuntimeError: flaky cannot handle bad input"
    assert len(seen("alpha", "flaky", event.id)) == 3  # first run + 2 retries
    assert len(seen("alpha", "steady", event.id)) == 1  # its sibling ran once, unharmed
    letters = wait_for(
        lambda: [
            d for d in cluster.dead_letters() if d.event and d.event["data"]["id"] == event.id
        ],
        what="the dead letter",
    )
    letter = letters[0]
    assert (letter.kind, letter.group, letter.handler, letter.attempts) == (
        "handler_failed", "alpha", "flaky", 3,
    )  # fmt: skip
    assert "RuntimeError: flaky cannot handle bad input" in (letter.traceback or "")
    assert letter.task_id == topology.handler_task_id(event.id, "alpha", "flaky")
    # Retries stayed in alpha: beta got its one copy through the exchange, no more.
    assert len(seen("beta", "boom_seen", event.id)) == 1
    # ...and the worker reported the dead letter to its ObservabilityBus.
    logs = b"".join(w.log.read_bytes() for w in cluster.workers["alpha"])
    assert f"dead_letter_id={letter.id}".encode() in logs


def test_the_same_event_twice_runs_each_handler_once(cluster: Cluster) -> None:
    event = Said(text="only once")
    cluster.publish(event)
    wait_for(lambda: seen("alpha", "said", event.id), what="the first copy")
    cluster.publish(event)  # a redelivered copy: same id
    marker = Said(text="after the copy")
    cluster.publish(marker)
    wait_for(lambda: seen("alpha", "said", marker.id), what="the marker")
    wait_for(lambda: seen("beta", "said", marker.id), what="the marker in beta")
    assert len(seen("alpha", "said", event.id)) == 1
    assert len(seen("beta", "said", event.id)) == 1


def queue_policy(queue: str) -> str:
    """The policy RabbitMQ applies to ``queue`` of the tests' vhost ('' for none)."""
    listed = rabbitmqctl("list_queues", "-p", TEST_VHOST, "name", "policy").stdout
    for line in listed.splitlines():
        name, _, policy = line.partition("\t")
        if name == queue:
            return policy.strip()
    return ""


def test_an_event_is_acked_only_once_the_broker_took_its_handler_tasks(cluster: Cluster) -> None:
    if cluster.broker_name != "rabbitmq":
        pytest.skip("publisher confirms are RabbitMQ's")
    queue = topology.handler_queue_name("alpha")
    # A full queue that rejects publishes: RabbitMQ nacks every handler task sent to it.
    refuse = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    pattern = f"^{re.escape(queue)}$"
    rabbitmqctl(
        "set_policy", "-p", TEST_VHOST, "--apply-to", "queues", "--priority", "10",
        REFUSING_POLICY, pattern, refuse,
    )  # fmt: skip
    event = Said(text="refused at first")
    try:
        wait_for(
            lambda: queue_policy(queue) == REFUSING_POLICY, what="the policy on the handler queue"
        )
        cluster.publish(event)
        refused = f"did not take the handler tasks of event {event.id}".encode()
        wait_for(
            lambda: any(refused in w.log.read_bytes() for w in cluster.workers["alpha"]),
            what="a refused dispatch in alpha's worker log",
        )
        assert seen("alpha", "said", event.id) == []
    finally:
        rabbitmqctl("clear_policy", "-p", TEST_VHOST, REFUSING_POLICY)
    # The event was kept, not acked: once the queue takes tasks again its handler runs, once.
    wait_for(lambda: seen("alpha", "said", event.id), what="alpha's run after the refusal")
    marker = Said(text="after the refusal")
    cluster.publish(marker)
    wait_for(lambda: seen("alpha", "said", marker.id), what="the marker")
    assert len(seen("alpha", "said", event.id)) == 1
    assert len(seen("beta", "said", event.id)) == 1  # beta's queue took its task at once


def test_two_workers_of_one_group_share_its_events_once_each(cluster: Cluster) -> None:
    second = cluster.start("alpha")
    events = [Said(text=f"shared {i}") for i in range(40)]
    for event in events:
        cluster.publish(event)
    for event in events:
        wait_for(lambda e=event: seen("alpha", "said", e.id), what=f"event {event.text}")
    assert all(len(seen("alpha", "said", e.id)) == 1 for e in events)
    pids = {seen("alpha", "said", e.id)[0]["pid"] for e in events}
    first = cluster.workers["alpha"][0]
    assert pids & first.pids and pids & second.pids, pids


def test_a_group_with_no_worker_gets_its_events_when_one_starts(cluster: Cluster) -> None:
    events = [Said(text=f"while gamma was away {i}") for i in range(5)]
    for event in events:
        cluster.publish(event)
    wait_for(lambda: all(seen("alpha", "said", e.id) for e in events), what="alpha")
    assert not any(seen("gamma", "said", e.id) for e in events)
    cluster.start("gamma")
    wait_for(lambda: all(seen("gamma", "said", e.id) for e in events), what="gamma")
    assert all(len(seen("gamma", "said", e.id)) == 1 for e in events)


def test_bad_messages_are_dead_lettered_and_the_rest_still_flow(cluster: Cluster) -> None:
    producer = cluster.producer
    exchange = events_exchange("redis" if cluster.broker_name == "redis" else "amqp")
    big = {"type": "Said", "v": 1, "data": {"text": "x" * (1024 * 1024 + 10)}}
    with Connection(producer.settings.broker()) as conn:
        publish = Producer(conn).publish
        rk = topology.EVENTS_ROUTING_KEY
        publish(
            b"{not json",
            exchange=exchange,
            routing_key=rk,
            content_type="application/json",
            content_encoding="utf-8",
        )
        publish({"type": "Said"}, exchange=exchange, routing_key=rk, serializer="pickle")
        publish(
            {"type": "NoSuchEvent", "v": 1, "data": {}},
            exchange=exchange,
            routing_key=rk,
            serializer="json",
        )
        publish(
            {"type": "Said", "v": 1, "data": {"text": 5}},
            exchange=exchange,
            routing_key=rk,
            serializer="json",
        )
        publish(big, exchange=exchange, routing_key=rk, serializer="json")
    after = Said(text="still flowing")
    cluster.publish(after)
    wait_for(lambda: seen("alpha", "said", after.id), what="the good event after the bad ones")

    def alpha_invalid() -> list[str]:
        letters = cluster.dead_letters()
        found = [d.reason for d in letters if d.group == "alpha" and d.kind == "invalid_message"]
        return found if len(found) >= 5 else []

    reasons = wait_for(alpha_invalid, what="five dead letters from alpha")
    joined = "\n".join(reasons)
    assert "body is not JSON" in joined
    assert "content type 'application/x-python-serialize' is refused" in joined
    assert "unknown event type 'NoSuchEvent'" in joined
    assert "text" in joined  # the field that failed validation
    assert "over the 1048576 byte limit" in joined


def test_a_lost_redis_binding_is_put_back_by_the_workers(cluster: Cluster) -> None:
    if cluster.broker_name != "redis":
        pytest.skip("RabbitMQ keeps durable bindings itself")
    key = f"_kombu.binding.{topology.EVENTS_EXCHANGE}"
    client = cluster.producer.celery.connection_for_write().default_channel.client
    client.delete(key)  # as an eviction or a FLUSHDB would
    # Every running group's workers put their own binding back; until then
    # that group misses events, so later tests must not start before.
    wanted = {topology.group_queue_name(g).encode() for g in cluster.workers}
    wait_for(
        lambda: wanted <= {m.rsplit(b"\x16", 1)[-1] for m in client.smembers(key)},
        timeout=30,
        what="every group's binding to come back",
    )
    event = Said(text="after the rebind")
    cluster.publish(event)
    wait_for(lambda: seen("alpha", "said", event.id), what="an event after the rebind")


def test_a_web_process_streams_one_sessions_events_as_workers_publish_them(
    cluster: Cluster,
) -> None:
    bus = cluster.producer.message_bus

    async def stream() -> list[Chained]:
        got: list[Chained] = []
        try:
            async with bus.subscribe(Chained, session_id="web-1") as events:
                await bus.publish(Said(text="chain for someone else", session_id="web-2"))
                await bus.publish(Said(text="chain for me", session_id="web-1"))
                async for event in events:
                    got.append(event)
                    break
        finally:
            await bus.aclose()
        return got

    got = asyncio.run(asyncio.wait_for(stream(), timeout=60))
    assert [(e.text, e.shout, e.session_id) for e in got] == [
        ("chain for me", "CHAIN FOR ME", "web-1")
    ]
