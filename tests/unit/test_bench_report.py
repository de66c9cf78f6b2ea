"""The throughput verdict of ``bench/commands.py``: rounds paired, the goal on their median."""

from __future__ import annotations

import pytest

from bench.report import Sample, bootstrap_median_interval, throughput_table

OURS = "llmgine-celery (asyncio.gather)"


def rounds(*rates: float) -> list[Sample]:
    """One sample per round, 1,000 calls at each rate."""
    return [
        Sample(calls=1000, wall=1000 / r, producer_cpu=0, worker_cpu=0, rest_cpu=0) for r in rates
    ]


def verdict(lines: list[str]) -> str:
    (line,) = [line for line in lines if line.startswith("ratio llmgine / plain, median")]
    return line


def test_goal_is_checked_on_each_rounds_ratio_to_its_best_plain_pool() -> None:
    # ours 1,500/s every round; each round's best plain is 1,000/s, but in
    # different pools, so the best pool by median (900/s) would flatter us
    results = {
        OURS: rounds(1500, 1500, 1500),
        "plain Celery (16 threads)": rounds(1000, 900, 800),
        "plain Celery (32 threads)": rounds(800, 1000, 900),
        "plain Celery (64 threads)": rounds(900, 800, 1000),
    }
    lines = throughput_table(results, OURS)
    assert "ratio of the medians, llmgine / best plain (plain Celery (16 threads)): 1.67x" in lines
    assert "per round, llmgine / that round's best plain: 1.50 1.50 1.50" in lines
    assert verdict(lines).startswith("ratio llmgine / plain, median of the rounds: 1.50x")
    assert verdict(lines).endswith("(goal >= 1.5x: met)")


def test_goal_not_met_when_the_median_round_falls_short() -> None:
    results = {
        OURS: rounds(1400, 1600, 1450),
        "plain Celery (16 threads)": rounds(1000, 1000, 1000),
    }
    lines = throughput_table(results, OURS)
    assert verdict(lines).startswith("ratio llmgine / plain, median of the rounds: 1.45x")
    assert verdict(lines).endswith("(goal >= 1.5x: NOT met)")


def test_interval_spans_the_rounds_and_narrows_with_agreeing_ones() -> None:
    spread = [1.2, 1.3, 1.4, 1.5, 1.6]
    low, high = bootstrap_median_interval(spread)
    assert min(spread) <= low <= 1.4 <= high <= max(spread)
    assert high - low > 0.1
    assert bootstrap_median_interval([1.4] * 9) == (1.4, 1.4)
    assert bootstrap_median_interval(spread) == (low, high)  # seeded: same input, same text


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_a_wider_level_never_gives_a_narrower_interval(level: float) -> None:
    values = [1.1, 1.25, 1.3, 1.38, 1.4, 1.45, 1.6, 1.7]
    low, high = bootstrap_median_interval(values, level=level)
    narrow_low, narrow_high = bootstrap_median_interval(values, level=level / 2)
    assert low <= narrow_low <= narrow_high <= high
