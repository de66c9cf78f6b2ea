"""Record timestamps, process ids and random ids: cheap, and still right after a fork."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime

import pytest

from llmgine_celery.observability import context
from llmgine_celery.observability.bus import LogLevel, Record, iso_utc
from llmgine_celery.observability.process import current_pid, random_hex


def test_iso_utc_writes_what_datetime_writes() -> None:
    rng = random.Random(11)
    stamps = [rng.uniform(-2e9, 4e9) for _ in range(20_000)]
    stamps += [float(int(s)) for s in stamps[:2_000]]  # whole seconds: no fraction
    stamps += [int(s) + 0.9999996 for s in stamps[:2_000]]  # rounds up into the next second
    stamps += [int(s) + k * 0.5e-6 for s in stamps[:500] for k in range(4)]  # halves
    stamps += [0.0, -0.5, 1.5e-7, 1_700_000_000.0000005]
    for stamp in stamps:
        assert iso_utc(stamp) == datetime.fromtimestamp(stamp, UTC).isoformat(), stamp


def test_a_record_carries_its_iso_time_and_this_process() -> None:
    record = Record(LogLevel.INFO, "x")
    assert record.pid == os.getpid() == current_pid()
    assert datetime.fromisoformat(record.ts).timestamp() == pytest.approx(record.created, abs=1e-6)


def test_ids_are_hex_of_the_documented_length_and_do_not_repeat() -> None:
    spans = {context.new_span_id() for _ in range(10_000)}
    traces = {context.new_trace_id() for _ in range(10_000)}
    assert len(spans) == len(traces) == 10_000
    assert all(len(s) == 16 and int(s, 16) >= 0 for s in spans)
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in traces)
    assert len(random_hex(8)) == 2


def test_seeding_random_does_not_make_ids_repeat() -> None:
    random.seed(1)
    first = context.new_span_id()
    random.seed(1)
    assert context.new_span_id() != first


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # 3.12+: threads in pytest
def test_a_forked_child_knows_its_own_pid_and_draws_other_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's cleanup
        try:
            os.write(write, f"{current_pid()} {os.getpid()} {context.new_span_id()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_pid, child_getpid, child_span = pipe.read().split()
    os.waitpid(pid, 0)
    assert int(child_pid) == int(child_getpid) == pid != current_pid()
    assert child_span != context.new_span_id()  # the parent's next id is not the child's
