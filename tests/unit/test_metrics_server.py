"""The metrics folder (multiprocess mode) and the /metrics server.

Anything that puts a process in multiprocess mode runs in a subprocess, so this
test process keeps prometheus-client as it found it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability.metrics import (
    serve,
)
from llmgine_celery.observability.metrics_server import QueueLengthCollector
from tests.support import listening_address

REPO = Path(__file__).resolve().parents[2]


# -- the server ---------------------------------------------------------------------


def run_python(script: str, env: dict[str, str] | None = None) -> str:
    """Run ``script`` in a fresh interpreter (warnings are errors); its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def folder_value(folder: Path, metric: str, /, **labels: str) -> float | None:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return registry.get_sample_value(metric, labels)


def record_commands(folder: Path, count: int, *, children: int = 0) -> None:
    """Count ``count`` successful commands in a subprocess (and in each of its forked children)."""
    run_python(
        f"""
        import os
        import prometheus_client  # imported first, as another library might
        from pathlib import Path
        from llmgine_celery.observability import metrics
        from llmgine_celery.observability.bus import LogLevel, Record

        metrics.configure_multiprocess(Path({str(folder)!r}))
        sink = metrics.MetricsSink()

        def commands():
            for _ in range({count}):
                sink.emit(Record(LogLevel.INFO, "command.result",
                                 {{"command_type": "Ask", "outcome": "success"}}))

        commands()
        pids = []
        for _ in range({children}):
            pid = os.fork()
            if pid == 0:
                commands()
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        """
    )


def commands_in(folder: Path) -> float | None:
    return folder_value(folder, "llmgine_command_total", command_type="Ask", outcome="success")


# -- multiprocess mode and its folder ---------------------------------------------


def test_a_new_run_wipes_the_files_of_a_finished_one(tmp_path: Path) -> None:
    record_commands(tmp_path, 2)
    assert commands_in(tmp_path) == 2.0
    record_commands(tmp_path, 3)
    assert commands_in(tmp_path) == 3.0


def test_records_still_queued_at_exit_are_counted_before_the_files_close(tmp_path: Path) -> None:
    out = run_python(
        f"""
        from pathlib import Path
        from llmgine_celery.observability import metrics
        from llmgine_celery.observability.bus import LogLevel, Record
        from llmgine_celery.observability.threaded import ThreadedSink

        metrics.configure_multiprocess(Path({str(tmp_path)!r}))
        sink = ThreadedSink(metrics.MetricsSink())
        record = Record(LogLevel.INFO, "command.result",
                        {{"command_type": "Ask", "outcome": "success"}})
        sink.emit(record)
        sink.flush()  # the metric and its file exist
        for _ in range(5):  # queued for the writer thread; the process exits at once
            sink.emit(record)
        print("queued")
        """
    )
    assert out.strip() == "queued"
    assert commands_in(tmp_path) == 6.0


def test_a_process_joining_a_live_folder_keeps_its_files(tmp_path: Path) -> None:
    live = subprocess.Popen(
        [sys.executable, "-W", "error", "-c", RECORD_AND_WAIT, str(tmp_path), "4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "recorded"
        record_commands(tmp_path, 3)
        assert commands_in(tmp_path) == 7.0  # the live process's 4 were not wiped
    finally:
        live.communicate("", timeout=30)
    assert live.returncode == 0
    record_commands(tmp_path, 1)  # everybody left: a new run starts from zero
    assert commands_in(tmp_path) == 1.0


RECORD_AND_WAIT = """
import sys
from pathlib import Path
from llmgine_celery.observability import metrics
from llmgine_celery.observability.bus import LogLevel, Record

metrics.configure_multiprocess(Path(sys.argv[1]))
sink = metrics.MetricsSink()
for _ in range(int(sys.argv[2])):
    fields = {"command_type": "Ask", "outcome": "success"}
    sink.emit(Record(LogLevel.INFO, "command.result", fields))
print("recorded", flush=True)
sys.stdin.read()
"""


def test_multiprocess_mode_after_in_memory_metrics_is_refused() -> None:
    run_python(
        """
        from pathlib import Path
        import tempfile
        from llmgine_celery.errors import ConfigurationError
        from llmgine_celery.observability import metrics
        from llmgine_celery.observability.bus import LogLevel, Record

        metrics.MetricsSink().emit(Record(LogLevel.INFO, "event.published", {"event_type": "E"}))
        try:
            metrics.configure_multiprocess(Path(tempfile.mkdtemp()))
        except ConfigurationError as exc:
            assert "before configure_multiprocess" in str(exc), exc
        else:
            raise AssertionError("multiprocess mode came after in-memory metrics")
        """
    )


def test_switching_folders_moves_later_measurements(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    run_python(
        f"""
        from pathlib import Path
        from llmgine_celery.observability import metrics
        from llmgine_celery.observability.bus import LogLevel, Record

        sink = metrics.MetricsSink()

        def commands(count):
            for _ in range(count):
                sink.emit(Record(LogLevel.INFO, "command.result",
                                 {{"command_type": "Ask", "outcome": "success"}}))

        for folder, count in [({str(first)!r}, 1), ({str(second)!r}, 2), ({str(first)!r}, 4)]:
            metrics.configure_multiprocess(Path(folder))
            metrics.configure_multiprocess(Path(folder))  # again: nothing changes
            commands(count)
        """
    )
    assert commands_in(first) == 5.0
    assert commands_in(second) == 2.0


def test_process_exited_forgets_a_dead_childs_running_tasks(tmp_path: Path) -> None:
    out = run_python(
        f"""
        import os
        from pathlib import Path
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from llmgine_celery.observability import metrics
        from llmgine_celery.observability.bus import LogLevel, Record

        folder = Path({str(tmp_path)!r})
        metrics.configure_multiprocess(folder)
        sink = metrics.MetricsSink(hostname="h")

        def active():
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(folder))
            return registry.get_sample_value("celery_worker_tasks_active", {{"hostname": "h"}})

        pid = os.fork()
        if pid == 0:  # dies mid-task, as a killed prefork child would
            sink.emit(Record(LogLevel.INFO, "task.started", {{"state": "started", "task_id": "t"}}))
            os._exit(0)
        os.waitpid(pid, 0)
        print(active())
        metrics.process_exited(pid)
        print(active())
        """
    )
    assert out.split() == ["1.0", "None"]


def test_serve_exposes_the_folders_sum_on_localhost(tmp_path: Path) -> None:
    record_commands(tmp_path, 3, children=2)
    server = serve("127.0.0.1", 0, folder=tmp_path)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        line = 'llmgine_command_total{command_type="Ask",outcome="success"}'
        assert f"{line} 9.0" in body.splitlines()
        assert listening_address(server.port) == "127.0.0.1"
    finally:
        server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=10)


def test_a_file_still_being_created_does_not_fail_the_scrape(tmp_path: Path) -> None:
    record_commands(tmp_path, 2, children=0)
    (tmp_path / "counter_99999.db").touch()  # created, not yet sized, by another process
    server = serve("127.0.0.1", 0, folder=tmp_path)
    try:
        body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        line = 'llmgine_command_total{command_type="Ask",outcome="success"}'
        assert f"{line} 2.0" in body.splitlines()
    finally:
        server.close()


def test_serve_refuses_a_busy_port_clearly(tmp_path: Path) -> None:
    server = serve("127.0.0.1", 0, folder=tmp_path)
    try:
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{server.port}"):
            serve("127.0.0.1", server.port, folder=tmp_path)
    finally:
        server.close()


def test_serve_needs_a_folder() -> None:
    run_python(
        """
        from llmgine_celery.errors import ConfigurationError
        from llmgine_celery.observability.metrics import serve
        try:
            serve("127.0.0.1", 0)
        except ConfigurationError as exc:
            assert "configure_multiprocess" in str(exc)
        else:
            raise AssertionError("served without a folder")
        """
    )


def test_queue_lengths_are_asked_once_per_ttl(tmp_path: Path) -> None:
    asked: list[int] = []

    def lengths() -> dict[str, int]:
        asked.append(1)
        return {"llmgine.commands": len(asked)}

    server = serve("127.0.0.1", 0, folder=tmp_path, queue_lengths=lengths, queue_lengths_ttl=60)
    try:
        for _ in range(3):
            body = urllib.request.urlopen(server.url, timeout=10).read().decode()
            assert 'celery_queue_length{queue_name="llmgine.commands"} 1.0' in body
        assert len(asked) == 1
    finally:
        server.close()
    collector = QueueLengthCollector(lengths, ttl=0)
    samples = [s.value for m in collector.collect() for s in m.samples]
    assert samples == [len(asked)]  # a zero ttl asks on every scrape


def test_a_failing_queue_length_leaves_the_scrape_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record_commands(tmp_path, 1)

    def lengths() -> dict[str, int]:
        raise ConnectionRefusedError("broker away")

    server = serve("127.0.0.1", 0, folder=tmp_path, queue_lengths=lengths)
    try:
        with caplog.at_level(logging.WARNING, "llmgine_celery.observability.metrics"):
            body = urllib.request.urlopen(server.url, timeout=10).read().decode()
    finally:
        server.close()
    assert "celery_queue_length" not in body
    assert "llmgine_command_total" in body
    assert "broker away" in caplog.text
