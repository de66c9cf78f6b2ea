"""Building an application's sinks and worker hooks from ``Settings``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmgine_celery.observability.appendfile import Rotation
from llmgine_celery.observability.bus import ConsoleSink, LogLevel, ObservabilityBus, Sink
from llmgine_celery.observability.jsonl import JsonlSink
from llmgine_celery.observability.threaded import ThreadedSink
from llmgine_celery.settings import Settings

logger = logging.getLogger(__name__)


def configured_sinks(settings: Settings, service: str) -> list[Sink]:
    """The sinks ``settings`` turn on: console, JSONL file, Prometheus metrics.

    The file and the metrics are written by one thread per process, in
    batches, off the threads that run commands and handlers.
    """
    level = LogLevel[settings.log_level]
    sinks: list[Sink] = [ConsoleSink(level=level, lifecycle=settings.log_console)]
    background: list[Sink] = []
    if settings.log_jsonl:
        rotation = Rotation(max_bytes=settings.log_max_bytes, backups=settings.log_backups)
        background.append(
            JsonlSink(
                settings.logs, service, secrets=settings.secrets(), level=level, rotation=rotation
            )
        )
    if settings.metrics:
        from llmgine_celery.observability import metrics

        metrics.configure_multiprocess(settings.metrics_folder)
        background.append(metrics.MetricsSink())
    if background:
        sinks.append(ThreadedSink(*background))
    return sinks


def configure(bus: ObservabilityBus, settings: Settings) -> None:
    """Give ``bus`` the configured sinks (in place of its default console sink)."""
    bus.configure(configured_sinks(settings, bus.service))


def metrics_hooks(
    settings: Settings, queue_names: Callable[[], list[str]]
) -> tuple[Callable[[Any], None], Callable[[int], None]] | None:
    """``(on_worker_ready, on_process_exit)`` callbacks of the metrics server, if enabled.

    The server reports ``celery_queue_length`` of ``queue_names()`` too.
    """
    if not settings.metrics or settings.metrics_port is None:
        return None
    from llmgine_celery.observability import metrics
    from llmgine_celery.observability.metrics_server import broker_queue_lengths

    host, port = settings.metrics_host, settings.metrics_port
    servers: list[Any] = []

    def start(app: Any) -> None:
        if servers:  # one per worker process, however often the signal comes
            return
        lengths = broker_queue_lengths(app.connection_for_read, queue_names())
        server = metrics.serve(host, port, queue_lengths=lengths)
        servers.append(server)
        logger.info("serving Prometheus metrics on %s", server.url)

    return start, metrics.process_exited
