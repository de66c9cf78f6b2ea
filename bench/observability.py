"""What observability costs: command throughput with JSONL and metrics on, and off.

Two copies of the echo application, identical but for ``LLMGINE_LOG_JSONL`` and
``LLMGINE_METRICS`` (and their folders), each with its own worker subprocess and
its own RabbitMQ vhost (so neither worker takes the other's commands). Per
round, alternating which side runs first, ``--n`` concurrent ``execute()`` calls
from one event loop. The JSONL files are checked at the end: one
``command.result`` line per call made on the "on" side, none on the "off" side.

Run from the repository root: ``.venv/bin/python bench/observability.py`` (15 rounds).
Goal (issue 4): "on" throughput at least 0.95x "off". Reported, never enforced.

``--versus-checkout PATH`` turns it into a paired end-to-end comparison of two
versions of the worker: both sides as configured (observability on), the second
side's worker running the llmgine-celery checkout at PATH (e.g. ``git worktree
add /tmp/base HEAD~1``). The producers are this checkout's on both sides, so it
measures a change to the worker, in the ``commands.py`` setting.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import SecretStr

from bench.apps.llmgine_echo import Echo, EchoApp
from bench.report import Sample, measure, rate_rows, round_ratios
from bench.workers import (
    REPO_ROOT,
    BenchError,
    SentTasks,
    Worker,
    add_versus_checkout,
    add_worker_options,
    check_versus_checkout,
    load_average,
    log,
    prepare_queues,
    start_worker,
    stop_all,
    vhost_url,
    wait_ready,
)
from llmgine_celery import ApplicationConfig, Settings
from llmgine_celery.settings import redact_url

GOAL = 0.95
CALL_TIMEOUT = 120.0
SIDES = ("on", "off")


def side_env(
    side: str, broker: str, backend: str, folder: Path, versus: Path | None = None
) -> dict[str, str]:
    on = "true" if side == "on" or versus is not None else "false"
    return {
        "LLMGINE_BROKER_URL": broker,
        "LLMGINE_RESULT_BACKEND": backend,
        "LLMGINE_EMBEDDED_WORKER": "false",
        "LLMGINE_LOG_JSONL": on,
        "LLMGINE_METRICS": on,
        "LLMGINE_DATA_DIR": str(folder),
    }


class Side:
    """One copy of the echo application and its event loop, in this process."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        settings = Settings(
            broker_url=SecretStr(env["LLMGINE_BROKER_URL"]),
            result_backend=SecretStr(env["LLMGINE_RESULT_BACKEND"]),
            embedded_worker=False,
            log_jsonl=env["LLMGINE_LOG_JSONL"] == "true",
            metrics=env["LLMGINE_METRICS"] == "true",
            data_dir=Path(env["LLMGINE_DATA_DIR"]),
        )
        self.name = name
        self.app = EchoApp(ApplicationConfig(name="bench-echo", settings=settings))
        self.loop = asyncio.new_event_loop()
        self.calls = 0
        self.sent = SentTasks(self.app.celery.backend)

    def burst(self, payloads: Sequence[str]) -> None:
        self.loop.run_until_complete(self._burst(payloads))
        self.calls += len(payloads)

    async def _burst(self, payloads: Sequence[str]) -> None:
        bus = self.app.message_bus

        async def call(payload: str) -> None:
            command = Echo(payload=payload)
            self.sent.add(command.id)
            result = await bus.execute(command, timeout=CALL_TIMEOUT)
            if not (result.success and result.result == payload):
                raise BenchError(f"{self.name}: wrong result {result!r:.300}")

        await asyncio.gather(*(call(p) for p in payloads))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.app.shutdown())
        finally:
            self.loop.close()


def count_results(folder: Path) -> int:
    """``command.result`` lines in the JSONL files under ``folder``."""
    found = 0
    for path in folder.glob("logs/*.jsonl*"):
        for line in path.read_text().splitlines():
            if json.loads(line).get("event") == "command.result":
                found += 1
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_worker_options(parser)
    parser.add_argument("--n", type=int, default=1000)
    # single rounds of one side differ by up to 40% on a shared 2-core machine:
    # fewer rounds move the ratio of medians by several points from run to run
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--payload-bytes", type=int, default=1024)
    add_versus_checkout(
        parser,
        "compare this code's worker with the worker of the checkout at PATH, both with "
        "observability on, instead of observability on with off",
    )
    args = parser.parse_args(argv)
    check_versus_checkout(parser, args)
    return args


def label(side: str, args: argparse.Namespace) -> str:
    """A side's name in the report."""
    if args.versus_checkout is None:
        return f"observability {side}"
    return "this checkout" if side == "on" else "the other checkout"


def run(args: argparse.Namespace) -> list[str]:
    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench-observability-"))
    log(f"data and worker logs in {tmp}")
    versus = args.versus_checkout
    envs = {
        side: side_env(
            side,
            vhost_url(args.broker, f"llmgine-bench-obs-{side}"),
            args.backend,
            tmp / side,
            versus,
        )
        for side in SIDES
    }
    samples: dict[str, list[Sample]] = {label(s, args): [] for s in SIDES}
    with ExitStack() as stack:
        sides = {side: Side(side, envs[side]) for side in SIDES}
        for copy in sides.values():
            stack.callback(copy.close)
            stack.callback(copy.sent.forget)  # runs first: what the warm-up or a failed round left
            prepare_queues(copy.app.celery)
        workers: dict[str, Worker] = {}
        stack.callback(stop_all, workers.values())
        for side in SIDES:
            # the other checkout's worker imports llmgine_celery from there
            code = versus if versus is not None and side == "off" else REPO_ROOT
            env = {**envs[side], "PYTHONPATH": str(code)}
            workers[side] = start_worker(
                f"obs-{side}", "bench.apps.llmgine_echo:celery", args, tmp, env=env, cwd=code
            )
        for side in SIDES:
            wait_ready(workers[side], sides[side].app.celery)
        for side in SIDES:  # warm-up: connections, threads, files
            sides[side].burst(payloads(f"warm-{side}", max(200, args.n // 5), args.payload_bytes))
        for round_no in range(args.rounds):
            order = SIDES if round_no % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                batch = payloads(f"r{round_no}-{side}", args.n, args.payload_bytes)
                burst = functools.partial(sides[side].burst, batch)
                sample = measure([workers[side]], args.n, burst)
                sides[side].sent.forget()
                samples[label(side, args)].append(sample)
                log(f"  {side:<4} {args.n / sample.wall:8.0f} calls/s ({sample.wall:.2f}s)")
        for worker in workers.values():
            worker.check_alive()
        calls_on = sides["on"].calls
    written = count_results(tmp / "on")
    if written < calls_on:
        raise BenchError(f"observability on: {written} command.result lines for {calls_on} calls")
    if versus is None and count_results(tmp / "off"):
        raise BenchError("observability off wrote JSONL lines")
    return report(args, samples, load_before, written, calls_on)


def report(
    args: argparse.Namespace,
    samples: dict[str, list[Sample]],
    load_before: str,
    written: int,
    calls: int,
) -> list[str]:
    """The report's lines: rates per side, and the ratio of the first side's to the second's."""
    rates = {k: statistics.median(s.calls / s.wall for s in v) for k, v in samples.items()}
    first, second = samples
    ratio = rates[first] / rates[second]
    if args.versus_checkout is None:
        met = "met" if ratio >= GOAL else "NOT met"
        verdict = f"ratio on / off: {ratio:.3f}x  (goal >= {GOAL}x: {met})"
    else:  # the same rounds' rates: the machine's phases move both sides together
        pairs = round_ratios(samples[first], [samples[second]])
        verdict = (
            f"ratio this / other checkout ({args.versus_checkout}): {ratio:.3f}x of the "
            f"medians; per round {' '.join(f'{p:.2f}' for p in pairs)} "
            f"(median {statistics.median(pairs):.3f}x)"
        )
    return [
        f"broker {redact_url(args.broker)} (a vhost per side)  backend {redact_url(args.backend)}",
        f"worker -P {args.pool} -c {args.concurrency} (one per side); {args.rounds} rounds of "
        f"{args.n} concurrent execute(), {args.payload_bytes} B payloads",
        f"load average before: {load_before}",
        "",
        *rate_rows(samples, "calls/s"),
        verdict,
        f"JSONL: {written} command.result lines for {calls} calls on the first side",
    ]


def payloads(tag: str, count: int, size: int) -> list[str]:
    return [f"{tag}-{i:07d}-".ljust(size, "x")[:size] for i in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lines = run(args)
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
