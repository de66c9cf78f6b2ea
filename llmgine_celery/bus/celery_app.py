"""Building an application's Celery app from Settings and Celery config modules."""

from __future__ import annotations

import importlib
import types
from typing import Any

from celery import Celery
from celery.app import backends
from celery.backends.redis import RedisBackend
from kombu.entity import Exchange, Queue

from llmgine_celery.bus import topology, worker_gc
from llmgine_celery.bus.result_backend import llmgine_redis_backend
from llmgine_celery.errors import ConfigurationError
from llmgine_celery.settings import Settings

#: what the framework guarantees; a config module may not weaken these
REQUIRED = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "event_serializer": "json",
}

#: defaults a config module may change
DEFAULTS: dict[str, Any] = {
    "task_default_queue": topology.COMMAND_QUEUE,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": False,
    "result_expires": 24 * 3600,
    "worker_hijack_root_logger": False,
    # task events feed Flower (and celery events / celery-exporter); "sent" events
    # would cost producers a second publish per command, so they stay Celery's default
    "worker_send_task_events": True,
}

#: llmgine's own parts of a worker; a config module may replace them
COMPONENTS: dict[str, Any] = {
    # Celery's consumer, sending those task events in batches
    "worker_consumer": "llmgine_celery.bus.worker_consumer:LLMgineConsumer",
}


class LLMgineCelery(Celery):
    """Celery with llmgine's Redis result backend (see ``result_backend``)."""

    def _get_backend(self) -> Any:
        backend_cls, url = backends.by_url(
            self.backend_cls or self.conf.result_backend, self.loader
        )
        if isinstance(backend_cls, type) and issubclass(backend_cls, RedisBackend):
            backend_cls = llmgine_redis_backend(backend_cls)
        return backend_cls(app=self, url=url)


def transport_of(url: str) -> str:
    """The kombu transport name of a broker URL (``amqp``, ``redis``, ...)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    return "amqp" if scheme in {"amqp", "amqps", "pyamqp"} else scheme


def embedded_transport_options(settings: Settings) -> dict[str, Any]:
    """Folders of the filesystem broker and result store under the data dir (made here)."""
    root = (settings.data_dir / "broker").resolve()
    queue, control = root / "queue", root / "control"
    for folder in (queue, control, (settings.data_dir / "results").resolve()):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "control_folder": str(control),
        "polling_interval": 0.02,
    }


def build_celery(
    name: str, settings: Settings, groups: list[str], extra_queues: set[str]
) -> LLMgineCelery:
    """A configured Celery app for application ``name``; connects to nothing."""
    broker = settings.broker()
    conf: dict[str, Any] = {**DEFAULTS, **COMPONENTS}
    if settings.embedded:
        conf["broker_transport_options"] = embedded_transport_options(settings)
    if settings.celery_config:
        conf.update(config_module_settings(settings.celery_config))
    _require_json(conf)
    conf.update(REQUIRED)
    conf["task_queues"] = task_queues(groups, extra_queues)
    celery = LLMgineCelery(name, broker=broker, backend=settings.backend(), set_as_current=False)
    celery.conf.update(conf)
    worker_gc.connect()  # acts only in a worker's processes
    return celery


def task_queues(groups: list[str], extra: set[str]) -> list[Queue]:
    """Celery queues a worker consumes: commands, each group's handlers, routed ones."""
    names = [
        topology.COMMAND_QUEUE,
        *(topology.handler_queue_name(g) for g in groups),
        *sorted(extra),
    ]
    return [Queue(n, Exchange(n, type="direct"), routing_key=n) for n in dict.fromkeys(names)]


def config_module_settings(module: str) -> dict[str, Any]:
    """The lowercase Celery settings defined in a config module."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"Celery config module {module!r} cannot be imported: {exc}"
        ) from exc
    return {
        k: v
        for k, v in vars(mod).items()
        if k.islower() and not k.startswith("_") and not isinstance(v, types.ModuleType)
    }


def _require_json(conf: dict[str, Any]) -> None:
    for key, wanted in REQUIRED.items():
        value = conf.get(key)
        if value is not None and value != wanted:
            raise ConfigurationError(
                f"Celery setting {key}={value!r} is not allowed: messages are JSON only"
            )
