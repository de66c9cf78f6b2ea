"""Where the CPU goes during a burst of concurrent ``execute()`` calls, 100 ms at a time.

``commands.py`` gives one figure per burst. This starts one llmgine-celery
worker (``-P threads -c 8`` by default), sends ``--bursts`` bursts of ``--n``
concurrent calls from one event loop, and prints for every 100 ms of each
burst the calls completed and the share of a core used by this process (the
producer), the worker, RabbitMQ (``beam.smp``) and Redis (``redis-server``),
read from /proc. A line per burst gives its calls/s and each side's CPU per call.

It shows, for instance, the worker short of CPU while the producer and the
broker take in the burst, and the worker alone at a full core afterwards.

Run from the repository root: ``.venv/bin/python bench/burst_timeline.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workers import (
    BenchError,
    add_worker_options,
    log,
    prepare_queues,
    process_cpu_seconds,
    process_tree,
    processes_named,
    run_main,
    running_workers,
)

LLMGINE_APP = "bench.apps.llmgine_echo"
#: seconds between two CPU readings
BIN = 0.1
#: seconds one call may take
CALL_TIMEOUT = 120.0


class Sampler:
    """Reads the CPU seconds of named process groups every ``BIN`` seconds, in a thread."""

    def __init__(self, groups: Mapping[str, Callable[[], float]]) -> None:
        self._groups = groups
        self.readings: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # the last, partial bin

    def _read(self) -> None:
        self.readings.append((time.perf_counter(), {k: f() for k, f in self._groups.items()}))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(BIN)


def timeline(start: float, done: Sequence[float], sampler: Sampler) -> list[str]:
    """One line per reading interval: calls completed in it and each group's cores."""
    lines = []
    pairs = zip(sampler.readings, sampler.readings[1:], strict=False)
    for (t1, cpu1), (t2, cpu2) in pairs:
        completed = sum(1 for d in done if t1 <= d < t2)
        cores = "  ".join(f"{k} {(cpu2[k] - cpu1[k]) / (t2 - t1):4.2f}" for k in cpu1)
        lines.append(f"  {t1 - start:5.2f}s  {completed:4d} calls  cores: {cores}")
    return lines


def run(args: argparse.Namespace) -> list[str]:
    module = importlib.import_module(LLMGINE_APP)
    app = module.app
    logdir = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    log(f"worker log in {logdir}")
    loop = asyncio.new_event_loop()
    done: list[float] = []

    async def call(payload: str) -> None:
        result = await app.message_bus.execute(module.Echo(payload=payload), timeout=CALL_TIMEOUT)
        if not (result.success and result.result == payload):
            raise BenchError(f"wrong result for {payload[:24]!r}: {result!r:.300}")
        done.append(time.perf_counter())

    async def burst(tag: str) -> None:
        payloads = [f"{tag}-{i:06d}-".ljust(args.payload_bytes, "x") for i in range(args.n)]
        await asyncio.gather(*(call(p) for p in payloads))

    lines: list[str] = []
    rates: list[float] = []
    loop.run_until_complete(app.bootstrap())
    try:
        prepare_queues(app.celery)
        spec = [("llmgine", f"{LLMGINE_APP}:celery", app.celery)]
        with running_workers(spec, args, logdir) as workers:
            loop.run_until_complete(burst("warm"))
            # looked up once: a reading must be cheap, it runs in the producer
            pids = {
                "producer": [os.getpid()],
                "worker": process_tree(workers["llmgine"].process.pid),
                "rabbitmq": processes_named("beam.smp"),
                "redis": processes_named("redis-server"),
            }
            groups = {k: functools.partial(process_cpu_seconds, v) for k, v in pids.items()}
            for number in range(args.bursts):
                done.clear()
                start = time.perf_counter()
                with Sampler(groups) as sampler:
                    loop.run_until_complete(burst(f"b{number}"))
                wall = time.perf_counter() - start
                rates.append(args.n / wall)
                first, last = sampler.readings[0][1], sampler.readings[-1][1]
                per_call = "  ".join(
                    f"{k} {(last[k] - first[k]) / args.n * 1e6:4.0f}" for k in first
                )
                lines.append(f"burst {number}: {args.n / wall:5.0f} calls/s  us/call: {per_call}")
                if args.timeline:
                    lines.extend(timeline(start, done, sampler))
    finally:
        loop.run_until_complete(app.shutdown())
        loop.close()
    lines.append(f"median {statistics.median(rates):.0f} calls/s over {args.bursts} bursts")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_worker_options(parser)
    parser.add_argument("--n", type=int, default=1000, help="concurrent calls per burst")
    parser.add_argument("--bursts", type=int, default=6)
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument(
        "--no-timeline", dest="timeline", action="store_false", help="only a line per burst"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.bursts < 1 or args.payload_bytes < 32:
        parser.error("need --n >= 1, --bursts >= 1 and --payload-bytes >= 32")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
