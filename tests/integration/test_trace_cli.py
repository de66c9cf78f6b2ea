"""``llmgine-celery trace`` and ``logs`` on the JSONL logs of a real producer and worker.

The producer in this process and a worker process write into one folder; the
command's handler publishes an event that a handler of another group handles.
The CLI runs as a subprocess, as an operator would run it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from llmgine_celery import ApplicationConfig, Settings
from llmgine_celery.bus import topology
from llmgine_celery.observability.logview import Skipped, read_records
from tests.integration.obs_apps import APP_NAME, LISTENERS, Ask, Doomed, ObsApp
from tests.support import (
    DEPLOYMENTS,
    REPO,
    WorkerProcess,
    clean_env,
    execute_once,
    producer_settings,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.integration

WAIT = 30.0
CLI = [sys.executable, "-m", "llmgine_celery.cli"]


@dataclass
class Logged:
    """A producer and a worker writing JSONL into one folder."""

    app: ObsApp
    worker: WorkerProcess
    logs: Path

    def has(self, **match: Any) -> bool:
        records = read_records(self.logs, Skipped())
        return any(all(r.get(k) == v for k, v in match.items()) for r in records)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = clean_env(LLMGINE_LOG_DIR=str(self.logs))
        return subprocess.run(
            [*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def logged(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Logged]:
    broker_name = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    tmp = tmp_path_factory.mktemp(f"trace-{broker_name}")
    logs = tmp / "logs"
    base = producer_settings(broker_name, tmp)
    settings = Settings(**{**base.model_dump(), "log_dir": logs, "metrics": False})
    app = ObsApp(ApplicationConfig(name=APP_NAME, settings=settings))
    app.declare()
    with app.celery.connection_for_write() as conn:
        names = [topology.COMMAND_QUEUE, topology.group_queue_name(LISTENERS),
                 topology.handler_queue_name(LISTENERS), topology.DEAD_LETTER_QUEUE]  # fmt: skip
        for name in names:
            conn.default_channel.queue_purge(name)
    worker = start_worker(
        "tests.integration.obs_apps:celery",
        broker,
        backend,
        log_dir=tmp,
        env={"LLMGINE_LOG_DIR": str(logs), "LLMGINE_METRICS": "false"},
    )
    try:
        yield Logged(app, worker, logs)
    finally:
        worker.stop()
        asyncio.run(app.shutdown())


def execute(app: ObsApp, command: Any) -> Any:
    return execute_once(app, command, WAIT)


def answered(logged: Logged, command: Ask) -> str:
    """Run ``command``; wait until its event's handler run is logged; the event's id."""
    result = execute(logged.app, command)
    assert result.success, result.error
    wait_for(
        lambda: logged.has(event="event.published", causation_id=command.id),
        WAIT,
        what="the event the handler published",
    )
    (event_id,) = {
        r["event_id"]
        for r in read_records(logged.logs, Skipped())
        if r["event"] == "event.published" and r.get("causation_id") == command.id
    }
    wait_for(
        lambda: logged.has(event="handler.succeeded", event_id=event_id),
        WAIT,
        what="the event's handler run",
    )
    return str(event_id)


def test_trace_prints_the_command_its_run_its_event_and_the_event_handler_run(
    logged: Logged,
) -> None:
    command = Ask(prompt="trace me", session_id="s-trace")
    event_id = answered(logged, command)
    host, worker_pid = socket.gethostname(), logged.worker.proc.pid

    done = logged.cli("trace", command.id)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"command Ask {command.id}  session s-trace  trace ")
    (sent,) = [line for line in lines if "sent " in line]
    assert f"by {APP_NAME} on {host} pid {sys.modules['os'].getpid()}" in sent
    assert f"to {topology.COMMAND_QUEUE}" in sent
    (run,) = [line for line in lines if "handler: " in line]
    assert "handler: success in " in run
    assert f"on {host} pid {worker_pid} ({logged.worker.node})" in run
    (event,) = [line for line in lines if f"event Answered {event_id}" in line]
    (handled,) = [line for line in lines if f"{LISTENERS}/heard: " in line]
    assert f"{LISTENERS}/heard: succeeded in " in handled and f"pid {worker_pid}" in handled
    # the event hangs under the command's run, and the handler run under the event
    assert _depth(event) > _depth(run) and _depth(handled) > _depth(event)
    assert lines.index(run) < lines.index(event) < lines.index(handled)
    # what the handlers logged, under their runs
    (said,) = [line for line in lines if "log INFO answering" in line]
    assert 'prompt="trace me"' in said and lines.index(run) < lines.index(said)
    assert any("log INFO heard" in line and 'text="TRACE ME"' in line for line in lines)


def _depth(line: str) -> int:
    return len(line) - len(line.lstrip("│├└─ "))


def test_trace_json_holds_where_and_how_each_run_went(logged: Logged) -> None:
    command = Ask(prompt="as json")
    event_id = answered(logged, command)

    done = logged.cli("trace", command.id, "--json")

    assert done.returncode == 0, done.stderr
    root = json.loads(done.stdout)["root"]
    assert (root["kind"], root["id"], root["type"]) == ("command", command.id, "Ask")
    assert root["sent"]["service"] == APP_NAME
    (run,) = root["runs"]
    (attempt,) = run["attempts"]
    assert attempt["status"] == attempt["outcome"] == "success"
    assert attempt["hostname"] == socket.gethostname()
    assert attempt["pid"] == logged.worker.proc.pid
    assert attempt["worker"] == logged.worker.node
    assert attempt["duration_ms"] > 0 and attempt["queue_wait_ms"] >= 0
    (event,) = run["caused"]
    assert (event["kind"], event["id"], event["type"]) == ("event", event_id, "Answered")
    assert event["trace_id"] == root["trace_id"] and event["cause"] == command.id
    (handler,) = event["runs"]
    assert (handler["group"], handler["handler"], handler["status"]) == (
        LISTENERS,
        "heard",
        "succeeded",
    )
    assert handler["attempts"][0]["duration_ms"] >= 0


def test_trace_of_an_event_shows_retries_and_the_dead_letter(logged: Logged) -> None:
    event = Doomed(text="never")
    logged.app.message_bus.publish_sync(event)
    wait_for(lambda: logged.has(event="dead_letter", event_id=event.id), WAIT, what="the DLQ")

    done = logged.cli("trace", event.id)

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"event Doomed {event.id}")
    assert f"{LISTENERS}/doomed: failed after 3 attempts, dead-lettered" in out
    assert out.count("error: ValueError: cannot handle never") == 3
    assert "attempt 1: retried" in out and "attempt 3: failed" in out
    assert "dead_letter at +" in out and "handler_failed" in out


def test_trace_of_an_unknown_id_fails_clearly(logged: Logged) -> None:
    done = logged.cli("trace", "no-such-command-id")
    assert done.returncode == 1 and done.stdout == ""
    assert "no command or event 'no-such-command-id'" in done.stderr


def test_logs_filters_a_command_and_an_event_name(logged: Logged) -> None:
    command = Ask(prompt="filtered")
    event_id = answered(logged, command)

    by_command = logged.cli("logs", "--command-id", command.id, "--json")
    names = [json.loads(line)["event"] for line in by_command.stdout.splitlines()]
    assert names == ["command.sent", "command.started", "command.result"]
    handler = logged.cli("logs", "--event", "handler.", "--event-id", event_id)
    lines = handler.stdout.splitlines()
    assert [line.split()[4] for line in lines] == ["handler.started", "handler.succeeded"]
    assert all(f"{APP_NAME}@{socket.gethostname()}:" in line for line in lines)


def test_logs_follow_prints_records_as_they_are_written(logged: Logged) -> None:
    env = clean_env(LLMGINE_LOG_DIR=str(logged.logs))
    args = [*CLI, "logs", "-f", "-n", "0", "--event", "command.result", "--json"]
    follower = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    err: list[str] = []
    readers = [_reader(follower.stdout, out), _reader(follower.stderr, err)]
    try:
        wait_for(lambda: any("following" in line for line in err), WAIT, what="the follower")
        command = Ask(prompt="follow me")
        assert execute(logged.app, command).success

        def shown() -> bool:
            return any(json.loads(line).get("command_id") == command.id for line in list(out))

        wait_for(shown, WAIT, what="the command's result record on the follower's stdout")
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(20)
        for reader in readers:
            reader.join(5)
    assert code == 0, err
    assert all(json.loads(line)["event"] == "command.result" for line in out)


def _reader(stream: IO[str] | None, into: list[str]) -> threading.Thread:
    """A thread appending each line of ``stream`` to ``into``, closing it at its end."""

    def read() -> None:
        assert stream is not None
        with stream:
            for line in stream:
                into.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread
