"""A batch of records counted at once gives the very series the records give one by one."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import values as prometheus_values

from llmgine_celery.observability import records
from llmgine_celery.observability.bus import LogLevel, Record
from llmgine_celery.observability.metrics import MetricsSink
from llmgine_celery.observability.metrics_tally import Tally, observe_all


@pytest.fixture(autouse=True)
def in_memory_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # another test may have put this process in multiprocess mode
    monkeypatch.setattr(prometheus_values, "ValueClass", prometheus_values.MutexValue)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def command_run(rng: random.Random, n: int) -> list[Record]:
    """What a worker records for one command, with varied names, outcomes and times."""
    task_id = f"t-{n}"
    task = {
        "task_id": task_id,
        "task_name": f"llmgine.command.C{n % 3}",
        "queue": f"q{n % 2}",
        "command_type": f"C{n % 3}",
        "worker": f"w{n % 2}@host",
    }
    outcome = rng.choice(["success", "failure", "no_handler"])
    run = [
        Record(LogLevel.DEBUG, records.TASK_RECEIVED, {**task, "state": "received"}),
        Record(
            LogLevel.INFO,
            records.COMMAND_STARTED,
            {**task, "state": "started", "queue_wait_ms": rng.choice([0.0, 50.0, 100.0, 3e6])},
        ),
    ]
    if n % 7 == 0:  # a run that raised for good
        run.append(
            Record(
                LogLevel.ERROR,
                records.COMMAND_RESULT,
                {**task, "state": "failed", "exception": "KeyError", "outcome": "error"},
            )
        )
    else:
        run.append(
            Record(
                LogLevel.INFO,
                records.COMMAND_RESULT,
                {
                    **task,
                    "state": "succeeded",
                    "outcome": outcome,
                    "duration_ms": rng.choice([0.0, 5.0, 10.0, 2.5, rng.uniform(0, 9000)]),
                },
            )
        )
    return run


def handler_and_worker_records(rng: random.Random) -> list[Record]:
    who = {"event_type": "Asked", "group": "g", "handler": "h", "task_name": "llmgine.event.g.h"}
    return [
        Record(LogLevel.INFO, records.WORKER_READY, {"worker": "w0@host"}),
        Record(LogLevel.INFO, records.HANDLER_RETRIED, {**who, "state": "retried"}),
        Record(
            LogLevel.INFO,
            records.HANDLER_SUCCEEDED,
            {**who, "state": "succeeded", "duration_ms": rng.uniform(0, 100)},
        ),
        Record(LogLevel.INFO, records.HANDLER_SKIPPED, {**who, "state": "succeeded"}),
        Record(LogLevel.INFO, records.EVENT_PUBLISHED, {"event_type": "Asked"}),
        Record(LogLevel.WARNING, records.DEAD_LETTER, {"kind": "handler"}),
        Record(LogLevel.INFO, records.WORKER_STOPPING, {"worker": "w0@host"}),
    ]


def test_a_batch_counts_exactly_what_its_records_count_one_by_one() -> None:
    rng = random.Random(7)
    batch = [r for n in range(300) for r in command_run(rng, n)]
    batch[150:150] = handler_and_worker_records(rng)  # gauges set mid-batch
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    single = MetricsSink(one_by_one, hostname="h")
    for record in batch:
        single.emit(record)
    MetricsSink(at_once, hostname="h").emit_many(batch)

    expected = samples(one_by_one)
    assert samples(at_once) == pytest.approx(expected)
    # the comparison covers every kind of series: counters, histograms, gauges
    names = {name for name, _ in expected}
    assert {"celery_task_started_total", "celery_task_runtime_bucket"} <= names
    assert {"celery_worker_tasks_active", "celery_worker_up", "llmgine_dead_letter_total"} <= names


def test_the_active_gauge_nets_out_runs_started_and_ended_in_one_batch() -> None:
    registry = CollectorRegistry()
    sink = MetricsSink(registry, hostname="h")
    started = [
        Record(LogLevel.INFO, records.COMMAND_STARTED, {"task_id": f"t{i}", "state": "started"})
        for i in range(5)
    ]
    ended = [
        Record(LogLevel.INFO, records.COMMAND_RESULT, {"task_id": f"t{i}", "state": "succeeded"})
        for i in range(3)
    ]
    sink.emit_many(started + ended)
    assert registry.get_sample_value("celery_worker_tasks_active", {"hostname": "h"}) == 2.0


@pytest.mark.parametrize(
    "values",
    [
        [0.005, 0.0051, 0.01, 0.025, 0.075, 0.1, 0.1000001, 10.0, 10.5, math.inf],
        [random.Random(3).uniform(0, 20) for _ in range(500)],
        [0.0, 0.0, -1.0],
        [math.nan, 1.0],
    ],
    ids=["on and beside the bounds", "random", "zero and negative", "nan"],
)
def test_observing_many_values_fills_the_buckets_as_observing_each(values: list[float]) -> None:
    each, many = CollectorRegistry(), CollectorRegistry()
    Histogram("h", "h", registry=each)
    for v in values:
        each._names_to_collectors["h"].observe(v)  # type: ignore[attr-defined]
    Histogram("h", "h", registry=many)
    observe_all(many._names_to_collectors["h"], values)  # type: ignore[attr-defined]
    got, expected = samples(many), samples(each)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key])
        else:
            assert got[key] == pytest.approx(value)


def test_a_histogram_without_prometheus_internals_is_observed_value_by_value() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    plain = Plain()
    observe_all(plain, [1.0, 2.0])
    assert plain.seen == [1.0, 2.0]


def test_a_tally_writes_each_series_once_with_the_sum() -> None:
    class Series:
        def __init__(self) -> None:
            self.incs: list[float] = []

        def inc(self, amount: float) -> None:
            self.incs.append(amount)

    up, flat = Series(), Series()
    tally = Tally()
    for amount in (1.0, 1.0, 2.0):
        tally.inc(up, amount)
    tally.inc(flat, 1.0)
    tally.inc(flat, -1.0)
    tally.apply()
    assert up.incs == [4.0] and flat.incs == []  # a net zero writes nothing
    tally.apply()
    assert up.incs == [4.0]  # applied once
