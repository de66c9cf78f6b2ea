"""The sides of ``bench/events.py``: how each publishes, and how each delivers end to end.

Publish phase: ``PublishSide`` (llmgine-celery ``publish`` from one event loop,
raw kombu with a synchronous confirm per message). End to end: ``CountedSide``
(llmgine-celery and plain Celery; handlers count their runs in Redis) and
``RawSide`` (plain kombu consumer processes that count what they receive).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from bench import rabbit
from bench.apps import counting
from bench.apps.counting import GROUPS
from bench.workers import BenchError, Worker, claim_queue, start_process, stop_all, unlink_keys
from llmgine_celery.bus import topology
from llmgine_celery.bus.events import group_queue
from llmgine_celery.messages.envelope import encode

RAW_CONFIRM_EXCHANGE = "bench.raw.confirm"
RAW_FANOUT_EXCHANGE = "bench.raw.fanout"
#: seconds after the last handler run in which a late extra copy is still caught
SETTLE = 1.0


def raw_queues(exchange: str, names: Sequence[str]) -> list[Queue]:
    """Durable queues ``<exchange>.<name>`` bound to the durable fanout ``exchange``."""
    fanout = Exchange(exchange, type="fanout", durable=True)
    return [Queue(f"{exchange}.{name}", fanout, durable=True) for name in names]


def llmgine_queues() -> tuple[list[str], list[str]]:
    """(the groups' event queues, their handler queues)."""
    return (
        [topology.group_queue_name(g) for g in GROUPS],
        [topology.handler_queue_name(g) for g in GROUPS],
    )


def raw_fanout_queues(count: int) -> list[Queue]:
    """The end-to-end raw side's queues ``bench.raw.fanout.q1`` .. ``q<count>``."""
    return raw_queues(RAW_FANOUT_EXCHANGE, [f"q{i + 1}" for i in range(count)])


def claim_all(
    channel: Any, llmgine_apps: Iterable[Any], plain_apps: Iterable[Any], raw_count: int
) -> None:
    """Declare and purge every queue used here; refuse any that someone consumes.

    Not ``llmgine.commands`` (the apps' shared default queue; unused here).
    """
    handler_queues = llmgine_queues()[1]
    bound = [group_queue(g, "amqp") for g in GROUPS]
    for app in llmgine_apps:
        bound += [q for q in app.celery.conf.task_queues if q.name in handler_queues]
    for app in plain_apps:
        bound += list(app.conf.task_queues)
    bound += raw_queues(RAW_CONFIRM_EXCHANGE, GROUPS)
    bound += raw_fanout_queues(raw_count)
    for queue in bound:
        claim_queue(queue(channel))


def drain_timeout(deliveries: int) -> float:
    """Seconds a run may take before what has not arrived counts as lost."""
    return 60.0 + deliveries / 100


# -- publishing --------------------------------------------------------------


class LlmgineProducer:
    """The three llmgine-celery applications, driven from one persistent event loop."""

    def __init__(self, module: ModuleType, payload_bytes: int) -> None:
        self.module = module
        self.apps = module.apps
        self.payload = "e" * payload_bytes
        self.loop = asyncio.new_event_loop()
        #: events published to the events exchange so far
        self.published = 0

    def bootstrap(self) -> None:
        """Declare every application's queues (no embedded worker: env says so)."""
        for app in self.apps.values():
            self.loop.run_until_complete(app.bootstrap())

    def close(self) -> None:
        try:
            for app in self.apps.values():
                self.loop.run_until_complete(app.shutdown())
        finally:
            self.loop.close()

    def events(self, count: int) -> list[Any]:
        return [self.module.EventsBenchTick(payload=self.payload) for _ in range(count)]

    def envelopes(self, count: int) -> list[dict[str, Any]]:
        """What llmgine-celery would put on the wire for ``count`` fresh events."""
        return [encode(event) for event in self.events(count)]

    def publish(self, events: Sequence[Any], in_flight: int) -> None:
        self.published += len(events)
        self.loop.run_until_complete(self._publish(events, in_flight))

    async def _publish(self, events: Sequence[Any], in_flight: int) -> None:
        bus = self.apps[GROUPS[0]].message_bus
        for start in range(0, len(events), in_flight):
            await asyncio.gather(*(bus.publish(e) for e in events[start : start + in_flight]))


class RawPublisher:
    """kombu publishing JSON bodies to a fanout exchange, optionally confirming each."""

    def __init__(self, broker: str, exchange: str, confirm: bool) -> None:
        options = {"confirm_publish": True} if confirm else {}
        self.connection = Connection(broker, transport_options=options)
        self.connection.ensure_connection(max_retries=1)
        self.producer = self.connection.Producer(serializer="json")
        self.exchange = Exchange(exchange, type="fanout", durable=True)

    def publish(self, bodies: Sequence[dict[str, Any]]) -> None:
        for body in bodies:
            self.producer.publish(body, exchange=self.exchange, routing_key="", delivery_mode=2)

    def port(self) -> int:
        return rabbit.local_port(self.connection)

    def close(self) -> None:
        self.connection.release()


@dataclass
class PublishSide:
    """One line of the publish table: make ``n`` messages, then send them (timed)."""

    label: str
    #: queues that must each hold every message afterwards
    queues: list[str]
    make: Callable[[int], Sequence[Any]]
    send: Callable[[Sequence[Any]], None]


# -- end to end: handlers that count in Redis ----------------------------------


@dataclass
class CountedSide:
    """A side whose handlers count their runs in Redis (llmgine-celery, plain Celery)."""

    label: str
    side: str
    channel: Any
    #: every queue the side's messages pass through (empty after a run)
    queues: list[str]
    make: Callable[[int], Sequence[Any]]
    send: Callable[[Sequence[Any]], None]
    #: the event id of a made item
    id_of: Callable[[Any], str]
    workers: list[Worker]
    #: Redis keys one handler run leaves besides the counters, per (event id, group)
    leftover_key: Callable[[str, str], str] | None = None
    _ids: list[str] = field(default_factory=list)
    _items: Sequence[Any] = ()

    @property
    def deliveries_per_event(self) -> int:
        return len(GROUPS)

    def start_round(self, count: int) -> None:
        rabbit.purge(self.channel, self.queues)
        self.clean()
        self._items = self.make(count)
        self._ids = [self.id_of(item) for item in self._items]

    def run(self) -> float:
        """Seconds from the first publish until every handler run is counted."""
        start = time.perf_counter()
        self.send(self._items)
        wait_counts(self.side, len(self._items), drain_timeout(len(self._items) * len(GROUPS)))
        return time.perf_counter() - start

    def finish_round(self) -> list[str]:
        time.sleep(SETTLE)  # a late extra run would show now
        for worker in self.workers:
            worker.check_alive()
        problems = [p for group in GROUPS for p in self._check(group)]
        for name in self.queues:
            messages = rabbit.queue_state(self.channel, name)[0]
            if messages:
                problems.append(f"{self.label}: {messages} messages left in {name}")
        self.clean()
        return problems

    def _check(self, group: str) -> list[str]:
        client = counting.client()
        runs = int(client.get(counting.runs_key(self.side, group)) or 0)
        members = client.smembers(counting.ids_key(self.side, group))
        seen = {m.decode() if isinstance(m, bytes) else m for m in members}
        lost, strange = len(set(self._ids) - seen), len(seen - set(self._ids))
        if runs == len(self._ids) and not lost and not strange:
            return []
        return [
            f"{self.label}, group {group}: {runs} runs for {len(self._ids)} events, "
            f"{lost} events never handled, {strange} unknown ids, {runs - len(seen)} extra runs"
        ]

    def clean(self) -> None:
        """Delete the counters and whatever the handler runs of this round left."""
        client = counting.client()
        keys = [k(self.side, g) for g in GROUPS for k in (counting.runs_key, counting.ids_key)]
        if self.leftover_key is not None:
            keys += [self.leftover_key(i, g) for i in self._ids for g in GROUPS]
        unlink_keys(client, keys)


def wait_counts(side: str, expected: int, timeout: float) -> None:
    """Poll the run counters of every group until each reaches ``expected`` (or timeout)."""
    client, keys = counting.client(), [counting.runs_key(side, g) for g in GROUPS]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(int(v or 0) >= expected for v in client.mget(keys)):
            return
        time.sleep(0.01)


def llmgine_done_key(event_id: str, group: str) -> str:
    """The result-backend key marking a handler run as done (see ``handler_tasks``)."""
    task_id = topology.handler_task_id(event_id, group, "count")
    return topology.DONE_KEY_PREFIX + task_id


# -- end to end: raw kombu -----------------------------------------------------


@dataclass
class RawSide:
    """A fanout exchange and queues consumed by counting kombu processes (one each)."""

    label: str
    broker: str
    channel: Any
    publisher: RawPublisher
    queues: list[str]
    make: Callable[[int], list[dict[str, Any]]]
    logdir: Path
    workers: list[Worker] = field(default_factory=list)
    _items: list[dict[str, Any]] = field(default_factory=list)
    _round: int = 0

    @property
    def deliveries_per_event(self) -> int:
        return len(self.queues)

    def start_round(self, count: int) -> None:
        rabbit.purge(self.channel, self.queues)
        self._items = self.make(count)
        self._round += 1
        for index, name in enumerate(self.queues):
            self.workers.append(self._consumer(index, name, count))
        rabbit.wait_consumers(self.channel, self.queues)

    def _consumer(self, index: int, queue: str, count: int) -> Worker:
        label = f"raw-{index + 1}-r{self._round}"
        command = [
            *(sys.executable, "-m", "bench.apps.raw_consumer", "--broker", self.broker),
            *("--queue", queue, "--expect", str(count)),
            *("--result", str(self._result(label)), "--settle", str(SETTLE)),
        ]
        return start_process(label, label, command, self.logdir)

    def _result(self, label: str) -> Path:
        return self.logdir / f"{label}.jsonl"

    def _records(self, key: str) -> list[dict[str, Any]]:
        """The ``key`` record of every consumer that wrote one."""
        found = []
        for worker in self.workers:
            path = self._result(worker.label)
            lines = path.read_text().splitlines() if path.exists() else []
            found += [r for r in map(json.loads, lines) if key in r]
        return found

    def run(self) -> float:
        """Seconds from the first publish until the last consumer got its last message."""
        start = time.time()
        self.publisher.publish(self._items)
        deadline = time.monotonic() + drain_timeout(len(self._items) * len(self.queues))
        while time.monotonic() < deadline:
            done = self._records("done_at")
            if len(done) == len(self.workers):
                return float(max(r["done_at"] for r in done)) - start
            if len(self._records("count")) == len(self.workers):
                break  # every consumer gave up
            for worker in self.workers:
                worker.check_alive()
            time.sleep(0.01)
        return time.time() - start

    def finish_round(self) -> list[str]:
        deadline = time.monotonic() + SETTLE + 30
        while len(self._records("count")) < len(self.workers):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: consumers did not report their counts")
            for worker in self.workers:
                worker.check_alive()
            time.sleep(0.05)
        expected = len(self._items)
        problems = [
            f"{self.label}: a consumer got {r['count']} messages, {r['distinct']} distinct, "
            f"of {expected}"
            for r in self._records("count")
            if r["count"] != expected or r["distinct"] != expected
        ]
        self.stop()
        return problems

    def stop(self) -> None:
        workers, self.workers = self.workers, []
        stop_all(workers)
