"""Worker subprocesses of the benchmark and the CPU accounting of processes and host."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from llmgine_celery.errors import LLMgineError

REPO_ROOT = Path(__file__).resolve().parent.parent
#: seconds a worker may take to answer a ping after it is started
READY_TIMEOUT = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: result keys deleted per Redis round trip
FORGET_CHUNK = 1000


class BenchError(Exception):
    """A result was missing or wrong, or a worker did not start or died."""


# -- CPU accounting ----------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and its reaped children) from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / CLOCK_TICKS


def host_busy_seconds() -> float:
    """CPU seconds every core of the host has been busy (user, system, irq) since boot."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = stat.readline().split()[1:8]
    return sum(int(t) for t in (user, nice, system, irq, softirq)) / CLOCK_TICKS


def _running_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def process_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds used so far by the processes ``pids`` (those that still run)."""
    total = 0.0
    for pid in pids:
        try:
            total += _proc_stat(pid)[1]
        except (OSError, ValueError):
            continue  # exited meanwhile
    return total


def processes_named(name: str) -> list[int]:
    """The pids of the processes whose command name (``/proc/<pid>/comm``) is ``name``."""
    found = []
    for pid in _running_pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(pid)
        except OSError:
            continue  # exited meanwhile
    return found


def process_tree(root: int) -> list[int]:
    """Process ``root`` and its descendants (a prefork pool's children), as running now."""
    parents: dict[int, int] = {}
    for pid in _running_pids():
        try:
            parents[pid] = _proc_stat(pid)[0]
        except (OSError, ValueError):
            continue  # exited meanwhile
    tree, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.extend(children)
        frontier.extend(children)
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by process ``root`` and its descendants (prefork pool)."""
    return process_cpu_seconds(process_tree(root))


# -- workers -----------------------------------------------------------------


@dataclass
class Worker:
    """A subprocess of one side: a ``celery worker``, or another consumer."""

    label: str
    node: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    terminating: bool = False

    def cpu_seconds(self) -> float:
        self.check_alive()
        return tree_cpu_seconds(self.process.pid)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.label} worker exited with status {self.process.returncode}:\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text) or f"(empty log {self.log_path})"

    def terminate(self) -> None:
        """Ask for a warm shutdown (once) without waiting for it."""
        if self.process.poll() is None and not self.terminating:
            self.terminating = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Warm shutdown; its whole session is killed if that takes too long."""
        try:
            if self.process.poll() is None:
                self.terminate()
                try:
                    self.process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        finally:
            self.log.close()


def start_worker(
    label: str,
    app_spec: str,
    args: argparse.Namespace,
    logdir: Path,
    queues: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO_ROOT,
) -> Worker:
    """Start a worker of ``app_spec`` (on ``queues`` if given) in its own session, in ``cwd``."""
    node = f"bench-{label}-{os.getpid()}@{socket.gethostname()}"
    command = [
        *(sys.executable, "-m", "celery", "-A", app_spec, "worker"),
        *("-P", args.pool, "-c", str(args.concurrency), "-l", "WARNING", "-n", node),
        *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        *(("-Q", ",".join(queues)) if queues else ()),
    ]
    if args.prefetch_multiplier is not None:
        command += ["--prefetch-multiplier", str(args.prefetch_multiplier)]
    return start_process(label, node, command, logdir, env, cwd)


def start_process(
    label: str,
    node: str,
    command: Sequence[str],
    logdir: Path,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path = REPO_ROOT,
) -> Worker:
    """Start ``command`` in ``cwd`` (the repository root) in its own session, logging to ``logdir``.

    ``cwd`` comes first on the child's ``sys.path``, before ``PYTHONPATH``.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **(extra_env or {}),
    }
    log_path = logdir / f"{label}-worker.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Worker(label, node, process, log_path, log)


def wait_ready(worker: Worker, celery_app: Any) -> None:
    """Ping ``worker`` until it answers; fail if it exits or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        worker.check_alive()
        replies = celery_app.control.ping(destination=[worker.node], timeout=0.5)
        if any(worker.node in reply for reply in replies):
            return
    raise BenchError(f"{worker.label} worker did not answer pings:\n{worker.log_tail()}")


@contextmanager
def running_workers(
    specs: Sequence[tuple[str, str, Any]],
    args: argparse.Namespace,
    logdir: Path,
    queues: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[dict[str, Worker]]:
    """Start a worker per (label, app spec, Celery app), wait for all, stop them after.

    ``queues`` names the queues (``-Q``) of some labels; the others consume their defaults.
    Each worker gets its own metrics folder (one of the two ways ``docs/metrics.md``
    gives for several workers on one host; the other is one folder, one server).
    """
    workers: dict[str, Worker] = {}
    try:
        for label, app_spec, _ in specs:
            env = {"LLMGINE_METRICS_DIR": str(logdir / f"metrics-{label}")}
            workers[label] = start_worker(
                label, app_spec, args, logdir, (queues or {}).get(label, ()), env
            )
        for label, _, celery_app in specs:
            wait_ready(workers[label], celery_app)
        yield workers
    finally:
        stop_all(workers.values())


def stop_all(workers: Iterable[Worker]) -> None:
    """Stop workers at the same time (a warm shutdown can take seconds each)."""
    workers = list(workers)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()


def prepare_queues(celery_app: Any) -> None:
    """Declare and purge the app's task queues; refuse queues someone else consumes."""
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in celery_app.conf.task_queues:
            claim_queue(queue(channel))


def claim_queue(bound: Any) -> None:
    """Declare a kombu queue bound to a channel and purge it; refuse one someone consumes."""
    bound.declare()
    _, _, consumers = bound.queue_declare(passive=True)
    if consumers:
        raise BenchError(
            f"queue {bound.name} already has {consumers} consumer(s) on this broker; "
            "stop them or point --broker at another vhost"
        )
    bound.purge()


def vhost_url(base: str, vhost: str) -> str:
    """``base`` (an amqp URL) pointed at ``vhost``, created with rabbitmqctl if missing."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is not None:
        listed = subprocess.run([ctl, "-q", "list_vhosts"], capture_output=True, text=True)
        if vhost not in listed.stdout.split():
            subprocess.run([ctl, "-q", "add_vhost", vhost], check=True)
            perms = ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]
            subprocess.run([ctl, "-q", *perms], check=True)
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + vhost, "", ""))


def add_versus_checkout(parser: argparse.ArgumentParser, help: str) -> None:
    """The ``--versus-checkout PATH`` option: another llmgine-celery checkout's worker."""
    parser.add_argument("--versus-checkout", type=Path, metavar="PATH", help=help)


def check_versus_checkout(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve ``--versus-checkout``; a folder without the package is a usage error."""
    if args.versus_checkout is not None:
        args.versus_checkout = args.versus_checkout.resolve()
        if not (args.versus_checkout / "llmgine_celery" / "__init__.py").is_file():
            parser.error(f"--versus-checkout: no llmgine_celery package in {args.versus_checkout}")


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def add_worker_options(parser: argparse.ArgumentParser, threads_help: str | None = None) -> None:
    """``--broker``, ``--backend``, ``--concurrency``, ``--pool`` and ``--prefetch-multiplier``."""
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--backend", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--concurrency", type=int, default=8, help=threads_help or "worker threads/processes"
    )
    parser.add_argument("--pool", choices=["threads", "prefork"], default="threads")
    parser.add_argument(
        "--prefetch-multiplier",
        type=int,
        default=None,
        help="every worker's worker_prefetch_multiplier (default: the framework's, 1)",
    )


def run_main(args: argparse.Namespace, run: Callable[[argparse.Namespace], list[str]]) -> int:
    """Run a benchmark in the environment ``args`` set; print its lines, or why it failed (1)."""
    configure_environment(args)
    try:
        lines = run(args)
    except (BenchError, LLMgineError) as exc:
        log(f"benchmark failed: {exc}")
        return 1
    print("\n".join(lines))
    return 0


def configure_environment(args: argparse.Namespace) -> None:
    """Only the settings given here reach the llmgine apps, here and in the workers."""
    for key in [k for k in os.environ if k.startswith("LLMGINE_")]:
        del os.environ[key]
    os.environ["LLMGINE_BROKER_URL"] = args.broker
    os.environ["LLMGINE_RESULT_BACKEND"] = args.backend
    os.environ["LLMGINE_EMBEDDED_WORKER"] = "false"


class SentTasks:
    """The task ids a benchmark side sent since it last deleted their stored results.

    Left alone the results would stay in Redis for ``result_expires`` (a day):
    some 1.5 KB per call, hundreds of MB per day of benchmarking.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._ids: list[str] = []

    def add(self, task_id: str) -> None:
        """Note one sent task (thread-safe: a list append)."""
        self._ids.append(task_id)

    def forget(self) -> None:
        """Delete the stored results of the tasks noted so far (outside any timed run)."""
        ids, self._ids = self._ids, []
        unlink_keys(self._backend.client, [self._backend.get_key_for_task(i) for i in ids])


def unlink_keys(client: Any, keys: Sequence[Any]) -> None:
    """Delete ``keys`` from Redis, a chunk per round trip."""
    for start in range(0, len(keys), FORGET_CHUNK):
        client.unlink(*keys[start : start + FORGET_CHUNK])


def log(message: str) -> None:
    """Progress, on stderr (tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)
