"""The ``/metrics`` HTTP server: the multiprocess folder's aggregate, and queue lengths.

A worker's main process serves every file of the folder (its own, its prefork
children's, and those of any other process sharing the folder), summed by
prometheus-client's ``MultiProcessCollector``. Optionally it asks the broker
for queue lengths on scrape (``celery_queue_length``), cached for a few seconds
so that frequent scrapes do not hammer the broker.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability.metrics_folder import multiprocess_folder

logger = logging.getLogger("llmgine_celery.observability.metrics")

#: queue name -> messages waiting
QueueLengths = Callable[[], Mapping[str, int]]


class MetricsServer:
    """A running ``/metrics`` server; ``close()`` stops it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def host(self) -> str:
        """The address it is bound to."""
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, when asked for port 0)."""
        return int(self._httpd.server_port)

    @property
    def url(self) -> str:
        """Where to scrape it."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


#: bytes of a metrics file's header: a shorter file is still being created
MIN_FILE_BYTES = 8


def serve(
    host: str,
    port: int,
    *,
    folder: Path | None = None,
    queue_lengths: QueueLengths | None = None,
    queue_lengths_ttl: float = 5.0,
) -> MetricsServer:
    """Serve the metrics of ``folder`` (default: the configured one) on ``host:port``.

    ``queue_lengths``, if given, is asked for ``celery_queue_length`` at most
    every ``queue_lengths_ttl`` seconds (see :func:`broker_queue_lengths`).
    """
    folder = folder if folder is not None else multiprocess_folder()
    if folder is None:
        raise ConfigurationError(
            "no metrics folder: call configure_multiprocess() first or pass folder="
        )
    registry = CollectorRegistry(auto_describe=False)
    try:
        _SettledFilesCollector(registry, path=str(folder))
    except ValueError as exc:
        raise ConfigurationError(f"metrics folder {folder} is not a directory") from exc
    if queue_lengths is not None:
        registry.register(QueueLengthCollector(queue_lengths, queue_lengths_ttl))
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    return MetricsServer(httpd, thread)


class _SettledFilesCollector(MultiProcessCollector):
    """Skips files another process has created but not yet sized.

    prometheus-client creates a process's file empty, then extends it; a scrape
    reading it in between fails as a whole (HTTP 500, seen in a test). An
    extended file is zero-filled until written, which reads as no samples.
    """

    def collect(self) -> Any:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):  # gone since the listing: a dead process's
                if os.path.getsize(path) >= MIN_FILE_BYTES:
                    files.append(path)
        return self.merge(files, accumulate=True)


class QueueLengthCollector:
    """``celery_queue_length{queue_name}``, asked of the broker on scrape and cached briefly."""

    def __init__(self, lengths: QueueLengths, ttl: float = 5.0) -> None:
        self._lengths = lengths
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: Mapping[str, int] = {}
        self._at = float("-inf")

    def collect(self) -> Iterator[Metric]:
        """One gauge sample per queue; none while the broker cannot answer."""
        with self._lock:  # one broker round trip at a time, however many scrapers
            if time.monotonic() - self._at >= self._ttl:
                self._cached = self._ask()
                self._at = time.monotonic()
            lengths = self._cached
        if lengths:
            family = GaugeMetricFamily(
                "celery_queue_length", "Messages waiting in a broker queue.", labels=["queue_name"]
            )
            for name, length in sorted(lengths.items()):
                family.add_metric([name], float(length))
            yield family

    def _ask(self) -> Mapping[str, int]:
        try:
            return dict(self._lengths())
        except Exception as exc:  # a scrape must not fail because the broker is away
            logger.warning("queue lengths unavailable: %s: %s", type(exc).__name__, exc)
            return {}


def broker_queue_lengths(
    connect: Callable[[], AbstractContextManager[Any]], queues: Sequence[str]
) -> QueueLengths:
    """A :data:`QueueLengths` asking a kombu connection (RabbitMQ or Redis) about ``queues``.

    ``connect()`` returns a new kombu connection (e.g. ``app.connection_for_read``).
    Each queue is declared passively on its own channel: RabbitMQ reports its
    ``message_count``, kombu's Redis transport the length of its lists (every
    priority). A missing queue counts 0 (Redis drops an empty list's key).
    """
    from kombu.exceptions import ChannelError

    def lengths() -> dict[str, int]:
        found: dict[str, int] = {}
        with connect() as conn:
            for queue in queues:
                # a failed passive declare closes its channel on RabbitMQ
                with conn.channel() as channel:
                    try:
                        found[queue] = int(
                            channel.queue_declare(queue=queue, passive=True).message_count
                        )
                    except ChannelError as exc:
                        if not _not_found(exc):
                            raise
                        found[queue] = 0
        return found

    return lengths


def _not_found(exc: BaseException) -> bool:
    return getattr(exc, "code", None) == 404 or "NOT_FOUND" in str(exc)
