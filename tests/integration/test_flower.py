"""Flower watching a real worker: each command type and handler under its own name.

Flower runs as ``celery -A module:celery flower`` bound to 127.0.0.1 with basic
auth, exactly as docs/flower.md tells; the test reads its HTTP API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib import error, request

import pytest

from llmgine_celery import ApplicationConfig, CommandResult
from tests.integration.flower_apps import (
    APP_NAME,
    Answered,
    AskWithKey,
    CountWords,
    FlowerApp,
    key_digest,
)
from tests.support import (
    DEPLOYMENTS,
    REPO,
    WorkerProcess,
    clean_env,
    producer_settings,
    start_worker,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.integration

APP_SPEC = "tests.integration.flower_apps:celery"
HANDLERS = ("archive_answer", "bill_answer")
#: /proc/net/tcp's state code of a listening socket
TCP_LISTEN = "0A"
#: no proxy, even if the environment names one: Flower is on this machine
HTTP = request.build_opener(request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class FlowerProcess:
    """A ``celery flower`` subprocess started by a test."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    auth: tuple[str, str]

    def get(self, path: str, *, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        """Status and body of GET ``path``, with basic ``auth`` if given."""
        req = request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth is not None:
            token = base64.b64encode(":".join(auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with HTTP.open(req, timeout=10) as response:
                return response.status, response.read()
        except error.HTTPError as exc:
            try:
                return exc.code, exc.read()
            finally:
                exc.close()

    def body(self, path: str) -> bytes:
        """The body of an authenticated GET that must succeed."""
        status, body = self.get(path, auth=self.auth)
        assert status == 200, (path, status, body[:500])
        return body

    def api(self, path: str) -> Any:
        """Decoded JSON of an authenticated API call."""
        return json.loads(self.body(path))

    def answers(self) -> bool:
        """True once the health check answers (failing if Flower exited)."""
        if self.proc.poll() is not None:
            pytest.fail(f"flower exited early:\n{self.log.read_text()[-4000:]}")
        try:
            return self.get("/healthcheck") == (200, b"OK")
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if Flower does not exit in time."""
        stop_process(self.proc, timeout)


def start_flower(
    app_spec: str, broker: str, backend: str, *, log_dir: Path, auth: tuple[str, str]
) -> FlowerProcess:
    """Start Flower on 127.0.0.1 with basic auth and wait until it answers."""
    port = free_port()
    command = [
        sys.executable, "-m", "celery", "-A", app_spec, "flower",
        "--address=127.0.0.1", f"--port={port}",
    ]  # fmt: skip
    env = clean_env(LLMGINE_BROKER_URL=broker, LLMGINE_RESULT_BACKEND=backend)
    env = {k: v for k, v in env.items() if not k.startswith("FLOWER_")}
    # as docs/flower.md says: from the environment, so `ps` never shows the password
    env["FLOWER_BASIC_AUTH"] = ":".join(auth)
    log = log_dir / f"flower-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    flower = FlowerProcess(proc, port, log, auth)
    try:
        wait_for(flower.answers, timeout=60, what=f"flower on port {port}")
    except BaseException:
        flower.stop()
        raise
    return flower


@dataclass
class Watched:
    """Commands and an event run through a real worker while Flower watched."""

    broker_name: str
    worker: WorkerProcess
    flower: FlowerProcess
    secret: str
    ask: AskWithKey
    count: CountWords
    event: Answered
    results: list[CommandResult]

    def tasks(self, *task_ids: str) -> dict[str, Any]:
        """Flower's view of these tasks, once every one of them has succeeded."""

        def done() -> dict[str, Any]:
            listed: dict[str, Any] = self.flower.api("/api/tasks")
            ok = all(listed.get(t, {}).get("state") == "SUCCESS" for t in task_ids)
            return listed if ok else {}

        return wait_for(done, timeout=30, what=f"Flower to list {task_ids} as SUCCESS")


async def run_traffic(
    app: FlowerApp, ask: AskWithKey, count: CountWords, event: Answered
) -> list[CommandResult]:
    """Execute both commands and publish the event, from this (producer) process."""
    bus = app.message_bus
    try:
        results = [await bus.execute(ask, timeout=30), await bus.execute(count, timeout=30)]
        await bus.publish(event)
        return results
    finally:
        await bus.aclose()


def purge(app: FlowerApp) -> None:
    """Drop messages earlier runs left on this application's queues."""
    names = app.declare()
    with app.celery.connection_for_write() as conn:
        for name in names:
            conn.default_channel.queue_purge(name)


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def watched(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Watched]:
    """A worker and Flower on one broker, after the traffic ran."""
    broker_name = request.param
    broker, backend = DEPLOYMENTS[broker_name]
    tmp = tmp_path_factory.mktemp(f"flower-{broker_name}")
    app = FlowerApp(ApplicationConfig(name=APP_NAME, settings=producer_settings(broker_name, tmp)))
    secret = f"sk-live-{uuid.uuid4().hex}"
    auth = ("flower", f"pw-{uuid.uuid4().hex[:12]}")
    with contextlib.ExitStack() as stack:  # stops Flower, then the worker, whatever fails
        stack.callback(app.celery.close)
        purge(app)
        worker = start_worker(APP_SPEC, broker, backend, log_dir=tmp)
        stack.callback(worker.stop)
        flower = start_flower(APP_SPEC, broker, backend, log_dir=tmp, auth=auth)
        stack.callback(flower.stop)
        # Flower sees only events sent after its receiver consumes; a worker
        # heartbeat (every 2 s) it has heard proves the receiver is on.
        wait_for(
            lambda: flower.api("/api/workers?status=true").get(worker.node),
            what="Flower to hear the worker's heartbeat",
        )
        ask = AskWithKey(prompt="what carries commands", api_key=secret, session_id="s-flower")
        count = CountWords(text="one two three")
        event = Answered(prompt="what carries commands", words=3, session_id="s-flower")
        results = asyncio.run(run_traffic(app, ask, count, event))
        yield Watched(broker_name, worker, flower, secret, ask, count, event, results)


@pytest.mark.parametrize("path", ["/api/tasks", "/api/workers", "/tasks", "/tasks/datatable"])
def test_flower_asks_for_credentials(watched: Watched, path: str) -> None:
    flower = watched.flower
    assert flower.get(path)[0] == 401
    assert flower.get(path, auth=(flower.auth[0], "wrong"))[0] == 401


def test_each_command_type_is_listed_under_its_own_task_name(watched: Watched) -> None:
    assert all(r.success for r in watched.results), [r.error for r in watched.results]
    ask, count = watched.ask, watched.count
    tasks = watched.tasks(ask.id, count.id)
    for command in (ask, count):
        task = tasks[command.id]
        type_name = type(command).__name__
        assert task["name"] == f"llmgine.command.{type_name}"
        assert task["uuid"] == command.id
        assert task["worker"] == watched.worker.node
        # "<Type id>", possibly followed by the redacted fields
        assert task["args"].startswith(f"<{type_name} {command.id}>"), task["args"]


def test_each_event_handler_is_listed_under_its_own_task_name(watched: Watched) -> None:
    event = watched.event
    task_ids = {h: f"{event.id}:{APP_NAME}:{h}" for h in HANDLERS}
    tasks = watched.tasks(*task_ids.values())
    for handler, task_id in task_ids.items():
        task = tasks[task_id]
        assert task["name"] == f"llmgine.event.{APP_NAME}.{handler}"
        assert task["worker"] == watched.worker.node
        assert task["args"].startswith(f"<Answered {event.id}>"), task["args"]


def test_a_secret_field_never_shows_in_flower(watched: Watched) -> None:
    ask = watched.ask
    # The key did travel: the handler saw it in the very messages Flower watched.
    assert watched.results[0].result["key_digest"] == key_digest(watched.secret)
    task = watched.tasks(ask.id)[ask.id]
    fields = task["args"].removeprefix(f"<AskWithKey {ask.id}>").strip()
    if fields:  # the fields are shown: the key's value is masked, the prompt is not
        shown = json.loads(fields)
        assert shown["api_key"] == "***"
        assert shown["prompt"] == ask.prompt
    secret = watched.secret.encode()
    datatable = "/tasks/datatable?draw=1&start=0&length=100&order[0][column]=0"
    for path in ("/api/tasks", f"/api/task/info/{ask.id}", f"/task/{ask.id}", datatable):
        body = watched.flower.body(path)
        assert ask.id.encode() in body, path  # the page does show the command
        assert secret not in body, path


def test_workers_lists_the_worker_and_its_task_names(watched: Watched) -> None:
    node = watched.worker.node

    def listed() -> dict[str, Any]:
        # refresh: Flower asks the workers now (its start-up inspection may predate them)
        workers: dict[str, Any] = watched.flower.api("/api/workers?refresh=1")
        worker: dict[str, Any] = workers.get(node, {})
        return worker if "registered" in worker else {}

    worker = wait_for(listed, what=f"Flower to list {node}")
    expected = {f"llmgine.command.{t}" for t in ("AskWithKey", "CountWords")}
    expected |= {f"llmgine.event.{APP_NAME}.{h}" for h in HANDLERS}
    assert expected <= set(worker["registered"])


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def proc_address(text: str) -> Address:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word in little-endian order."""
    words = (bytes.fromhex(text[i : i + 8])[::-1] for i in range(0, len(text), 8))
    return ipaddress.ip_address(b"".join(words))


def listening_addresses(pid: int, port: int) -> list[Address]:
    """Local addresses of the TCP sockets listening on ``port``, from /proc/<pid>/net."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            columns = line.split()
            address, hex_port = columns[1].split(":")
            if columns[3] == TCP_LISTEN and int(hex_port, 16) == port:
                found.append(proc_address(address))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/net")
def test_flower_listens_on_the_loopback_interface_only(watched: Watched) -> None:
    flower = watched.flower
    addresses = listening_addresses(flower.proc.pid, flower.port)
    assert addresses, f"nothing listens on port {flower.port}"
    assert all(a.is_loopback for a in addresses), addresses
