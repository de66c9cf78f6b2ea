"""ThreadedSink: records written by a thread of their own, in batches, nothing lost."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from llmgine_celery.observability.bus import LogLevel, ObservabilityBus, Record, Sink
from llmgine_celery.observability.jsonl import JsonlSink
from llmgine_celery.observability.threaded import ThreadedSink, flush_all


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_from_many_threads_are_all_written_once_whole(tmp_path: Path) -> None:
    jsonl = JsonlSink(tmp_path, "svc")
    bus = ObservabilityBus("svc", [ThreadedSink(jsonl)])

    def burst(t: int) -> None:
        for n in range(500):
            bus.log(LogLevel.INFO, "step", thread=t, n=n, text="x" * (n % 97))

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bus.close()  # flushes
    written = lines(jsonl.path)
    assert sorted((r["thread"], r["n"]) for r in written) == [
        (t, n) for t in range(8) for n in range(500)
    ]


class Batches(Sink):
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.batches: list[list[str]] = []

    def emit_many(self, batch: Sequence[Record]) -> None:
        self.gate.wait(5)  # holds the writer so that the next records pile up
        self.batches.append([r.event for r in batch])


def test_records_that_piled_up_go_to_the_inner_sink_in_one_batch() -> None:
    gate = threading.Event()
    inner = Batches(gate)
    sink = ThreadedSink(inner)
    sink.emit(Record(LogLevel.INFO, "first"))
    for n in range(10):
        sink.emit(Record(LogLevel.INFO, f"r{n}"))
    gate.set()
    assert sink.flush()
    flat = [event for batch in inner.batches for event in batch]
    assert flat == ["first", *(f"r{n}" for n in range(10))]
    assert len(inner.batches) < 11  # not one call per record
    sink.close()


def test_records_below_the_inner_level_are_not_queued(tmp_path: Path) -> None:
    jsonl = JsonlSink(tmp_path, "svc", level=LogLevel.WARNING)
    sink = ThreadedSink(jsonl)
    sink.emit(Record(LogLevel.INFO, "quiet"))
    assert sink._pid == 0  # no thread was even started for it
    sink.emit(Record(LogLevel.ERROR, "loud"))
    sink.close()
    assert [r["event"] for r in lines(jsonl.path)] == ["loud"]


def test_a_failing_inner_sink_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Sink):
        def emit(self, record: Record) -> None:
            raise OSError("disk full")

    sink = ThreadedSink(Broken())
    with caplog.at_level(logging.ERROR, "llmgine_celery.observability"):
        for n in range(3):
            sink.emit(Record(LogLevel.INFO, "x", {"n": n}))
            assert sink.flush()
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1


def test_a_forked_child_writes_its_own_records_and_not_its_parents(tmp_path: Path) -> None:
    jsonl = JsonlSink(tmp_path, "svc")
    sink = ThreadedSink(jsonl)
    sink.emit(Record(LogLevel.INFO, "parent-before"))
    assert sink.flush()
    pid = os.fork()
    if pid == 0:  # the child: its own thread and queue, flushed as a worker child is
        try:
            sink.emit(Record(LogLevel.INFO, "child"))
            flush_all()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sink.emit(Record(LogLevel.INFO, "parent-after"))
    sink.close()
    events = [r["event"] for r in lines(jsonl.path)]
    assert sorted(events) == ["child", "parent-after", "parent-before"]


def test_a_lazy_records_fields_are_built_on_the_writer_thread_once(tmp_path: Path) -> None:
    built_on: list[str] = []

    def build() -> dict[str, object]:
        built_on.append(threading.current_thread().name)
        return {"task_id": "t-1", "n": 1}

    jsonl = JsonlSink(tmp_path, "svc")
    bus = ObservabilityBus("svc", [ThreadedSink(jsonl)])
    record = Record(LogLevel.INFO, "command.started", build=build)
    bus.emit(record)  # the console sink skips lifecycle records without reading them
    bus.close()
    writer = [f"llmgine-sinks-{os.getpid()}"]
    assert built_on == writer
    assert record.fields == {"task_id": "t-1", "n": 1}
    assert built_on == writer  # read again here: not built again
    assert [(r["event"], r["task_id"], r["n"]) for r in lines(jsonl.path)] == [
        ("command.started", "t-1", 1)
    ]


def test_a_builder_that_fails_gives_an_error_field_and_the_sink_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, object]:
        raise KeyError("gone")

    jsonl = JsonlSink(tmp_path, "svc")
    bus = ObservabilityBus("svc", [ThreadedSink(jsonl)])
    with caplog.at_level(logging.ERROR, "llmgine_celery.observability"):
        bus.emit(Record(LogLevel.INFO, "command.started", build=broken))
        bus.emit(Record(LogLevel.INFO, "command.result", {"task_id": "t-2"}))
        bus.close()
    first, second = lines(jsonl.path)
    assert first["event"] == "command.started" and "KeyError" in str(first["error"])
    assert second == {**second, "event": "command.result", "task_id": "t-2"}
    assert "could not be built" in caplog.text
