"""llmgine-celery ``MessageBus.execute`` versus plain Celery ``apply_async().get()``.

Both sides share the broker, the result backend and the worker settings; each
gets its own worker subprocess (started, pinged until ready and stopped here)
with a trivial echo handler. Per round, alternating which side runs first:

* throughput: ``--n`` concurrent calls, llmgine-celery from one event loop
  (``asyncio.gather``), plain Celery from a thread pool (each ``--threads`` size);
* latency: ``--seq-n`` sequential calls on each side.

``--workers N`` starts N such workers per side (default 1, the issue's setting),
to show which side is bound by its worker and which by its producer.

Every result is checked against its (unique) payload; a missing or wrong one
exits with status 1. Goals are reported, never enforced.

Run from the repository root: ``.venv/bin/python bench/commands.py --rounds 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.report import Sample, header, latency_table, throughput_table
from bench.workers import (
    BenchError,
    SentTasks,
    Worker,
    add_worker_options,
    load_average,
    log,
    prepare_queues,
    run_main,
    running_workers,
)

LLMGINE_APP = "bench.apps.llmgine_echo"
PLAIN_APP = "bench.apps.plain_echo"
#: seconds one call may take before it counts as a missing result
CALL_TIMEOUT = 120.0
#: sequential calls of the warm-up
WARMUP_SEQUENTIAL = 20


# -- the two sides -----------------------------------------------------------


def check(ok: bool, side: str, payload: str, got: Any) -> None:
    if not ok:
        raise BenchError(f"{side}: wrong result for payload {payload[:24]!r}...: {got!r:.300}")


class LlmgineSide:
    """``await app.message_bus.execute(Echo(...))`` on one persistent event loop."""

    def __init__(self, module: ModuleType) -> None:
        self.app = module.app
        self.command = module.Echo
        self.loop = asyncio.new_event_loop()
        self.sent = SentTasks(self.app.celery.backend)

    def bootstrap(self) -> None:
        self.loop.run_until_complete(self.app.bootstrap())

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.app.shutdown())
        finally:
            self.loop.close()

    def burst(self, payloads: Sequence[str]) -> None:
        self.loop.run_until_complete(self._burst(payloads))

    def sequential(self, payloads: Sequence[str]) -> list[float]:
        return self.loop.run_until_complete(self._sequential(payloads))

    async def _call(self, payload: str) -> None:
        command = self.command(payload=payload)
        self.sent.add(command.id)
        result = await self.app.message_bus.execute(command, timeout=CALL_TIMEOUT)
        check(result.success and result.result == payload, "llmgine", payload, result)

    async def _burst(self, payloads: Sequence[str]) -> None:
        await asyncio.gather(*(self._call(p) for p in payloads))

    async def _sequential(self, payloads: Sequence[str]) -> list[float]:
        latencies = []
        for payload in payloads:
            start = time.perf_counter()
            await self._call(payload)
            latencies.append(time.perf_counter() - start)
        return latencies


class PlainSide:
    """``echo.apply_async(args=[payload]).get()``, sequentially or from thread pools."""

    def __init__(self, module: ModuleType) -> None:
        self.task = module.echo
        self.pools: dict[int, ThreadPoolExecutor] = {}
        self.sent = SentTasks(self.task.backend)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(cancel_futures=True)

    def call(self, payload: str) -> None:
        sent = self.task.apply_async(args=[payload])
        self.sent.add(sent.id)
        value = sent.get(timeout=CALL_TIMEOUT)
        check(value == payload, "plain", payload, value)

    def burst(self, threads: int, payloads: Sequence[str]) -> None:
        pool = self.pools.get(threads)
        if pool is None:
            pool = self.pools[threads] = ThreadPoolExecutor(threads, f"plain-{threads}")
        for _ in pool.map(self.call, payloads):
            pass

    def sequential(self, payloads: Sequence[str]) -> list[float]:
        latencies = []
        for payload in payloads:
            start = time.perf_counter()
            self.call(payload)
            latencies.append(time.perf_counter() - start)
        return latencies


# -- measuring ---------------------------------------------------------------


@dataclass(frozen=True)
class Contestant:
    """One line of a table: how to run a phase, and the worker that serves it."""

    label: str
    workers: tuple[Worker, ...]
    throughput: Callable[[Sequence[str]], None] | None = None
    latency: Callable[[Sequence[str]], list[float]] | None = None
    #: deletes the results its calls left in the backend
    forget: Callable[[], None] | None = None

    @property
    def tag(self) -> str:
        """A short name put into this contestant's payloads."""
        return self.label.split()[0]


def measure(workers: Sequence[Worker], payloads: Sequence[str], run: Callable[[], Any]) -> Sample:
    """Run one phase and account its wall time and CPU time."""
    latencies: list[float] = []

    def timed() -> None:
        latencies.extend(run() or ())

    sample = report.measure(workers, len(payloads), timed)
    return dataclasses.replace(sample, latencies=tuple(latencies))


def make_payloads(tag: str, count: int, size: int) -> list[str]:
    """``count`` distinct ASCII strings of exactly ``size`` bytes."""
    return [f"{tag}-{i:07d}-".ljust(size, "x")[:size] for i in range(count)]


def warm_up(contestants: Sequence[Contestant], args: argparse.Namespace) -> None:
    """Open every connection and start every thread before anything is timed."""
    burst = max(200, args.n // 5)
    for c in contestants:
        if c.throughput is not None:
            c.throughput(make_payloads(f"warm-{c.tag}", burst, args.payload_bytes))
        if c.latency is not None:
            c.latency(make_payloads(f"warmseq-{c.tag}", WARMUP_SEQUENTIAL, args.payload_bytes))


def run_rounds(
    contestants: Sequence[Contestant], args: argparse.Namespace
) -> tuple[dict[str, list[Sample]], dict[str, list[Sample]]]:
    """Every round: throughput then latency, the order of sides alternating."""
    throughput: dict[str, list[Sample]] = {c.label: [] for c in contestants if c.throughput}
    latency: dict[str, list[Sample]] = {c.label: [] for c in contestants if c.latency}
    for round_no in range(args.rounds):
        order = list(contestants) if round_no % 2 == 0 else list(reversed(contestants))
        for c in order:
            if c.throughput is not None:
                throughput[c.label].append(_phase(c, c.throughput, f"r{round_no}", args.n, args))
        for c in order:
            if c.latency is not None:
                latency[c.label].append(_phase(c, c.latency, f"s{round_no}", args.seq_n, args))
        log(f"round {round_no + 1}/{args.rounds} done")
    return throughput, latency


def _phase(
    c: Contestant,
    run: Callable[[Sequence[str]], Any],
    tag: str,
    count: int,
    args: argparse.Namespace,
) -> Sample:
    payloads = make_payloads(f"{tag}-{c.tag}", count, args.payload_bytes)
    sample = measure(c.workers, payloads, lambda: run(payloads))
    if c.forget is not None:
        c.forget()
    log(f"  {c.label:<28} {count / sample.wall:8.0f} calls/s  ({sample.wall:.2f}s)")
    return sample


# -- main --------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_worker_options(parser)
    parser.add_argument("--workers", type=int, default=1, help="worker processes per side")
    parser.add_argument("--n", type=int, default=1000, help="concurrent calls per throughput run")
    parser.add_argument("--seq-n", type=int, default=300, help="calls per latency run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument(
        "--threads",
        default="16,32,64",
        help="comma-separated thread pool sizes tried for plain Celery (best one is compared)",
    )
    args = parser.parse_args(argv)
    args.thread_counts = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    if args.payload_bytes < 32 or args.n < 1 or args.seq_n < 2 or args.rounds < 1:
        parser.error("need --payload-bytes >= 32, --n >= 1, --seq-n >= 2, --rounds >= 1")
    if args.workers < 1:
        parser.error("--workers needs at least 1")
    if not args.thread_counts or min(args.thread_counts) < 1:
        parser.error("--threads needs positive sizes")
    return args


def side_workers(workers: dict[str, Worker], side: str) -> tuple[Worker, ...]:
    """The workers of ``side``: labelled ``side`` or ``side-<n>``."""
    return tuple(w for label, w in workers.items() if label.split("-")[0] == side)


def contestants_of(
    llmgine: LlmgineSide, plain: PlainSide, workers: dict[str, Worker], args: argparse.Namespace
) -> list[Contestant]:
    ours, theirs = side_workers(workers, "llmgine"), side_workers(workers, "plain")
    forget_ours, forget_theirs = llmgine.sent.forget, plain.sent.forget
    result = [
        Contestant("llmgine-celery (asyncio.gather)", ours, llmgine.burst, forget=forget_ours),
        Contestant("llmgine-celery (sequential)", ours, None, llmgine.sequential, forget_ours),
        Contestant("plain Celery (sequential)", theirs, None, plain.sequential, forget_theirs),
    ]
    for threads in args.thread_counts:
        burst = functools.partial(plain.burst, threads)
        label = f"plain Celery ({threads} threads)"
        result.append(Contestant(label, theirs, burst, forget=forget_theirs))
    return result


def run(args: argparse.Namespace) -> list[str]:
    load_before = load_average()
    llmgine_module = importlib.import_module(LLMGINE_APP)
    plain_module = importlib.import_module(PLAIN_APP)
    logdir = Path(tempfile.mkdtemp(prefix="bench-commands-"))
    log(f"worker logs in {logdir}")
    with ExitStack() as stack:
        llmgine = LlmgineSide(llmgine_module)
        stack.callback(llmgine.close)
        stack.callback(llmgine.sent.forget)  # what the warm-up or a failed run left
        llmgine.bootstrap()
        prepare_queues(llmgine_module.celery)
        prepare_queues(plain_module.celery)
        plain = PlainSide(plain_module)
        stack.callback(plain.close)
        stack.callback(plain.sent.forget)
        specs = [
            (f"{side}-{n}" if n else side, f"{module_name}:celery", module.celery)
            for side, module_name, module in [
                ("llmgine", LLMGINE_APP, llmgine_module),
                ("plain", PLAIN_APP, plain_module),
            ]
            for n in range(args.workers)
        ]
        workers = stack.enter_context(running_workers(specs, args, logdir))
        contestants = contestants_of(llmgine, plain, workers, args)
        warm_up(contestants, args)
        log("warm-up done")
        throughput, latency = run_rounds(contestants, args)
        for worker in workers.values():
            worker.check_alive()
    return [
        *header(args, load_before),
        "",
        f"Throughput: {args.n} concurrent calls per run",
        *throughput_table(throughput, contestants[0].label),
        "",
        f"Sequential round trip: {args.seq_n} calls per run",
        *latency_table(latency, contestants[1].label, contestants[2].label),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
