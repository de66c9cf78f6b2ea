"""What one command costs a worker: llmgine-celery's and plain Celery's, alone.

``commands.py`` measures producer, worker, RabbitMQ and Redis at once, sharing
two cores. This isolates the workers. Per round, each side's worker is started on an
idle queue and pinged until it answers, and ``--n`` echo commands (1 KB
payloads) are queued for each. Then both workers are told to consume them
(``add_consumer``) at once, and each one's CPU is counted until the first side
has every result in Redis: both ran under the same conditions, which on a
shared machine matters more than running alone. Nobody waits on the results
meanwhile, so no producer shares the CPU.

Run from the repository root: ``.venv/bin/python bench/worker_cost.py --rounds 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.workers import (
    BenchError,
    Worker,
    claim_queue,
    configure_environment,
    load_average,
    log,
    start_worker,
    stop_all,
    wait_ready,
)
from llmgine_celery.errors import LLMgineError
from llmgine_celery.settings import redact_url

LLMGINE_APP = "bench.apps.llmgine_echo"
PLAIN_APP = "bench.apps.plain_echo"
#: seconds a worker may take to store every result
DRAIN_TIMEOUT = 300.0
#: result keys asked about per Redis round trip while polling
EXISTS_CHUNK = 500


def fill_llmgine(module: ModuleType, payloads: Sequence[str]) -> list[str]:
    """Queue an ``Echo`` per payload with ``send`` (no result waited for); their ids."""

    async def send_all() -> list[str]:
        await module.app.bootstrap()
        try:
            bus = module.app.message_bus
            return [bus.send(module.Echo(payload=p)).command_id for p in payloads]
        finally:
            await module.app.shutdown()

    return asyncio.run(send_all())


def fill_plain(module: ModuleType, payloads: Sequence[str]) -> list[str]:
    """Queue an ``echo`` task per payload with ``apply_async``; their ids."""
    return [module.echo.apply_async(args=[p]).id for p in payloads]


def stored(client: redis.Redis, keys: Sequence[str | bytes]) -> int:
    """How many of ``keys`` exist, asked a chunk at a time."""
    return sum(
        int(client.exists(*keys[i : i + EXISTS_CHUNK])) for i in range(0, len(keys), EXISTS_CHUNK)
    )


@dataclass
class Side:
    """One contestant: its app module, how to queue its commands, its worker."""

    label: str
    module: ModuleType
    fill: Callable[[ModuleType, Sequence[str]], list[str]]
    worker: Worker | None = None
    keys: list[Any] = field(default_factory=list)

    @property
    def idle_queue(self) -> str:
        return f"bench.idle.{self.label}"

    def start(self, args: argparse.Namespace, logdir: Path) -> None:
        """Claim (declare, purge) its queues and start its worker on an idle queue."""
        celery = self.module.celery
        with celery.connection_for_write() as conn:
            for declared in celery.conf.task_queues:
                claim_queue(declared(conn.default_channel))
        app_spec = f"{self.module.__name__}:celery"
        self.worker = start_worker(self.label, app_spec, args, logdir, [self.idle_queue], args.env)

    def stop(self) -> None:
        """Stop its worker; purge what it left (the slower side's rest), drop the idle queue."""
        if self.worker is not None:
            stop_all([self.worker])
            self.worker = None
        celery = self.module.celery
        with celery.connection_for_write() as conn:
            for declared in celery.conf.task_queues:
                declared(conn.default_channel).purge()
            conn.default_channel.queue_delete(self.idle_queue)


def drain_together(
    sides: Sequence[Side], args: argparse.Namespace, logdir: Path, round_no: int
) -> dict[str, tuple[float, float]]:
    """One round: both workers drain their queues at once, until the first is done.

    Returns, per side, (commands/s, worker CPU ms per command) over that window:
    both sides ran under the same conditions the whole time.
    """
    client = redis.Redis.from_url(args.backend)
    try:
        for side in sides:
            side.start(args, logdir)
        workers = {side.label: _worker(side) for side in sides}
        for side in sides:
            wait_ready(workers[side.label], side.module.celery)
            payloads = [f"{side.label}-{round_no}-{i:07d}-".ljust(1024, "x") for i in range(args.n)]
            ids = side.fill(side.module, payloads)
            side.keys = [side.module.celery.backend.get_key_for_task(i) for i in ids]
        cpu_before = {label: w.cpu_seconds() for label, w in workers.items()}
        start = time.perf_counter()
        for side in sides:
            side.module.celery.control.add_consumer(
                side.module.celery.conf.task_default_queue,
                destination=[workers[side.label].node],
                reply=True,
                timeout=5,
            )
        while not any(stored(client, side.keys) == args.n for side in sides):
            for worker in workers.values():
                worker.check_alive()
            if time.perf_counter() - start > DRAIN_TIMEOUT:
                raise BenchError(f"no side stored every result within {DRAIN_TIMEOUT}s")
            time.sleep(0.02)
        wall = time.perf_counter() - start
        cpu = {label: w.cpu_seconds() - cpu_before[label] for label, w in workers.items()}
        done = {side.label: stored(client, side.keys) for side in sides}
    finally:
        for side in sides:
            side.stop()
        client.close()
    return {label: (done[label] / wall, cpu[label] / done[label] * 1000) for label in done}


def _worker(side: Side) -> Worker:
    if side.worker is None:
        raise BenchError(f"{side.label}: worker not started")
    return side.worker


def run(args: argparse.Namespace) -> list[str]:
    load_before = load_average()
    sides = [
        Side("llmgine", importlib.import_module(LLMGINE_APP), fill_llmgine),
        Side("plain", importlib.import_module(PLAIN_APP), fill_plain),
    ]
    logdir = Path(tempfile.mkdtemp(prefix="bench-worker-cost-"))
    log(f"worker logs in {logdir}")
    rates: dict[str, list[float]] = {side.label: [] for side in sides}
    costs: dict[str, list[float]] = {side.label: [] for side in sides}
    for round_no in range(args.rounds):
        order = sides if round_no % 2 == 0 else list(reversed(sides))
        for label, (rate, cost) in drain_together(order, args, logdir, round_no).items():
            rates[label].append(rate)
            costs[label].append(cost)
            log(f"  {label:<8} {rate:7.0f} commands/s  {cost:.3f} ms of worker CPU each")
    lines = [
        f"broker {redact_url(args.broker)}  backend {redact_url(args.backend)}",
        f"worker -P {args.pool} -c {args.concurrency}, one per side, both draining at once; "
        f"{args.n} queued commands per side and round, {args.rounds} rounds; medians shown",
        f"worker environment: {args.env or 'as configured'}",
        f"load average (1/5/15 min) before {load_before}, after {load_average()}",
        "",
        f"{'side':<10}{'commands/s':>12}{'worker CPU ms/command':>24}   per round (ms)",
    ]
    for side in sides:
        per_round = " ".join(f"{c:.3f}" for c in costs[side.label])
        lines.append(
            f"{side.label:<10}{statistics.median(rates[side.label]):>12.0f}"
            f"{statistics.median(costs[side.label]):>24.3f}   {per_round}"
        )
    ratios = [a / b for a, b in zip(costs["llmgine"], costs["plain"], strict=True)]
    lines.append(
        "worker CPU per command, llmgine / plain, per round: "
        + " ".join(f"{r:.2f}x" for r in ratios)
        + f"  (median {statistics.median(ratios):.2f}x)"
    )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--backend", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, default=8, help="worker threads/processes")
    parser.add_argument("--pool", choices=["threads", "prefork"], default="threads")
    parser.add_argument("--n", type=int, default=8000, help="commands queued per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the workers' environment, e.g. LLMGINE_METRICS=false (repeatable)",
    )
    args = parser.parse_args(argv)
    pairs = [item.partition("=") for item in args.worker_env]
    if any(not name or not sep for name, sep, _ in pairs):
        parser.error("--worker-env takes NAME=VALUE")
    args.env = {name: value for name, _, value in pairs}
    if args.n < 1 or args.rounds < 1:
        parser.error("need --n >= 1 and --rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_environment(args)
    try:
        lines = run(args)
    except (BenchError, LLMgineError) as exc:
        log(f"benchmark failed: {exc}")
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
