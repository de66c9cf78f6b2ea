"""Dead letters through real brokers: list, show, replay and purge, by API and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.messaging import Producer

from llmgine_celery import ApplicationConfig
from llmgine_celery.bus import topology
from llmgine_celery.bus.celery_app import transport_of
from llmgine_celery.bus.dead_letter_admin import list_dead_letters, purge_dead_letters
from llmgine_celery.bus.dead_letters import (
    HANDLER_FAILED,
    INVALID_MESSAGE,
    DeadLetter,
    dead_letter_queue,
    send_dead_letter,
)
from llmgine_celery.bus.events import group_queue
from llmgine_celery.messages.envelope import dump
from tests.integration.replay_apps import (
    BROKEN_KEY,
    GROUP,
    HANDLER,
    RUNS_KEY,
    Fragile,
    Replayer,
    recorder,
)
from tests.support import (
    DEPLOYMENTS,
    REPO,
    WorkerProcess,
    clean_env,
    producer_settings,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.integration

APP = "tests.integration.replay_apps:replayer"


def runs(event_id: str) -> list[dict[str, Any]]:
    """The handler's successful runs of one event."""
    with recorder() as client:
        entries = [json.loads(e) for e in client.lrange(RUNS_KEY, 0, -1)]
    return [e for e in entries if e["id"] == event_id]


def only(ids: list[str], letters: list[DeadLetter]) -> list[DeadLetter]:
    """The records with these ids, in queue order (other processes may add records)."""
    wanted = set(ids)
    return [d for d in letters if d.id in wanted]


@dataclass
class Bench:
    """A producer and one worker of group ``replayer`` on one broker."""

    broker_name: str
    broker: str
    backend: str
    producer: Replayer
    worker: WorkerProcess

    @property
    def celery(self) -> Any:
        return self.producer.celery

    def letters(self) -> list[DeadLetter]:
        return list_dead_letters(self.celery)

    def letters_of(self, event_id: str) -> list[DeadLetter]:
        return [d for d in self.letters() if d.event and d.event["data"]["id"] == event_id]

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """``llmgine-celery dead-letters ARGS`` in a subprocess, as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "llmgine_celery.cli", "dead-letters", *args],
            cwd=REPO,
            env=clean_env(LLMGINE_BROKER_URL=self.broker, LLMGINE_RESULT_BACKEND=self.backend),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def bench(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bench]:
    broker_name = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    tmp = tmp_path_factory.mktemp(f"dead-letters-{broker_name}")
    settings = producer_settings(broker_name, tmp)
    producer = Replayer(ApplicationConfig(name=GROUP, settings=settings))
    producer.declare()
    purge_dead_letters(producer.celery)
    with producer.celery.connection_for_write() as conn:
        for name in (topology.group_queue_name(GROUP), topology.handler_queue_name(GROUP)):
            conn.default_channel.queue_purge(name)
    with recorder() as client:
        client.delete(BROKEN_KEY, RUNS_KEY)
    worker = start_worker(
        "tests.integration.replay_apps:celery",
        broker,
        backend,
        log_dir=tmp,
        extra_args=("-Q", topology.handler_queue_name(GROUP)),
    )
    try:
        yield Bench(broker_name, broker, backend, producer, worker)
    finally:
        worker.stop()
        drop_group_queues(producer)
        with recorder() as client:
            client.delete(BROKEN_KEY)
        producer.celery.close()


def drop_group_queues(producer: Replayer) -> None:
    """Delete this group's queues: bound to the events exchange, they would keep a
    copy of every event later tests publish, with no worker to take them."""
    handlers = topology.handler_queue_name(GROUP)
    queues = [group_queue(GROUP, transport_of(producer.settings.broker()))]
    queues += [q for q in producer.celery.conf.task_queues if q.name == handlers]
    with producer.celery.connection_for_write() as conn:
        for queue in queues:
            bound = queue(conn.default_channel)
            bound.declare()  # kombu's Redis deletes only bindings declared on this connection
            bound.delete()


def test_a_failed_handler_is_listed_shown_and_replayed_to_that_handler(bench: Bench) -> None:
    with recorder() as client:
        client.set(BROKEN_KEY, b"1")
    first, second = Fragile(text="first"), Fragile(text="second")
    bench.producer.message_bus.publish_sync(first)
    bench.producer.message_bus.publish_sync(second)
    [letter] = wait_for(lambda: bench.letters_of(first.id), what="the first dead letter")
    [other] = wait_for(lambda: bench.letters_of(second.id), what="the second dead letter")
    task_id = topology.handler_task_id(first.id, GROUP, HANDLER)
    assert (letter.kind, letter.group, letter.handler, letter.attempts) == (
        HANDLER_FAILED, GROUP, HANDLER, 2,
    )  # fmt: skip
    assert letter.error == "RuntimeError: fragile is broken for first"
    assert letter.task_id == task_id and letter.replayable
    assert "RuntimeError: fragile is broken for first" in (letter.traceback or "")

    before = bench.letters()
    ids = [d.id for d in before]
    assert only(ids, bench.letters()) == before  # listing consumed nothing, kept the order

    listed = bench.cli("list", APP)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [i for i in (ln.split()[0] for ln in lines) if i in ids] == ids
    line = next(ln for ln in lines if ln.startswith(letter.id))
    for part in (HANDLER_FAILED, f"{GROUP}/{HANDLER}", "attempts=2", f"Fragile:{first.id}"):
        assert part in line
    assert letter.dead_lettered_at in line and "failed 2 times" in line

    shown = bench.cli("show", APP, letter.id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == dump(letter)  # traceback and event included
    assert only(ids, bench.letters()) == before
    assert not runs(first.id)

    with recorder() as client:
        client.delete(BROKEN_KEY)
    replayed = bench.cli("replay", APP, letter.id)
    assert replayed.returncode == 0, replayed.stderr
    assert task_id in replayed.stdout
    done = wait_for(lambda: runs(first.id), what="the replayed run")
    assert [r["task_id"] for r in done] == [task_id]
    # Only the replayed record left the queue; the rest kept their order.
    assert only(ids, bench.letters()) == [d for d in before if d.id != letter.id]
    assert other in bench.letters() and not runs(second.id)


def test_listing_keeps_every_record_in_order(bench: Bench) -> None:
    sent = [DeadLetter(kind=INVALID_MESSAGE, reason=f"order {i}", queue="x") for i in range(5)]
    for record in sent:
        send_dead_letter(bench.celery, record)
    first = bench.letters()
    assert only([r.id for r in sent], first) == sent
    assert only([d.id for d in first], bench.letters()) == first


def test_a_message_that_is_no_record_is_reported_not_fatal(bench: Bench) -> None:
    marker = DeadLetter(kind=INVALID_MESSAGE, reason="after the garbage", queue="x")
    queue = dead_letter_queue()
    with Connection(bench.broker) as conn:
        publish = Producer(conn).publish
        publish(
            b"{not json at all",
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            content_type="application/json",
            content_encoding="utf-8",
        )
        publish({"hello": "world"}, exchange=queue.exchange, routing_key=queue.routing_key)
    send_dead_letter(bench.celery, marker)
    letters = bench.letters()
    unreadable = [d for d in letters if d.id.startswith("unreadable-")]
    assert [d.raw for d in unreadable] == ["{not json at all", '{"hello": "world"}']
    assert all(d.kind == INVALID_MESSAGE and not d.replayable for d in unreadable)
    assert "not a dead-letter record" in unreadable[0].reason
    assert only([d.id for d in [*unreadable, marker]], letters) == [*unreadable, marker]
    assert only([d.id for d in letters], bench.letters()) == letters

    listed = bench.cli("list", APP)
    assert listed.returncode == 0, listed.stderr
    assert all(d.id in listed.stdout for d in unreadable)
    refused = bench.cli("replay", APP, unreadable[0].id)
    assert refused.returncode == 2 and "cannot be replayed" in refused.stderr


def test_an_invalid_message_record_cannot_be_replayed(bench: Bench) -> None:
    record = DeadLetter(kind=INVALID_MESSAGE, reason="a truncated event body", queue="x")
    send_dead_letter(bench.celery, record)
    refused = bench.cli("replay", APP, record.id)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"llmgine-celery: dead letter {record.id!r} cannot be replayed: its kind is "
        "'invalid_message' (a truncated event body); only a handler failure with its "
        "event, group and handler can be"
    )
    assert record in bench.letters()


def test_an_unknown_id_fails_with_exit_2_and_one_line(bench: Bench) -> None:
    for action in ("show", "replay"):
        done = bench.cli(action, APP, "no-such-letter")
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1
        assert f"no dead letter 'no-such-letter' on {topology.DEAD_LETTER_QUEUE}" in done.stderr


def test_purge_empties_the_queue_and_reports_the_count(bench: Bench) -> None:
    for i in range(2):
        send_dead_letter(bench.celery, DeadLetter(kind=INVALID_MESSAGE, reason=f"p{i}", queue="x"))
    ids = [d.id for d in bench.letters()]
    declined = bench.cli("purge", APP, stdin="n\n")
    assert declined.returncode == 1
    assert [d.id for d in only(ids, bench.letters())] == ids
    purged = bench.cli("purge", APP, "--yes")
    assert purged.returncode == 0, purged.stderr
    words = purged.stdout.split()
    assert words[0] == "purged" and words[2:] == ["dead", "letter(s)"]
    # Exactly these, unless another process dead-lettered something meanwhile.
    assert int(words[1]) >= len(ids) >= 2
    assert not only(ids, bench.letters())
    listed = bench.cli("list", APP)
    assert listed.returncode == 0 and not any(i in listed.stdout for i in ids)
