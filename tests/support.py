"""Real services and real worker processes for the integration tiers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery

from llmgine_celery import ApplicationBootstrap, Command, CommandResult, Settings

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")

#: tests use their own RabbitMQ vhost and Redis databases, so they neither see
#: nor purge the queues of anything else running on the same servers
TEST_VHOST = "llmgine-test"
RABBITMQ_URL = os.environ.get(
    "TEST_RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:5672/{TEST_VHOST}"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
REDIS_BROKER_URL = os.environ.get("TEST_REDIS_BROKER_URL", "redis://127.0.0.1:6379/15")

#: broker name -> (broker URL, result backend URL)
DEPLOYMENTS = {
    "rabbitmq": (RABBITMQ_URL, REDIS_URL),
    "redis": (REDIS_BROKER_URL, REDIS_BROKER_URL),
}


#: every broker with every pool: the matrix of the worker-process fixtures
BROKERS_AND_POOLS = [
    ("rabbitmq", "threads"),
    ("rabbitmq", "prefork"),
    ("redis", "threads"),
    ("redis", "prefork"),
]


def broker_and_pool_id(param: tuple[str, str]) -> str:
    """The test id of one ``BROKERS_AND_POOLS`` entry."""
    return f"{param[0]}-{param[1]}"


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``rabbitmqctl -q *args`` on this machine; fail the test if it fails (``check``)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail(f"rabbitmqctl not found: create vhost {TEST_VHOST!r} or set TEST_RABBITMQ_URL")
    done = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {done.stderr}")
    return done


def ensure_test_vhost() -> None:
    """Create the tests' RabbitMQ vhost with rabbitmqctl, when it is missing."""
    if "TEST_RABBITMQ_URL" in os.environ:
        return
    if TEST_VHOST in rabbitmqctl("list_vhosts", check=False).stdout.split():
        return
    rabbitmqctl("add_vhost", TEST_VHOST)
    rabbitmqctl("set_permissions", "-p", TEST_VHOST, "guest", ".*", ".*", ".*")


def message_count(app: ApplicationBootstrap, queue: str) -> int:
    """How many messages RabbitMQ holds in ``queue`` (declared passively)."""
    with app.celery.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def execute_once(app: ApplicationBootstrap, command: Command, timeout: float) -> CommandResult:
    """``app.message_bus.execute(command)`` on a fresh event loop, its bus closed after."""

    async def run() -> CommandResult:
        try:
            return await app.message_bus.execute(command, timeout=timeout)
        finally:
            await app.message_bus.aclose()

    return asyncio.run(run())


def listening_address(port: int) -> str:
    """The local address of the socket listening on ``port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


def wait_for(probe: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def connections_named(broker_name: str, celery: Celery, name: str) -> Iterator[None]:
    """Name the connections ``celery`` opens meanwhile, so the server can tell them apart."""
    conf = celery.conf
    options = conf.broker_transport_options
    named = (
        {"client_name": name}
        if broker_name == "redis"
        else {"client_properties": {"connection_name": name}}
    )
    conf.broker_transport_options = {**options, **named}
    try:
        yield
    finally:
        conf.broker_transport_options = options


def close_connections(broker_name: str, name: str) -> None:
    """Close the connections named ``name`` on the server, as a broker restart would."""
    if broker_name == "redis":
        with redis.Redis.from_url(REDIS_BROKER_URL) as client:

            def named() -> list[dict[str, Any]]:
                return [c for c in client.client_list() if c["name"] == name]

            # The connection that waits in BRPOP opens with the first wait for a message.
            wait_for(lambda: any(c["cmd"] == "brpop" for c in named()), what="the BRPOP")
            for found in named():
                client.client_kill_filter(_id=found["id"])
        return
    if shutil.which("rabbitmqctl") is None or "TEST_RABBITMQ_URL" in os.environ:
        pytest.skip("closing a RabbitMQ connection needs rabbitmqctl on this machine")
    for (pid,) in rabbitmq_connections(name, "pid"):
        rabbitmqctl("close_connection", pid, "test")


def rabbitmq_connections(name: str, *items: str) -> list[list[str]]:
    """``items`` (rabbitmqctl's ``list_connections`` columns) of the connections named ``name``."""
    listed = rabbitmqctl("list_connections", *items, "client_properties", check=False).stdout
    return [
        line.split("\t")[: len(items)]
        for line in listed.splitlines()
        if f'{{"connection_name","{name}"}}' in line
    ]


def require_service(url: str) -> None:
    """Skip when ``url``'s server is not answering; fail instead in CI."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2).close()
    except OSError as exc:
        message = f"{parts.scheme} server at {parts.hostname}:{parts.port} is not answering: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def producer_settings(broker_name: str, data_dir: Path) -> Settings:
    """Settings of a producer (no embedded worker) on a test deployment whose servers answer."""
    broker, backend = DEPLOYMENTS[broker_name]
    require_service(broker)
    require_service(backend)
    if broker_name == "rabbitmq":
        ensure_test_vhost()
    return Settings(
        broker_url=broker, result_backend=backend, embedded_worker=False, data_dir=data_dir
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without LLMGINE_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGINE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def children_of(pid: int) -> set[int]:
    """Pids of the direct children of ``pid``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


@dataclass
class WorkerProcess:
    """A ``celery worker`` subprocess started by a test."""

    proc: subprocess.Popen[bytes]
    node: str
    log: Path
    pool: str
    control: Celery = field(repr=False)

    @property
    def pids(self) -> set[int]:
        """The worker's main process and its pool processes."""
        return {self.proc.pid} | children_of(self.proc.pid)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll with ping until the worker answers (or fail with its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"worker {self.node} exited early:\n{self.log.read_text()[-4000:]}")
            if self.control.control.ping(destination=[self.node], timeout=0.5):
                return
        pytest.fail(f"worker {self.node} not ready in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), killing it if it does not exit in time."""
        stop_process(self.proc, timeout)
        self.control.close()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM ``proc``, then SIGKILL it if it does not exit within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_worker(
    app_spec: str,
    broker: str,
    backend: str,
    *,
    pool: str = "threads",
    concurrency: int = 4,
    log_dir: Path,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    ready: bool = True,
) -> WorkerProcess:
    """Start ``celery -A app_spec worker`` against real servers and wait until it answers.

    ``ready=False`` returns once the process is started: for a broker that would
    hold the answer back (a memory alarm blocks the ping's reply).
    """
    node = f"test-{pool}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    log = log_dir / f"{node.split('@')[0]}.log"
    command = [
        sys.executable, "-m", "celery", "-A", app_spec, "worker",
        "-P", pool, "-c", str(concurrency), "-n", node, "-l", "INFO",
        "--without-mingle", "--without-gossip", *extra_args,
    ]  # fmt: skip
    worker_env = clean_env(LLMGINE_BROKER_URL=broker, LLMGINE_RESULT_BACKEND=backend, **(env or {}))
    # logs and metrics files of this worker stay in the test's folder
    worker_env.setdefault("LLMGINE_DATA_DIR", str(log_dir / f"{node.split('@')[0]}-data"))
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=worker_env, stdout=out, stderr=out)
    control = Celery("test-control", broker=broker, backend=backend, set_as_current=False)
    worker = WorkerProcess(proc, node, log, pool, control)
    if not ready:
        return worker
    try:
        worker.wait_ready()
    except BaseException:
        worker.stop()
        raise
    return worker
