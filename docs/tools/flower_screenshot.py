"""Take docs/flower-tasks.png: Flower's tasks page after the example application ran.

Run by hand from the repository root; it needs the broker and result backend in
LLMGINE_BROKER_URL / LLMGINE_RESULT_BACKEND and a Chromium (Debian: ``apt-get
install chromium``)::

    LLMGINE_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/ \\
    LLMGINE_RESULT_BACKEND=redis://127.0.0.1:6379/0 \\
    python docs/tools/flower_screenshot.py

It starts ``celery -A tasks.app:celery worker`` and ``celery -A tasks.app:celery
flower`` (on 127.0.0.1, basic auth with a one-off password), runs the demo's
commands (``tasks/demo.py``) as a producer, then has headless Chromium render the
tasks page, whose table Flower fills by JavaScript from ``/tasks/datatable``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib import request

REPO = Path(__file__).resolve().parents[2]
APP = "tasks.app:celery"
DEMO = "import asyncio; from tasks.demo import main; asyncio.run(main())"
#: no proxy, even if the environment names one: Flower is on this machine
HTTP = request.build_opener(request.ProxyHandler({}))
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait(probe: Callable[[], Any], what: str, logs: Path, timeout: float = 60.0) -> Any:
    """Poll ``probe`` until it returns something truthy; exit after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    sys.exit(f"flower_screenshot: timed out waiting for {what}; see the logs in {logs}")


@contextlib.contextmanager
def process(command: list[str], log: Path, env: dict[str, str]) -> Iterator[None]:
    """Run ``command`` (output to ``log``) for the duration of the block."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api(port: int, path: str, auth: str) -> Any:
    """GET a Flower API path with basic auth, decoded."""
    req = request.Request(f"http://127.0.0.1:{port}{path}")
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with HTTP.open(req, timeout=10) as response:
        return json.loads(response.read())


def demo_done(tasks: dict[str, Any]) -> bool:
    """True once Flower lists the demo's three commands and its handler run as succeeded."""
    done = [t for t in tasks.values() if t["state"] == "SUCCESS"]
    return len(done) >= 4 and any(t["name"].startswith("llmgine.event.") for t in done)


def screenshot(chromium: str, url: str, out: Path, size: str, budget_ms: int) -> None:
    """Render ``url`` headless into ``out`` (a PNG) with a fresh profile."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
            f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}", url,
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    """Start a worker and Flower, run the demo, take the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "flower-tasks.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--window-size", default="1600,640")
    parser.add_argument("--budget-ms", type=int, default=5000, help="virtual time for the JS")
    args = parser.parse_args(argv)
    if not os.environ.get("LLMGINE_BROKER_URL"):
        sys.exit("flower_screenshot: set LLMGINE_BROKER_URL and LLMGINE_RESULT_BACKEND")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    port = free_port()
    auth = f"flower:{secrets.token_urlsafe(12)}"
    celery = [sys.executable, "-m", "celery", "-A", APP]
    worker = [*celery, "worker", "-P", "threads", "-c", "4", "-n", "llm-app@%h", "-l", "INFO"]
    flower = [*celery, "flower", "--address=127.0.0.1", f"--port={port}"]
    logs = Path(tempfile.mkdtemp(prefix="flower-screenshot-"))
    with (
        process(flower, logs / "flower.log", {**env, "FLOWER_BASIC_AUTH": auth}),
        process(worker, logs / "worker.log", env),
    ):
        # A worker Flower has heard from: Flower's event receiver is on.
        heard = "/api/workers?status=true"
        wait(lambda: any(api(port, heard, auth).values()), "Flower to hear a worker", logs)
        subprocess.run([sys.executable, "-c", DEMO], cwd=REPO, env=env, check=True)
        wait(lambda: demo_done(api(port, "/api/tasks", auth)), "the demo's tasks", logs)
        url = f"http://{auth}@127.0.0.1:{port}/tasks"
        screenshot(args.chromium, url, args.out, args.window_size, args.budget_ms)
    shutil.rmtree(logs)
    print(f"flower_screenshot: wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
