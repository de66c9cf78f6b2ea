"""ApplicationBootstrap: wires the ObservabilityBus, the MessageBus and Celery."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kombu.exceptions import OperationalError

from llmgine_celery.bus import topology
from llmgine_celery.bus.celery_app import LLMgineCelery, build_celery, task_queues, transport_of
from llmgine_celery.bus.command_tasks import CommandHooks, register_command_task
from llmgine_celery.bus.correlation import from_headers, outgoing_headers
from llmgine_celery.bus.dead_letters import DeadLetter
from llmgine_celery.bus.embedded import EmbeddedWorker
from llmgine_celery.bus.event_consumer import event_consumer_step
from llmgine_celery.bus.events import (
    declare_groups,
    event_headers,
    publish_event,
    published_record,
)
from llmgine_celery.bus.handler_tasks import register_handler_task
from llmgine_celery.bus.message_bus import MessageBus
from llmgine_celery.bus.registry import CommandRoute, EventRoute, HandlerRegistry, RetryPolicy
from llmgine_celery.bus.tracing import NO_TRACER, Tracer
from llmgine_celery.errors import BrokerUnavailableError, ConfigurationError
from llmgine_celery.messages.commands import Command
from llmgine_celery.messages.envelope import encode
from llmgine_celery.messages.events import Event
from llmgine_celery.observability import LogLevel, ObservabilityBus, context, records, signals
from llmgine_celery.observability.bus import Record
from llmgine_celery.observability.observer import TaskObserver
from llmgine_celery.observability.setup import configure, metrics_hooks
from llmgine_celery.observability.threaded import flush_all
from llmgine_celery.settings import Settings, redact_url

C = TypeVar("C", bound=Command)
E = TypeVar("E", bound=Event)


@dataclass
class ApplicationConfig:
    """What names and sizes one application; deployment settings live in ``Settings``."""

    #: the application's name and default subscriber group (default: the class name)
    name: str | None = None
    #: deployment settings (default: ``Settings()`` read from the environment when first needed)
    settings: Settings | None = None
    #: threads of the embedded worker
    embedded_concurrency: int = 4
    #: seconds ``shutdown()`` waits for the embedded worker to finish queued work
    shutdown_timeout: float = 30.0
    #: extra keyword arguments of ``sentry_sdk.init`` (release, transport, ...)
    sentry_options: dict[str, Any] | None = None


class ApplicationBootstrap:
    """Base class of an application: register handlers, then bootstrap.

    Constructing it connects to nothing. ``.celery`` builds the Celery app and
    registers the handlers (so ``celery -A module:celery worker`` needs no
    ``bootstrap()``); ``await bootstrap()`` checks the broker, declares queues
    and, on the embedded default, starts a worker inside the process.
    """

    def __init__(self, config: ApplicationConfig | None = None) -> None:
        self.config = config or ApplicationConfig()
        self.name = topology.check_name("application name", self.config.name or type(self).__name__)
        self.obs_bus = ObservabilityBus(service=self.name)
        self._registry = HandlerRegistry(default_group=self.name)
        self._settings = self.config.settings
        self._celery: LLMgineCelery | None = None
        self._message_bus: MessageBus | None = None
        self._worker: EmbeddedWorker | None = None
        self._hooks_ran = False
        self._sentry: Any = None
        #: (group, handler) of each handler task, for the observer
        self._handler_names: dict[str, tuple[str, str]] = {}

    # -- hooks a subclass overrides ----------------------------------------

    def _register_command_handlers(self) -> None:
        """Register command handlers here (called once, before the Celery app is built)."""

    def _register_event_handlers(self) -> None:
        """Register event handlers here (called once, before the Celery app is built)."""

    # -- registration ------------------------------------------------------

    def register_command_handler(
        self, command_type: type[C], handler: Callable[[C], Any], *, queue: str | None = None
    ) -> None:
        """Make ``handler`` the one handler of ``command_type`` (sync or async)."""
        route = self._registry.add_command(command_type, handler, queue)
        if self._celery is not None:
            self._install_command(route)

    def register_event_handler(
        self,
        event_type: type[E],
        handler: Callable[[E], Any],
        *,
        group: str | None = None,
        name: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Subscribe ``handler`` to ``event_type`` in ``group`` (default: this application).

        A failing run is retried per ``retry`` (default: 3 retries, exponential
        backoff with jitter), then dead-lettered.
        """
        route = self._registry.add_event(event_type, handler, group, name, retry)
        if self._celery is not None:
            self._install_event(route)

    # -- wiring ------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """Deployment settings, read from the environment on first use."""
        if self._settings is None:
            self._settings = Settings()
        return self._settings

    @property
    def celery(self) -> LLMgineCelery:
        """The application's Celery app, with a task per command type and handler."""
        if self._celery is None:
            self._run_hooks()
            # Sentry first: its Celery integration must patch before workers load
            self._sentry = self._start_sentry()
            configure(self.obs_bus, self.settings)
            extra = {r.queue for r in self._registry.command_routes if r.queue}
            celery = build_celery(self.name, self.settings, self._groups(), extra)
            self._celery = celery
            self._observe(celery)
            for route in self._registry.command_routes:
                self._install_command(route)
            for event_route in self._registry.event_routes:
                self._install_event(event_route)
            celery.steps["consumer"].add(
                event_consumer_step(
                    self._registry,
                    self._transport(),
                    self._groups(),
                    self.settings.max_message_bytes,
                    self.settings.rebind_interval,
                    self._on_dead_letter,
                    self._tracer(),
                )
            )
        return self._celery

    @property
    def message_bus(self) -> MessageBus:
        """The MessageBus of this application."""
        if self._message_bus is None:
            self._message_bus = MessageBus(
                self.celery,
                self._registry,
                self.settings,
                local_only=self.settings.embedded and self.settings.runs_embedded_worker,
                obs=self.obs_bus,
                tracer=self._tracer(),
            )
        return self._message_bus

    async def bootstrap(self) -> None:
        """Check the broker, declare queues, start the embedded worker if configured."""
        self._run_hooks()
        await asyncio.to_thread(self.declare)
        if self.settings.runs_embedded_worker and self._worker is None:
            worker = EmbeddedWorker(
                self.celery, self._watched_queues(), self.config.embedded_concurrency
            )
            await asyncio.to_thread(worker.start)
            self._worker = worker
        self.obs_bus.log(LogLevel.DEBUG, "application bootstrapped", application=self.name)

    async def shutdown(self) -> None:
        """Finish queued work of the embedded worker, stop it, close connections."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            drained = await asyncio.to_thread(worker.wait_idle, self.config.shutdown_timeout)
            if not drained:
                self.obs_bus.log(LogLevel.WARNING, "shutdown timed out with work still queued")
            await asyncio.to_thread(worker.stop)
        if self._message_bus is not None:
            await self._message_bus.aclose()
        if self._celery is not None:
            self._celery.close()  # pooled broker connections; reopened if used again
        self.obs_bus.close()

    # -- internals -----------------------------------------------------------

    def _run_hooks(self) -> None:
        if not self._hooks_ran:
            self._hooks_ran = True
            self._register_command_handlers()
            self._register_event_handlers()

    def _groups(self) -> list[str]:
        groups = self._registry.groups
        wanted = self.settings.event_groups
        if wanted is None:
            return groups
        return [g.strip() for g in wanted.split(",") if g.strip()]

    def _transport(self) -> str:
        return transport_of(self.settings.broker())

    def _watched_queues(self) -> list[str]:
        celery_queues = [q.name for q in self.celery.conf.task_queues]
        return celery_queues + [topology.group_queue_name(g) for g in self._groups()]

    def _install_command(self, route: CommandRoute) -> None:
        celery = self.celery
        register_command_task(celery, self._registry, route, self._command_hooks())
        if route.queue:
            self._refresh_queues()

    def _install_event(self, route: EventRoute) -> None:
        self._handler_names[route.task_name] = (route.group, route.name)
        register_handler_task(
            self.celery, self._registry, route, self._transport(), self._on_dead_letter
        )
        self._refresh_queues()

    def _on_dead_letter(self, record: DeadLetter) -> None:
        event: dict[str, Any] = record.event if isinstance(record.event, dict) else {}
        found = event.get("data")
        data: dict[str, Any] = found if isinstance(found, dict) else {}
        fields = {
            "kind": record.kind,
            "reason": record.reason,
            "group": record.group,
            "handler": record.handler,
            "dead_letter_id": record.id,
            "task_id": record.task_id,
            "task_name": record.task_name,
            "queue": record.queue,
            "attempts": record.attempts,
            "error": record.error,
            "event_type": event.get("type"),
            "event_id": data.get("id"),
            "session_id": data.get("session_id"),
        }
        here = context.current()  # set while a handler task gives up
        if here is not None:
            fields.update(trace_id=here.trace_id, span_id=here.span_id)
        fields = {k: v for k, v in fields.items() if v is not None}
        self.obs_bus.emit(Record(LogLevel.WARNING, records.DEAD_LETTER, fields))

    # -- observability -------------------------------------------------------

    def _start_sentry(self) -> Any:
        """The Sentry module once Sentry is initialised here, else None."""
        if self.settings.sentry_dsn is None:
            return None
        from llmgine_celery.observability import sentry

        if not sentry.init_sentry(self.settings, self.name, self.config.sentry_options):
            return None
        return sentry

    def _tracer(self) -> Tracer:
        """Sentry's producer spans and header forwarding, when Sentry is on."""
        if self._sentry is None:
            return NO_TRACER
        return Tracer(
            producer_span=self._sentry.producer_span, forward=self._sentry.forward_trace_headers
        )

    def _observe(self, celery: LLMgineCelery) -> None:
        observer = TaskObserver(
            self.obs_bus,
            command_prefix=topology.COMMAND_TASK_PREFIX,
            handler_names=self._handler_names,
            correlation_from=from_headers,
            header_names=topology.CORRELATION_HEADERS,
            on_started=self._sentry.set_tags if self._sentry is not None else None,
        )
        signals.observe(celery, observer, topology.HEADER_SENT_AT)
        signals.on_process_exit(_flush_sinks)  # a prefork child's queued records
        hooks = metrics_hooks(self.settings, self._measured_queues)
        if hooks is not None:
            signals.on_worker_ready(hooks[0])
            signals.on_process_exit(hooks[1])

    def _measured_queues(self) -> list[str]:
        return [*self._watched_queues(), topology.DEAD_LETTER_QUEUE]

    def _command_hooks(self) -> CommandHooks:
        return CommandHooks(
            on_error=self._sentry.capture_error if self._sentry is not None else None,
            announce=self._announce if self.settings.command_events else None,
        )

    def _announce(self, event: Event) -> None:
        envelope = encode(event)
        headers = event_headers(envelope, outgoing_headers())
        publish_event(self.celery, self._transport(), envelope, headers=headers)
        self.obs_bus.emit(published_record(envelope, headers, self._transport()))

    def _refresh_queues(self) -> None:
        extra = {r.queue for r in self._registry.command_routes if r.queue}
        self.celery.conf.task_queues = task_queues(self._groups(), extra)

    def declare(self) -> list[str]:
        """Check the broker and backend; declare every queue, exchange and binding.

        Idempotent. Deployments run it (``llmgine-celery declare``) so commands
        and events sent before any worker starts are kept. Returns queue names.
        """
        self._run_hooks()
        url = redact_url(self.settings.broker())
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=self.settings.connect_timeout)
                channel = conn.default_channel
                for queue in self.celery.conf.task_queues:
                    queue(channel).declare()
            declare_groups(self.celery, self._transport(), self._groups())
        except (OperationalError, OSError) as exc:
            raise BrokerUnavailableError(f"cannot connect to broker {url}: {exc}") from exc
        except (KeyError, ValueError) as exc:
            raise ConfigurationError(f"broker URL {url} is not usable: {exc}") from exc
        self._check_backend()
        return self._watched_queues()

    def _check_backend(self) -> None:
        url = self.settings.backend()
        if not url.startswith(("redis://", "rediss://")):
            return
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=self.settings.connect_timeout)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailableError(
                f"cannot reach result backend {redact_url(url)}: {exc}"
            ) from exc
        finally:
            client.close()


def _flush_sinks(pid: int) -> None:
    flush_all()
