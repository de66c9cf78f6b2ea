"""Statistics over the measured samples and the tables printed from them."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.workers import Worker, host_busy_seconds, load_average
from llmgine_celery.settings import redact_url

THROUGHPUT_GOAL = 1.5
LATENCY_GOAL = 1.1


@dataclass(frozen=True)
class Sample:
    """One measured phase: wall time, CPU of both processes, per-call latencies."""

    calls: int
    wall: float
    producer_cpu: float
    worker_cpu: float
    #: CPU of everything else on the host: broker, Redis, unrelated processes
    rest_cpu: float
    latencies: tuple[float, ...] = ()


def measure(workers: Sequence[Worker], calls: int, run: Callable[[], float | None]) -> Sample:
    """Run one phase and account its CPU time (this process, ``workers``, the rest).

    Its wall time is what ``run`` returns, or else the time ``run`` took.
    """
    host_before = host_busy_seconds()
    workers_before = sum(w.cpu_seconds() for w in workers)
    producer_before = time.process_time()
    start = time.perf_counter()
    wall = run()
    elapsed = time.perf_counter() - start
    producer_cpu = time.process_time() - producer_before
    worker_cpu = sum(w.cpu_seconds() for w in workers) - workers_before
    rest_cpu = host_busy_seconds() - host_before - producer_cpu - worker_cpu
    return Sample(calls, elapsed if wall is None else wall, producer_cpu, worker_cpu, rest_cpu)


def percentile(values: Sequence[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def median_percentile_ms(samples: Sequence[Sample], pct: int) -> float:
    """The median over rounds of each round's ``pct`` percentile latency, in ms."""
    return statistics.median(percentile(s.latencies, pct) * 1e3 for s in samples)


def median_of(samples: Sequence[Sample], value: Callable[[Sample], float]) -> float:
    return statistics.median(value(s) for s in samples)


def rate(sample: Sample) -> float:
    return sample.calls / sample.wall


CPU_HEADER = f"{'prod CPU':>8} {'wrk CPU':>8} {'rest CPU':>8} {'us/call':>8}"


def cpu_columns(samples: Sequence[Sample]) -> str:
    producer = median_of(samples, lambda s: s.producer_cpu)
    worker = median_of(samples, lambda s: s.worker_cpu)
    rest = median_of(samples, lambda s: s.rest_cpu)
    per_call = median_of(samples, lambda s: (s.producer_cpu + s.worker_cpu) / s.calls) * 1e6
    return f"{producer:>8.2f} {worker:>8.2f} {rest:>8.2f} {per_call:>8.0f}"


def rate_rows(results: dict[str, list[Sample]], unit: str, width: int = 32) -> list[str]:
    """A header and a line per side: median rate, each round's rate, CPU columns."""
    lines = [f"{'side':<{width}} {unit:>8}  {'per round':<22} {CPU_HEADER}"]
    for label, samples in results.items():
        rounds = " ".join(f"{rate(s):.0f}" for s in samples)
        lines.append(
            f"{label:<{width}} {median_of(samples, rate):>8.0f}  {rounds:<22} "
            f"{cpu_columns(samples)}"
        )
    return lines


def ratio_line(
    results: dict[str, list[Sample]], top: str, bottom: str, name: str, goal: float | None
) -> str:
    ratio = median_of(results[top], rate) / median_of(results[bottom], rate)
    verdict = (
        "informational"
        if goal is None
        else (f"goal >= {goal:.1f}x: {'met' if ratio >= goal else 'NOT met'}")
    )
    return f"ratio llmgine / {name}: {ratio:.2f}x  ({verdict})"


def throughput_table(results: dict[str, list[Sample]], llmgine: str) -> list[str]:
    lines = rate_rows(results, "calls/s")
    best = max((k for k in results if k != llmgine), key=lambda k: median_of(results[k], rate))
    ratio = median_of(results[llmgine], rate) / median_of(results[best], rate)
    lines.append(f"ratio of the medians, llmgine / best plain ({best}): {ratio:.2f}x")
    lines.extend(paired_lines(results, llmgine))
    return lines


def paired_lines(results: dict[str, list[Sample]], llmgine: str) -> list[str]:
    """Each round's llmgine rate over the best plain rate of that round; the goal, on their median.

    A round runs every side within seconds, so the machine's slow and fast
    phases move both sides of a round together; the ratio of the medians pairs
    rates measured minutes apart, and moved by 0.1 between runs of 15 rounds
    whose per-round medians agreed. Taking each round's best plain thread pool
    favours plain Celery.
    """
    plains = [samples for label, samples in results.items() if label != llmgine]
    ratios = round_ratios(results[llmgine], plains)
    median = statistics.median(ratios)
    low, high = bootstrap_median_interval(ratios)
    return [
        f"per round, llmgine / that round's best plain: {' '.join(f'{r:.2f}' for r in ratios)}",
        f"ratio llmgine / plain, median of the rounds: {median:.2f}x, 90% interval "
        f"{low:.2f}-{high:.2f} (bootstrap over rounds)  (goal >= {THROUGHPUT_GOAL}x: "
        f"{'met' if median >= THROUGHPUT_GOAL else 'NOT met'})",
    ]


def round_ratios(top: Sequence[Sample], bottoms: Sequence[Sequence[Sample]]) -> list[float]:
    """Each round's rate of ``top`` over the best rate among ``bottoms`` in the same round."""
    rounds = zip(top, *bottoms, strict=True)
    return [rate(ours) / max(rate(other) for other in others) for ours, *others in rounds]


def bootstrap_median_interval(
    values: Sequence[float], level: float = 0.9, resamples: int = 2000
) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of ``values`` (seeded: same input, same text).

    Few rounds give a wide interval, as they should; one round gives that round.
    """
    pick = random.Random(0).choices
    medians = sorted(statistics.median(pick(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int((1 - tail) * (resamples - 1))]


def latency_table(results: dict[str, list[Sample]], llmgine: str, plain: str) -> list[str]:
    lines = [f"{'side':<32} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8} {CPU_HEADER}"]
    for label, samples in results.items():
        p50, p90, p99 = (median_percentile_ms(samples, pct) for pct in (50, 90, 99))
        mean = median_of(samples, lambda s: statistics.fmean(s.latencies) * 1e3)
        lines.append(
            f"{label:<32} {p50:>8.2f} {p90:>8.2f} {p99:>8.2f} {mean:>8.2f} {cpu_columns(samples)}"
        )
    ratio = median_percentile_ms(results[llmgine], 50) / median_percentile_ms(results[plain], 50)
    lines.append(
        f"ratio p50 llmgine / plain: {ratio:.2f}x  (goal <= {LATENCY_GOAL}x: "
        f"{'met' if ratio <= LATENCY_GOAL else 'NOT met'})"
    )
    return lines


def _per_side(args: argparse.Namespace) -> str:
    count = getattr(args, "workers", 1)
    return "one" if count == 1 else f"{count} workers"


def header(args: argparse.Namespace, load_before: str) -> list[str]:
    return [
        f"broker {redact_url(args.broker)}  backend {redact_url(args.backend)}",
        f"worker -P {args.pool} -c {args.concurrency} ({_per_side(args)} per side)  "
        f"payload {args.payload_bytes} B  host CPUs {os.cpu_count()}",
        f"rounds {args.rounds} after a warm-up; medians of the rounds shown; side order alternates",
        f"load average (1/5/15 min) before {load_before}, after {load_average()}",
        "CPU seconds per run: prod = this process, wrk = the side's workers, rest = the rest "
        "of the host",
        "(RabbitMQ, Redis, anything else running); us/call = CPU microseconds of prod + wrk "
        "per call",
    ]
