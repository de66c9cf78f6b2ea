"""What one command costs a worker: llmgine-celery's and plain Celery's, alone.

``commands.py`` measures producer, worker, RabbitMQ and Redis at once, sharing
two cores. This isolates the workers. Per round, each side's worker is started on an
idle queue and pinged until it answers, and ``--n`` echo commands (1 KB
payloads) are queued for each. Then both workers are told to consume them
(``add_consumer``) at once, and each one's CPU is counted until the first side
has every result in Redis: both ran under the same conditions, which on a
shared machine matters more than running alone. Nobody waits on the results
meanwhile, so no producer shares the CPU.

``--versus-checkout PATH`` compares this code's worker with another checkout's
instead (each side on its own RabbitMQ vhost): ``git worktree add /tmp/base
HEAD~1`` then ``--versus-checkout /tmp/base`` measures what a change did.

Run from the repository root: ``.venv/bin/python bench/worker_cost.py --rounds 4``.
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
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from pydantic import SecretStr

from bench.workers import (
    REPO_ROOT,
    BenchError,
    Worker,
    add_versus_checkout,
    add_worker_options,
    check_versus_checkout,
    claim_queue,
    load_average,
    log,
    run_main,
    start_worker,
    stop_all,
    unlink_keys,
    vhost_url,
    wait_ready,
)
from llmgine_celery import ApplicationConfig, Settings
from llmgine_celery.settings import redact_url

LLMGINE_APP = "bench.apps.llmgine_echo"
PLAIN_APP = "bench.apps.plain_echo"
#: seconds a worker may take to store every result
DRAIN_TIMEOUT = 300.0
#: result keys asked about per Redis round trip while polling
EXISTS_CHUNK = 500


def stored(client: redis.Redis, keys: Sequence[str | bytes]) -> int:
    """How many of ``keys`` exist, asked a chunk at a time."""
    return sum(
        int(client.exists(*keys[i : i + EXISTS_CHUNK])) for i in range(0, len(keys), EXISTS_CHUNK)
    )


def all_stored(client: redis.Redis, keys: Sequence[str | bytes]) -> bool:
    """Whether every key exists; the last queued are asked first, in one round trip.

    Polled every 20 ms while the workers are measured: asking about every key
    each time would load the Redis both sides share.
    """
    tail = keys[-EXISTS_CHUNK:]
    return stored(client, tail) == len(tail) and stored(client, keys) == len(keys)


@dataclass
class Side:
    """One contestant: its Celery app here, how to queue its commands, its worker."""

    label: str
    celery: Any
    fill: Callable[[Sequence[str]], list[str]]
    #: what its worker runs (``celery -A``), and with what extra environment
    app_spec: str
    env: dict[str, str]
    #: the folder its worker runs in, whose code it imports
    code: Path
    worker: Worker | None = None
    keys: list[Any] = field(default_factory=list)

    @property
    def idle_queue(self) -> str:
        return f"bench.idle.{self.label}"

    def start(self, args: argparse.Namespace, logdir: Path) -> None:
        """Claim (declare, purge) its queues and start its worker on an idle queue."""
        with self.celery.connection_for_write() as conn:
            for declared in self.celery.conf.task_queues:
                claim_queue(declared(conn.default_channel))
        queues = [self.idle_queue]
        self.worker = start_worker(
            self.label, self.app_spec, args, logdir, queues, self.env, self.code
        )

    def stop(self) -> None:
        """Stop its worker; purge what it left (the slower side's rest), drop the idle queue."""
        if self.worker is not None:
            stop_all([self.worker])
            self.worker = None
        with self.celery.connection_for_write() as conn:
            for declared in self.celery.conf.task_queues:
                declared(conn.default_channel).purge()
            conn.default_channel.queue_delete(self.idle_queue)


def llmgine_side(
    label: str,
    app: Any,
    echo: type[Any],
    env: dict[str, str],
    app_spec: str,
    code: Path = REPO_ROOT,
) -> Side:
    """An llmgine-celery side: ``echo`` commands queued with ``send`` (nothing waits)."""

    async def send_all(payloads: Sequence[str]) -> list[str]:
        await app.bootstrap()
        try:
            return [app.message_bus.send(echo(payload=p)).command_id for p in payloads]
        finally:
            await app.shutdown()

    def fill(payloads: Sequence[str]) -> list[str]:
        return asyncio.run(send_all(payloads))

    return Side(label, app.celery, fill, app_spec, env, code)


def plain_side(env: dict[str, str]) -> Side:
    """The plain Celery side: ``echo`` tasks queued with ``apply_async``."""
    module = importlib.import_module(PLAIN_APP)

    def fill(payloads: Sequence[str]) -> list[str]:
        return [module.echo.apply_async(args=[p]).id for p in payloads]

    return Side("plain", module.celery, fill, f"{PLAIN_APP}:celery", env, REPO_ROOT)


def sides_of(args: argparse.Namespace) -> list[Side]:
    """llmgine-celery and plain Celery; or this checkout and ``--versus-checkout``."""
    app_spec = f"{LLMGINE_APP}:celery"
    # imported only now: the module builds its app from the environment main() set
    module = importlib.import_module(LLMGINE_APP)
    if args.versus_checkout is None:
        llmgine = llmgine_side("llmgine", module.app, module.Echo, args.env, app_spec)
        return [llmgine, plain_side(args.env)]
    sides = []
    for label, code in (("this", REPO_ROOT), ("checkout", args.versus_checkout)):
        # one vhost each: the two workers must not take each other's commands
        broker = vhost_url(args.broker, f"llmgine-bench-cost-{label}")
        settings = Settings(
            broker_url=SecretStr(broker),
            result_backend=SecretStr(args.backend),
            embedded_worker=False,
        )
        app = module.EchoApp(ApplicationConfig(name="bench-echo", settings=settings))
        # run in ``code`` with only it on PYTHONPATH: the worker imports llmgine_celery
        # and the echo app from there (the working directory comes first on sys.path)
        env = {**args.env, "LLMGINE_BROKER_URL": broker, "PYTHONPATH": str(code)}
        sides.append(llmgine_side(label, app, module.Echo, env, app_spec, code))
    return sides


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
            wait_ready(workers[side.label], side.celery)
            payloads = [f"{side.label}-{round_no}-{i:07d}-".ljust(1024, "x") for i in range(args.n)]
            side.keys = [side.celery.backend.get_key_for_task(i) for i in side.fill(payloads)]
        cpu_before = {label: w.cpu_seconds() for label, w in workers.items()}
        start = time.perf_counter()
        for side in sides:
            side.celery.control.add_consumer(
                side.celery.conf.task_default_queue,
                destination=[workers[side.label].node],
                reply=True,
                timeout=5,
            )
        while not any(all_stored(client, side.keys) for side in sides):
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
            unlink_keys(client, side.keys)  # the results this round stored
        client.close()
    return {label: (done[label] / wall, cpu[label] / done[label] * 1000) for label in done}


def _worker(side: Side) -> Worker:
    if side.worker is None:
        raise BenchError(f"{side.label}: worker not started")
    return side.worker


def run(args: argparse.Namespace) -> list[str]:
    load_before = load_average()
    sides = sides_of(args)
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
        *(
            [f"'this' is {REPO_ROOT}, 'checkout' is {args.versus_checkout}"]
            if args.versus_checkout
            else []
        ),
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
    first, second = (side.label for side in sides)
    ratios = [a / b for a, b in zip(costs[first], costs[second], strict=True)]
    lines.append(
        f"worker CPU per command, {first} / {second}, per round: "
        + " ".join(f"{r:.2f}x" for r in ratios)
        + f"  (median {statistics.median(ratios):.2f}x)"
    )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_worker_options(parser)
    parser.add_argument("--n", type=int, default=8000, help="commands queued per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the workers' environment, e.g. LLMGINE_METRICS=false (repeatable)",
    )
    add_versus_checkout(
        parser,
        "compare this code's worker with the worker of the llmgine-celery checkout at PATH "
        "(e.g. a `git worktree` of an older commit) instead of with plain Celery",
    )
    args = parser.parse_args(argv)
    check_versus_checkout(parser, args)
    pairs = [item.partition("=") for item in args.worker_env]
    if any(not name or not sep for name, sep, _ in pairs):
        parser.error("--worker-env takes NAME=VALUE")
    args.env = {name: value for name, _, value in pairs}
    if args.n < 1 or args.rounds < 1:
        parser.error("need --n >= 1 and --rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
