"""JsonlSink: the record fields, the line cap, and rotation shared by many processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any

import pytest

from llmgine_celery.observability import LogLevel, Record
from llmgine_celery.observability.appendfile import Rotation
from llmgine_celery.observability.jsonl import MAX_LINE_BYTES, JsonlSink

PASSWORD = "s3cr3t-pa55"


def _lines(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def _all_lines(sink: JsonlSink) -> list[dict[str, Any]]:
    """Every line of the current file and its backups, oldest first."""
    backups = sink.path.parent.glob(f"{sink.path.name}.[0-9]*")
    files = sorted(backups, key=lambda p: int(p.suffix[1:]), reverse=True)
    return [line for path in [*files, sink.path] for line in _lines(path)]


def test_one_line_per_record_with_the_design_fields(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "logs", "worker")
    fields = {"messaging.system": "rabbitmq", "retries": 0, "task_id": "t1", "custom": [1]}
    sink.emit(Record(LogLevel.INFO, "task.succeeded", fields))
    sink.emit(Record(LogLevel.ERROR, "task.failed", {"exception": "ValueError: x"}))
    sink.close()

    first, second = _lines(tmp_path / "logs" / "worker.jsonl")
    assert list(first) == [
        *("ts", "level", "event", "service", "hostname", "pid"),
        *("task_id", "retries", "messaging.system", "custom"),
    ]
    assert first["ts"].endswith("+00:00")
    assert (first["level"], first["event"], first["service"]) == (
        "INFO",
        "task.succeeded",
        "worker",
    )
    assert (first["pid"], first["custom"], first["messaging.system"]) == (
        os.getpid(),
        [1],
        "rabbitmq",
    )
    assert (second["level"], second["exception"]) == ("ERROR", "ValueError: x")


def test_records_below_the_level_are_skipped(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc", level=LogLevel.WARNING)
    sink.emit(Record(LogLevel.INFO, "quiet"))
    sink.emit(Record(LogLevel.WARNING, "loud"))
    sink.close()
    assert [line["event"] for line in _lines(sink.path)] == ["loud"]


def test_lines_are_redacted_with_the_sinks_secrets(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc", secrets=[PASSWORD])
    fields = {
        "broker": f"amqp://app:{PASSWORD}@rabbit//",
        "request": {"headers": {"X-Api-Key": "sk-1"}, "max_tokens": 10},
        "exception": RuntimeError(f"auth failed for redis://:{PASSWORD}@r/0"),
    }
    sink.emit(Record(LogLevel.ERROR, f"cannot log in with {PASSWORD}", fields))
    sink.close()
    text = sink.path.read_text()
    assert PASSWORD not in text
    (line,) = _lines(sink.path)
    assert line["event"] == "cannot log in with ***"
    assert line["broker"] == "amqp://app:***@rabbit//"
    assert line["request"] == {"headers": {"X-Api-Key": "***"}, "max_tokens": 10}
    assert line["exception"] == "RuntimeError: auth failed for redis://:***@r/0"


def test_fields_named_like_core_keys_do_not_overwrite_them(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc")
    line = json.loads(sink.encode(Record(LogLevel.INFO, "real", {"event": "fake", "pid": -1})))
    assert (line["event"], line["field.event"], line["pid"], line["field.pid"]) == (
        "real",
        "fake",
        os.getpid(),
        -1,
    )


def test_unserialisable_values_never_raise(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc")
    line = json.loads(sink.encode(Record(LogLevel.INFO, "e", {"obj": object(), "s": {1}})))
    assert line["obj"].startswith("<object object at") and line["s"] == [1]


@pytest.mark.parametrize("unit", ["x", 'é"\n\x00', "🙂"])
def test_an_oversized_record_is_shortened_to_one_valid_line(tmp_path: Path, unit: str) -> None:
    sink = JsonlSink(tmp_path, "svc")
    fields = {f"f{i}": unit * (3_000 * i) for i in range(12)}
    fields |= {"task_id": "t1", "nested": {"big": [unit * 10_000] * 20}}
    line = sink.encode(Record(LogLevel.INFO, unit * 30_000, fields))
    assert len(line) <= MAX_LINE_BYTES and line.count(b"\n") == 1 and line.endswith(b"\n")
    data = json.loads(line)
    assert data["truncated"] is True
    assert (data["task_id"], data["f0"], data["level"]) == ("t1", "", "INFO")
    assert list(data)[:6] == ["ts", "level", "event", "service", "hostname", "pid"]
    assert data["f11"].endswith("…")
    assert len(line) > MAX_LINE_BYTES * 0.9  # shortened to fit, not emptied


def test_files_rotate_by_size_and_keep_backups(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc", rotation=Rotation(max_bytes=2_000, backups=3))
    for seq in range(100):
        sink.emit(Record(LogLevel.INFO, "tick", {"seq": seq}))
    sink.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["svc.jsonl", "svc.jsonl.1", "svc.jsonl.2", "svc.jsonl.3", "svc.jsonl.lock"]
    assert all(p.stat().st_size <= 2_000 for p in tmp_path.glob("svc.jsonl*"))
    seqs = [line["seq"] for line in _all_lines(sink)]
    assert seqs == list(range(100 - len(seqs), 100))  # the newest lines, in order


def test_a_file_renamed_by_someone_else_is_reopened(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc")
    sink.emit(Record(LogLevel.INFO, "before"))
    sink.path.rename(tmp_path / "moved.jsonl")  # e.g. logrotate without copytruncate
    sink.emit(Record(LogLevel.INFO, "after"))
    sink.close()
    assert [line["event"] for line in _lines(tmp_path / "moved.jsonl")] == ["before"]
    assert [line["event"] for line in _lines(sink.path)] == ["after"]


def test_a_rotation_by_another_writer_is_noticed(tmp_path: Path) -> None:
    rotation = Rotation(max_bytes=1_000, backups=5)
    ours, theirs = (JsonlSink(tmp_path, "svc", rotation=rotation) for _ in range(2))
    ours.emit(Record(LogLevel.INFO, "ours-1"))
    while not (tmp_path / "svc.jsonl.1").exists():
        theirs.emit(Record(LogLevel.INFO, "theirs"))
    ours.emit(Record(LogLevel.INFO, "ours-2"))
    ours.close()
    theirs.close()
    assert [line["event"] for line in _lines(ours.path)] == ["theirs", "ours-2"]
    assert _lines(tmp_path / "svc.jsonl.1")[0]["event"] == "ours-1"


def test_close_releases_the_fds_and_emit_reopens(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    sink = JsonlSink(tmp_path, "svc")
    sink.emit(Record(LogLevel.INFO, "one"))
    assert len(os.listdir("/proc/self/fd")) == before + 2  # the file and its lock
    sink.close()
    assert len(os.listdir("/proc/self/fd")) == before
    sink.emit(Record(LogLevel.INFO, "two"))
    sink.close()
    assert [line["event"] for line in _lines(sink.path)] == ["one", "two"]


def test_rotation_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="backups"):
        Rotation(backups=0)


# small files, so the runs below rotate dozens of times; backups enough to keep every line
ROTATION = Rotation(max_bytes=256 * 1024, backups=10_000)


def _write(sink: JsonlSink | Path, proc: int, count: int) -> None:
    """Emit ``count`` records of varied sizes, some past the line cap."""
    if isinstance(sink, Path):
        sink = JsonlSink(sink, "svc", rotation=ROTATION)
    rng = random.Random(proc)
    for seq in range(count):
        roll = rng.random()
        size = rng.randrange(70_000) if roll < 0.02 else rng.randrange(8_000 if roll < 0.1 else 600)
        pad = ('ab"é\n' * (size // 5 + 1))[:size]
        sink.emit(Record(LogLevel.INFO, "tick", {"proc": proc, "seq": seq, "pad": pad}))
    sink.close()


def _run(method: str, target: JsonlSink | Path, procs: int, count: int) -> None:
    context = multiprocessing.get_context(method)
    workers = [context.Process(target=_write, args=(target, p, count)) for p in range(procs)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * procs


def _assert_each_line_once_in_order(
    sink: JsonlSink, procs: int, count: int, rotations: int
) -> None:
    lines = _all_lines(sink)  # parses every line
    seen: dict[int, list[int]] = {p: [] for p in range(procs)}
    for line in lines:
        if line["event"] == "tick":
            seen[line["proc"]].append(line["seq"])
    assert seen == {p: list(range(count)) for p in range(procs)}
    backups = list(sink.path.parent.glob(f"{sink.path.name}.[0-9]*"))
    assert len(backups) >= rotations
    # a file is only rotated once the next line would overflow it, never early
    assert min(p.stat().st_size for p in backups) > ROTATION.max_bytes - MAX_LINE_BYTES


def test_many_processes_append_and_rotate_without_losing_a_line(tmp_path: Path) -> None:
    _run("spawn", tmp_path, procs=4, count=2_000)
    sink = JsonlSink(tmp_path, "svc", rotation=ROTATION)
    _assert_each_line_once_in_order(sink, procs=4, count=2_000, rotations=20)
    files = [sink.path, *tmp_path.glob("svc.jsonl.[0-9]*")]
    sizes = [len(line) for path in files for line in path.read_bytes().split(b"\n")]
    assert max(sizes) < MAX_LINE_BYTES


def test_forked_children_reopen_the_file_their_parent_opened(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc", rotation=ROTATION)
    sink.emit(Record(LogLevel.INFO, "parent"))  # the children inherit open fds
    _run("fork", sink, procs=3, count=500)
    sink.emit(Record(LogLevel.INFO, "parent"))
    sink.close()
    _assert_each_line_once_in_order(sink, procs=3, count=500, rotations=3)
    assert [line["event"] for line in _all_lines(sink)].count("parent") == 2


def test_a_lone_surrogate_or_a_huge_int_still_makes_one_valid_line(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, "svc")
    sink.emit(Record(LogLevel.INFO, "odd", {"text": "bad \ud800 char", "big": 2**200}))
    sink.close()
    (line,) = sink.path.read_text().splitlines()
    record = json.loads(line)
    assert record["text"] == "bad ? char" and record["big"] == 2**200
