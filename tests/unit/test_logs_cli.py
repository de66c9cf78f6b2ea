"""``llmgine-celery logs`` and ``trace`` on JSONL files: merging, filters, bad lines, follow."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmgine_celery.cli import build_parser, main
from llmgine_celery.observability import LogLevel, Record
from llmgine_celery.observability.appendfile import AppendFile, Rotation
from llmgine_celery.observability.jsonl import JsonlSink
from llmgine_celery.observability.logview import (
    Follower,
    RecordFilter,
    Skipped,
    follow,
    last_matching,
    log_files,
)
from tests.support import REPO, wait_for
from tests.unit.test_trace import scenario

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
COUNT = 60


def fields_of(seq: int) -> tuple[str, LogLevel, dict[str, Any]]:
    """What record ``seq`` holds: its name, level and ids follow from the number."""
    name = ["command.sent", "command.result", "handler.started", "handler.failed"][seq % 4]
    level = LogLevel.ERROR if name == "handler.failed" else LogLevel.INFO
    fields: dict[str, Any] = {"seq": seq, "session_id": f"s{seq % 3}"}
    if name.startswith("command"):
        fields["command_id"] = f"c{seq % 5}"
    else:
        fields |= {"event_id": f"e{seq % 5}", "task_id": f"e{seq % 5}:g:h"}
    return name, level, fields


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Two services' logs, rotated, written out of time order, plus two bad lines."""
    folder = tmp_path / "logs"
    rotation = Rotation(max_bytes=1_500, backups=20)
    sinks = {name: JsonlSink(folder, name, rotation=rotation) for name in ("web", "worker")}
    # all of web's records first: only merging by ts puts them in order
    for service in ("web", "worker"):
        for seq in range(COUNT):
            if (seq % 2 == 0) == (service == "web"):
                name, level, fields = fields_of(seq)
                created = (T0 + timedelta(milliseconds=seq)).timestamp()
                sinks[service].emit(Record(level, name, fields, created=created))
    for sink in sinks.values():
        sink.close()
    assert (folder / "web.jsonl.2").exists() and (folder / "worker.jsonl.2").exists()
    with (folder / "web.jsonl.1").open("ab") as f:
        f.write(b'{"ts": "2025-03-01T12:00:00+00:00", "event": \n')  # corrupt
    with (folder / "worker.jsonl").open("ab") as f:
        f.write(b'{"ts": "2025-03-01T12:00:0')  # a last line cut short
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def seqs(out: str) -> list[int]:
    return [json.loads(line)["seq"] for line in out.splitlines()]


def test_every_file_is_read_and_merged_in_time_order(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "logs", "--log-dir", str(log_dir), "--json")

    assert code == 0
    assert seqs(out) == list(range(COUNT))
    assert "skipped 2 unreadable line(s)" in err
    assert "web.jsonl.1 (1)" in err and "worker.jsonl (1)" in err


def test_files_are_listed_oldest_backup_first(log_dir: Path) -> None:
    names = [p.name for p in log_files(log_dir) if p.name.startswith("web")]
    backups = sorted((int(n.rsplit(".", 1)[1]) for n in names[:-1]), reverse=True)
    assert names == [*(f"web.jsonl.{n}" for n in backups), "web.jsonl"]
    assert all(not p.name.endswith(".lock") for p in log_files(log_dir))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--level", "warning"], lambda s, n, lvl, f: lvl >= LogLevel.WARNING),
        (["--command-id", "c1"], lambda s, n, lvl, f: f.get("command_id") == "c1"),
        (["--event-id", "e2"], lambda s, n, lvl, f: f.get("event_id") == "e2"),
        (["--session-id", "s0"], lambda s, n, lvl, f: f["session_id"] == "s0"),
        (["--event", "command.result"], lambda s, n, lvl, f: n == "command.result"),
        (["--event", "handler."], lambda s, n, lvl, f: n.startswith("handler.")),
        (["--event", "handler*", "--event", "command.sent"],
         lambda s, n, lvl, f: n != "command.result"),
        (["--service", "web"], lambda s, n, lvl, f: s % 2 == 0),
        (["--event", "command.", "--session-id", "s1"],
         lambda s, n, lvl, f: n.startswith("command") and f["session_id"] == "s1"),
    ],
)  # fmt: skip
def test_filters(
    log_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: Any
) -> None:
    code, out, _ = run(capsys, "logs", "--log-dir", str(log_dir), "--json", *args)
    wanted = [s for s in range(COUNT) if expected(s, *fields_of(s))]
    assert code == 0 and wanted
    assert seqs(out) == wanted


def test_a_command_id_matches_its_task_records_and_an_event_id_its_handler_tasks() -> None:
    by_task = {"event": "task.revoked", "task_id": "c1"}
    handler_task = {"event": "task.rejected", "task_id": "e1:g:h"}
    assert RecordFilter(command_id="c1")(by_task)
    assert not RecordFilter(command_id="c2")(by_task)
    assert RecordFilter(event_id="e1")(handler_task)
    assert not RecordFilter(event_id="e")(handler_task)


def test_the_last_n_matching_records(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(
        capsys, "logs", "--log-dir", str(log_dir), "--json", "-n", "3", "--level", "ERROR"
    )
    assert seqs(out) == [s for s in range(COUNT) if s % 4 == 3][-3:]
    _, out, _ = run(capsys, "logs", "--log-dir", str(log_dir), "-n", "0")
    assert out == ""


def test_the_human_line_is_compact(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "logs", "--log-dir", str(log_dir), "-n", "1")
    host = os.uname().nodename
    assert out == (
        f"2025-03-01 12:00:00.059 ERROR    worker@{host}:{os.getpid()} handler.failed "
        "task_id=e4:g:h event_id=e4 session_id=s2 seq=59\n"
    )


def test_the_last_n_keep_the_merged_order_of_equal_times(tmp_path: Path) -> None:
    for name, seqs_of in (("a", (0, 2, 4)), ("b", (1, 3, 5))):
        with (tmp_path / f"{name}.jsonl").open("w") as f:
            for seq in seqs_of:  # two records per instant: a's first (its file is read first)
                f.write(json.dumps({"ts": T0.isoformat(), "event": "e", "seq": seq}) + "\n")
    everything = [r["seq"] for r in last_matching(tmp_path, RecordFilter(), None, Skipped())]
    assert everything == [0, 2, 4, 1, 3, 5]
    for n in range(7):
        found = last_matching(tmp_path, RecordFilter(), n, Skipped())
        assert [r["seq"] for r in found] == (everything[-n:] if n else [])


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    record = {"ts": T0.isoformat(), "event": "e", "text": "x" * 200}
    (tmp_path / "big.jsonl").write_text((json.dumps(record) + "\n") * 2_000)  # > a pipe's buffer
    command = [sys.executable, "-m", "llmgine_celery.cli", "logs", "--log-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()  # like ``| head -1``
        err = proc.stderr.read()
    assert proc.returncode == 0
    assert b"Traceback" not in err


def test_invalid_settings_are_reported_without_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMGINE_LOG_LEVEL", "bogus")
    code, out, err = run(capsys, "logs")
    assert (code, out) == (2, "")
    assert err.startswith("llmgine-celery: invalid LLMGINE_* settings") and "bogus" in err


def test_no_logs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "logs", "--log-dir", str(tmp_path / "none"))
    assert (code, out) == (1, "")
    assert "no JSONL logs in" in err


def test_the_folder_comes_from_the_settings(
    log_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMGINE_LOG_DIR", str(log_dir))
    assert seqs(run(capsys, "logs", "--json", "-n", "2")[1]) == [COUNT - 2, COUNT - 1]
    monkeypatch.delenv("LLMGINE_LOG_DIR")
    monkeypatch.setenv("LLMGINE_DATA_DIR", str(log_dir.parent))  # <data dir>/logs
    assert seqs(run(capsys, "logs", "--json", "-n", "1")[1]) == [COUNT - 1]


# -- trace ------------------------------------------------------------------------


def write_scenario(folder: Path) -> None:
    """The trace scenario's records, one file per service, as the JSONL sink lays them out."""
    folder.mkdir(exist_ok=True)
    for record in scenario().records:
        with (folder / f"{record['service']}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


def test_trace_prints_the_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_scenario(tmp_path)
    with (tmp_path / "alpha.jsonl").open("a") as f:
        f.write("not json\n")
    code, out, err = run(capsys, "trace", "C1", "--log-dir", str(tmp_path))

    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("command Shout C1")
    assert lines[1].startswith("├─ sent 2025-03-01 12:00:00.001 UTC by web on web-host pid 100")
    assert any("alpha/flaky: failed after 3 attempts, dead-lettered" in line for line in lines)
    assert any(line.strip().startswith("└─ event Done E3") for line in lines)
    assert "skipped 1 unreadable line(s)" in err and "alpha.jsonl (1)" in err


def test_trace_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_scenario(tmp_path)
    code, out, _ = run(capsys, "trace", "E1", "--log-dir", str(tmp_path), "--json")
    root = json.loads(out)["root"]

    assert code == 0
    assert (root["kind"], root["id"], root["cause"], root["cause_kind"]) == (
        "event",
        "E1",
        "C1",
        "command",
    )
    flaky = next(r for r in root["runs"] if r["handler"] == "flaky")
    assert [a["status"] for a in flaky["attempts"]] == ["retried", "retried", "failed"]
    assert flaky["attempts"][0]["hostname"] == "alpha-host"


def test_trace_of_an_unknown_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_scenario(tmp_path)
    code, out, err = run(capsys, "trace", "nothing-like-it", "--log-dir", str(tmp_path))
    assert (code, out) == (1, "")
    assert "no command or event 'nothing-like-it'" in err
    code, _, err = run(capsys, "trace", "C1", "--log-dir", str(tmp_path / "empty"))
    assert code == 1 and "no JSONL logs" in err


# -- follow -------------------------------------------------------------------------


def line(seq: int, **extra: Any) -> bytes:
    ts = (T0 + timedelta(milliseconds=seq)).isoformat()
    return (
        json.dumps({"ts": ts, "level": "INFO", "event": "tick", "seq": seq, **extra}).encode()
        + b"\n"
    )


def test_follower_reads_a_file_that_rotated_twice_between_polls(tmp_path: Path) -> None:
    path = tmp_path / "svc.jsonl"
    writer = AppendFile(path, Rotation(max_bytes=len(line(0)) * 3, backups=5))
    writer.write(line(0))
    follower = Follower(tmp_path, Skipped())
    assert [r["seq"] for r in follower.snapshot()] == [0]

    for seq in range(1, 10):  # three files' worth: two rotations before the next poll
        writer.write(line(seq))
    assert (tmp_path / "svc.jsonl.2").exists()
    assert [r["seq"] for r in follower.poll()] == list(range(1, 10))
    assert follower.poll() == []
    writer.close()
    follower.close()


def test_follower_drains_a_renamed_file_a_writer_still_appends_to(tmp_path: Path) -> None:
    path = tmp_path / "svc.jsonl"
    path.write_bytes(line(0))
    follower = Follower(tmp_path, Skipped())
    follower.snapshot()
    late = os.open(path, os.O_WRONLY | os.O_APPEND)  # a writer that has not seen the rotation
    path.rename(tmp_path / "svc.jsonl.1")
    path.write_bytes(line(2))
    assert [r["seq"] for r in follower.poll()] == [2]

    os.write(late, line(1))
    os.close(late)
    assert [r["seq"] for r in follower.poll()] == [1]
    (tmp_path / "svc.jsonl.1").unlink()  # retention drops it: the follower lets it go
    assert follower.poll() == []
    assert [t.path.name for t in follower._tails()] == ["svc.jsonl"]
    follower.close()


def test_follower_waits_for_a_line_to_be_finished(tmp_path: Path) -> None:
    path = tmp_path / "svc.jsonl"
    path.write_bytes(b"")
    skipped = Skipped()
    follower = Follower(tmp_path, skipped)
    follower.snapshot()
    whole = line(7)
    with path.open("ab") as f:
        f.write(whole[:10])
        f.flush()
        assert follower.poll() == []
        f.write(whole[10:] + b"garbage\n")
    assert [r["seq"] for r in follower.poll()] == [7]
    assert skipped.lines == {"svc.jsonl": 1}
    follower.close()


def test_follow_prints_new_records_across_rotations_until_stopped(tmp_path: Path) -> None:
    old = AppendFile(tmp_path / "web.jsonl")
    for seq in range(5):
        old.write(line(seq, service="web"))
    shown: list[dict[str, Any]] = []
    stop = threading.Event()
    keep = RecordFilter(events=("tick",))
    args = (tmp_path, keep, shown.append, Skipped())
    follower = threading.Thread(
        target=follow, args=args, kwargs={"initial": 2, "stop": stop, "interval": 0.01}
    )
    follower.start()
    try:
        wait_for(lambda: len(shown) == 2, timeout=10, what="the last two records")
        writer = AppendFile(
            tmp_path / "worker.jsonl", Rotation(max_bytes=len(line(0)) * 4, backups=3)
        )
        total = 200
        for seq in range(5, total):
            # stay less than backups' worth of lines ahead: retention must not drop unread files
            wait_for(lambda s=seq: len(shown) >= s - 2 - 8, timeout=10, what=f"record {seq - 10}")
            (old if seq % 7 == 0 else writer).write(line(seq, service="x"))
        wait_for(
            lambda: len(shown) == 2 + total - 5,
            timeout=10,
            what=f"every record {sorted(set(range(5, total)) - {r['seq'] for r in shown})}",
        )
    finally:
        stop.set()
        follower.join(10)
    assert not follower.is_alive()
    assert [r["seq"] for r in shown[:2]] == [3, 4]
    assert sorted(r["seq"] for r in shown[2:]) == list(range(5, total))  # each once
    assert len(list(tmp_path.glob("worker.jsonl.*"))) >= 3  # it did rotate


# -- docs ---------------------------------------------------------------------------


def test_every_command_in_the_tracing_docs_parses() -> None:
    docs = (REPO / "docs" / "tracing.md").read_text()
    commands = [line[2:] for line in docs.splitlines() if line.startswith("$ llmgine-celery ")]
    assert len(commands) >= 6
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.command in {"trace", "logs"}
