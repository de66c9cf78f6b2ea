"""Events on RabbitMQ: llmgine-celery against plain Celery and raw kombu, side by side.

Two phases, in one run, on the same broker:

* publish: ``--publish-n`` events of ``--payload-bytes`` published with
  llmgine-celery's ``await message_bus.publish(event)`` (``--in-flight`` at once
  from one event loop), then the same JSON bodies with raw kombu and a
  synchronous publisher confirm per message. No consumer is attached; each
  side's three queues must then hold exactly every message.
* end to end: ``--events`` events to three subscriber groups, one worker each
  (handlers count their runs in Redis), against plain Celery doing the same
  fan-out by hand (one ``apply_async`` per group per event) and a raw kombu
  fanout consumed by counting kombu processes.

Lost or doubled messages exit with status 1; goals are reported, never enforced.

Run from the repository root: ``.venv/bin/python bench/events.py``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kombu.connection import Connection
from kombu.exceptions import OperationalError
from redis import RedisError

from bench import rabbit
from bench.apps import counting
from bench.apps.counting import GROUPS
from bench.event_sides import (
    RAW_CONFIRM_EXCHANGE,
    RAW_FANOUT_EXCHANGE,
    CountedSide,
    LlmgineProducer,
    PublishSide,
    RawPublisher,
    RawSide,
    claim_all,
    llmgine_done_key,
    llmgine_queues,
    raw_fanout_queues,
    raw_queues,
)
from bench.report import Sample, measure, rate, rate_rows, ratio_line
from bench.workers import (
    BenchError,
    Worker,
    add_worker_options,
    configure_environment,
    load_average,
    log,
    running_workers,
)
from llmgine_celery.bus import topology
from llmgine_celery.errors import LLMgineError
from llmgine_celery.settings import redact_url

LLMGINE_APP = "bench.apps.llmgine_events"
PLAIN_APP = "bench.apps.plain_events"
PUBLISH_GOAL = 3.0
E2E_GOAL = 1.0
#: messages of each side's (untimed) warm-up
WARMUP = 300

Results = dict[str, list[Sample]]


class E2ESide(Protocol):
    label: str
    workers: list[Worker]

    @property
    def deliveries_per_event(self) -> int: ...

    def start_round(self, count: int) -> None: ...

    def run(self) -> float: ...

    def finish_round(self) -> list[str]: ...


# -- phase 1: publishing ---------------------------------------------------------


def publish_round(side: PublishSide, count: int, channel: Any) -> tuple[Sample, list[str]]:
    rabbit.purge(channel, side.queues)
    items = side.make(count)
    sample = measure([], count, lambda: side.send(items))
    problem = rabbit.wait_depths(channel, side.queues, count)
    rabbit.purge(channel, side.queues)
    log(f"  {side.label:<44} {rate(sample):8.0f} msgs/s  ({sample.wall:.2f}s)")
    return sample, [f"{side.label}: {problem}"] if problem else []


def publish_phase(
    producer: LlmgineProducer,
    raw: RawPublisher,
    channel: Any,
    args: argparse.Namespace,
    not_llmgine: Sequence[int],
) -> tuple[Results, str, list[str]]:
    """Warm-up, then ``--rounds`` rounds of both sides; also whether llmgine confirmed.

    ``not_llmgine``: local ports of this process's broker connections that are not
    llmgine-celery's (left out when looking for channels in confirm mode).
    """
    sides = [
        PublishSide(
            f"llmgine-celery publish ({args.in_flight} in flight)",
            llmgine_queues()[0],
            producer.events,
            lambda events: producer.publish(events, args.in_flight),
        ),
        PublishSide(
            "raw kombu, confirm_publish (sync)",
            [q.name for q in raw_queues(RAW_CONFIRM_EXCHANGE, GROUPS)],
            producer.envelopes,
            raw.publish,
        ),
    ]
    results: Results = {side.label: [] for side in sides}
    problems = [p for side in sides for p in publish_round(side, WARMUP, channel)[1]]
    confirm = "not checked"
    for round_no in range(args.rounds):
        for side in sides if round_no % 2 == 0 else reversed(sides):
            sample, found = publish_round(side, args.publish_n, channel)
            results[side.label].append(sample)
            problems += found
            if side is sides[0] and round_no == 0:
                confirm = rabbit.confirm_mode(args.broker, [raw.port(), *not_llmgine])
    return results, confirm, problems


# -- phase 2: end to end -----------------------------------------------------------


def worker_specs(
    producer: LlmgineProducer, plain: ModuleType
) -> tuple[list[tuple[str, str, Any]], dict[str, list[str]]]:
    """(label, app spec, Celery app) of every worker, and the queues each consumes."""
    llmgine_module = producer.module
    specs, queues = [], {}
    for group in GROUPS:
        label = f"llmgine-{group}"
        app_spec = f"{LLMGINE_APP}:{llmgine_module.CELERY_ATTRS[group]}"
        specs.append((label, app_spec, producer.apps[group].celery))
        queues[label] = [topology.handler_queue_name(group)]
    for group in GROUPS:
        label = f"plain-{group}"
        specs.append((label, f"{PLAIN_APP}:{plain.CELERY_ATTRS[group]}", plain.apps[group]))
        queues[label] = [plain.queue_name(group)]
    return specs, queues


def e2e_sides(
    producer: LlmgineProducer,
    plain: ModuleType,
    workers: dict[str, Worker],
    raw: RawPublisher,
    channel: Any,
    args: argparse.Namespace,
) -> list[E2ESide]:
    tasks = [plain.tasks[g] for g in GROUPS]

    def send_plain(envelopes: Sequence[dict[str, Any]]) -> None:
        for envelope in envelopes:
            for task in tasks:
                task.apply_async(args=[envelope], ignore_result=True)

    event_queues, handler_queues = llmgine_queues()
    return [
        CountedSide(
            "llmgine-celery (3 groups, 3 workers)",
            "llmgine",
            channel,
            event_queues + handler_queues,
            producer.events,
            lambda events: producer.publish(events, args.in_flight),
            lambda event: str(event.id),
            [workers[f"llmgine-{g}"] for g in GROUPS],
            leftover_key=llmgine_done_key,
        ),
        CountedSide(
            "plain Celery (3 apply_async per event)",
            "plain",
            channel,
            [plain.queue_name(g) for g in GROUPS],
            producer.envelopes,
            send_plain,
            lambda envelope: str(envelope["data"]["id"]),
            [workers[f"plain-{g}"] for g in GROUPS],
        ),
        RawSide(
            f"raw kombu fanout ({args.raw_queues} queues, 1 process each)",
            args.broker,
            channel,
            raw,
            [q.name for q in raw_fanout_queues(args.raw_queues)],
            producer.envelopes,
            args.logdir,
        ),
    ]


def e2e_round(side: E2ESide, count: int) -> tuple[Sample, list[str]]:
    try:
        side.start_round(count)
        deliveries = count * side.deliveries_per_event
        sample = measure(list(side.workers), deliveries, side.run)
        problems = side.finish_round()
    finally:
        if isinstance(side, RawSide):
            side.stop()
    log(f"  {side.label:<44} {rate(sample):8.0f} deliveries/s  ({sample.wall:.2f}s)")
    return sample, problems


def e2e_phase(sides: list[E2ESide], args: argparse.Namespace) -> tuple[Results, list[str]]:
    """A warm-up of the worker sides, then ``--rounds`` rounds, the order alternating."""
    problems: list[str] = []
    for side in sides:
        if not isinstance(side, RawSide):  # raw consumers are fresh processes every round
            problems += [f"warm-up: {p}" for p in e2e_round(side, WARMUP)[1]]
    results: Results = {side.label: [] for side in sides}
    for round_no in range(args.rounds):
        for side in sides if round_no % 2 == 0 else reversed(sides):
            sample, found = e2e_round(side, args.events)
            results[side.label].append(sample)
            problems += found
        log(f"round {round_no + 1}/{args.rounds} done")
    return results, problems


# -- report --------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    publish: Results,
    e2e: Results,
    notes: dict[str, str],
) -> list[str]:
    llm_pub, raw_pub = list(publish)
    llm_e2e, plain_e2e, raw_e2e = list(e2e)
    return [
        f"broker {redact_url(args.broker)}  backend/counters {redact_url(args.backend)}  "
        f"host CPUs {os.cpu_count()}",
        f"workers: celery -P {args.pool} -c {args.concurrency} --without-gossip "
        "--without-mingle --without-heartbeat, one per group and side",
        f"payload {args.payload_bytes} B per event; rounds {args.rounds} after a warm-up "
        "(medians shown; side order alternates)",
        f"load average (1/5/15 min) before {notes['load']}, after {load_average()}",
        f"other queues bound to {topology.EVENTS_EXCHANGE} (each got a copy of every "
        f"llmgine event): {notes['others']}",
        "CPU seconds per run: prod = this process, wrk = the side's worker/consumer "
        "processes, rest = the rest of the host (RabbitMQ, Redis, anything else); "
        "us/call = CPU us of prod + wrk per message (publish) or delivery (end to end)",
        "",
        f"Publish: {args.publish_n} events per run, no consumer attached; each side's "
        "3 queues then held exactly that many",
        *rate_rows(publish, "msgs/s", 44),
        ratio_line(publish, llm_pub, raw_pub, "raw kombu", PUBLISH_GOAL),
        f"llmgine-celery's publishing channels in confirm mode: {notes['confirm']}",
        "",
        f"End to end: {args.events} events x 3 groups = {args.events * 3} deliveries per run "
        "(raw: x queues), from the first publish until every run is counted",
        *rate_rows(e2e, "deliv/s", 44),
        ratio_line(e2e, llm_e2e, plain_e2e, "plain Celery", E2E_GOAL),
        ratio_line(e2e, llm_e2e, raw_e2e, "raw kombu", None),
    ]


# -- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_worker_options(parser, threads_help="threads of each worker")
    parser.add_argument("--events", type=int, default=10_000, help="events per end-to-end run")
    parser.add_argument("--publish-n", type=int, default=10_000, help="events per publish run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=500, help="llmgine publishes at once")
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument("--raw-queues", type=int, default=3, help="queues of the raw fanout")
    args = parser.parse_args(argv)
    if min(args.events, args.publish_n, args.rounds, args.concurrency, args.in_flight) < 1:
        parser.error("--events, --publish-n, --rounds, --concurrency, --in-flight must be >= 1")
    if not 1 <= args.raw_queues <= 16:
        parser.error("--raw-queues must be 1..16")
    if not args.broker.startswith(("amqp://", "amqps://", "pyamqp://")):
        parser.error("--broker must be RabbitMQ (amqp://...)")
    if not args.backend.startswith(("redis://", "rediss://")):
        parser.error("--backend must be Redis: the handlers count their runs there")
    return args


def configure(args: argparse.Namespace) -> None:
    """Settings of the apps and the counters, here and in every worker started later."""
    configure_environment(args)
    os.environ[counting.REDIS_URL_ENV] = args.backend
    os.environ[counting.PREFIX_ENV] = f"bench:events:{os.getpid()}"


def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Both phases; the report and the problems found (lost or doubled messages)."""
    notes = {"load": load_average()}
    plain = importlib.import_module(PLAIN_APP)
    args.logdir = Path(tempfile.mkdtemp(prefix="bench-events-"))
    log(f"worker logs in {args.logdir}")
    with ExitStack() as stack:
        admin = stack.enter_context(Connection(args.broker))
        channel = admin.default_channel
        producer = LlmgineProducer(importlib.import_module(LLMGINE_APP), args.payload_bytes)
        stack.callback(producer.close)
        producer.bootstrap()
        claim_all(channel, producer.apps.values(), plain.apps.values(), args.raw_queues)
        others = rabbit.other_bound_queues(
            args.broker, topology.EVENTS_EXCHANGE, llmgine_queues()[0]
        )
        notes["others"] = "unknown (needs a local rabbitmqctl)"
        if others is not None:
            before = rabbit.snapshot(channel, others)
            stack.callback(
                lambda: notes.update(others=rabbit.tidy(channel, before, producer.published))
            )
        raw_confirm = RawPublisher(args.broker, RAW_CONFIRM_EXCHANGE, confirm=True)
        stack.callback(raw_confirm.close)
        log("publish phase")
        publish, notes["confirm"], problems = publish_phase(
            producer, raw_confirm, channel, args, [rabbit.local_port(admin)]
        )
        raw_fanout = RawPublisher(args.broker, RAW_FANOUT_EXCHANGE, confirm=False)
        stack.callback(raw_fanout.close)
        specs, queues = worker_specs(producer, plain)
        workers = stack.enter_context(running_workers(specs, args, args.logdir, queues))
        rabbit.wait_consumers(channel, [q for names in queues.values() for q in names])
        rabbit.wait_consumers(channel, llmgine_queues()[0])  # the consumer steps
        log("end-to-end phase")
        sides = e2e_sides(producer, plain, workers, raw_fanout, channel, args)
        for side in sides:
            if isinstance(side, CountedSide):
                stack.callback(side.clean)
        e2e, found = e2e_phase(sides, args)
    return report(args, publish, e2e, notes), problems + found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure(args)
    try:
        lines, problems = run(args)
    except (BenchError, LLMgineError, OperationalError, RedisError, OSError) as exc:
        log(f"benchmark failed: {exc}")
        return 1
    print("\n".join(lines))
    if problems:
        print("\nLOST OR DOUBLED:\n" + "\n".join(f"  {p}" for p in problems))
        return 1
    print("\nnothing lost or doubled: every queue held and every group counted each event once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
