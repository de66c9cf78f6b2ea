"""Observability: the ObservabilityBus, its records and sinks."""

from llmgine_celery.observability.bus import (
    ConsoleSink,
    LogLevel,
    ObservabilityBus,
    Record,
    Sink,
)

__all__ = ["ConsoleSink", "LogLevel", "ObservabilityBus", "Record", "Sink"]
