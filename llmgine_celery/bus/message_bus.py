"""The MessageBus: execute commands and publish events through Celery."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.exceptions import OperationalError

from llmgine_celery.bus import results, topology
from llmgine_celery.bus.celery_app import transport_of
from llmgine_celery.bus.confirms import ConfirmChannel
from llmgine_celery.bus.correlation import outgoing_headers
from llmgine_celery.bus.events import (
    event_headers,
    events_exchange,
    publish_event,
    published_record,
)
from llmgine_celery.bus.publisher import BatchPublisher, Confirmation
from llmgine_celery.bus.registry import HandlerRegistry
from llmgine_celery.bus.sender import CommandSender
from llmgine_celery.bus.subscriptions import E, Subscription, subscribe
from llmgine_celery.bus.tracing import NO_TRACER, Tracer
from llmgine_celery.bus.waiters import PollingResultWaiter, RedisResultWaiter, ResultWaiter
from llmgine_celery.errors import BrokerUnavailableError
from llmgine_celery.messages.commands import Command, CommandResult
from llmgine_celery.messages.envelope import Envelope, encode, type_name
from llmgine_celery.messages.events import Event
from llmgine_celery.observability import records
from llmgine_celery.observability.bus import LogLevel, ObservabilityBus, Record
from llmgine_celery.settings import Settings, redact_url

if TYPE_CHECKING:
    from celery import Celery


@dataclass(frozen=True)
class _BrokerConfirmation:
    """A confirmation whose broker trouble comes out as ``BrokerUnavailableError``."""

    confirm: Confirmation
    broker_errors: Callable[[], AbstractContextManager[None]]

    def settled(self) -> bool:
        return self.confirm.settled()

    def __call__(self) -> None:
        with self.broker_errors():
            self.confirm()


def _fail_wait(waiter: ResultWaiter, task_id: str, error: BaseException | None) -> None:
    if error is not None:
        waiter.fail(task_id, error)


def _command_span(
    command: Command, envelope: Envelope, correlation: dict[str, Any]
) -> tuple[str, str, str | None, dict[str, Any]]:
    fields = {
        "command_id": command.id,
        "command_type": envelope["type"],
        "session_id": command.session_id,
        "trace_id": correlation.get(topology.HEADER_TRACE_ID),
    }
    return topology.command_task_name(envelope["type"]), command.id, None, fields


def _event_span(
    event: Event, envelope: Envelope, correlation: dict[str, Any]
) -> tuple[str, str, str | None, dict[str, Any]]:
    fields = {
        "event_id": event.id,
        "event_type": envelope["type"],
        "session_id": event.session_id,
        "trace_id": correlation.get(topology.HEADER_TRACE_ID),
    }
    return f"publish {envelope['type']}", event.id, topology.EVENTS_EXCHANGE, fields


@dataclass(frozen=True)
class CommandHandle:
    """A command that was sent; its result can be fetched later, here or elsewhere."""

    command_id: str
    command_type: str
    bus: MessageBus
    #: the result already known when sending (no worker can handle the type)
    ready: CommandResult | None = None

    def get(self, timeout: float | None = None) -> CommandResult:
        """Wait (blocking) for the result."""
        if self.ready is not None:
            return self.ready
        return self.bus.fetch_result_sync(self.command_id, timeout, self.command_type)

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait (without blocking the loop) for the result."""
        if self.ready is not None:
            return self.ready
        return await self.bus.fetch_result(self.command_id, timeout, self.command_type)


class MessageBus:
    """Commands (one handler, a result) and events (any handlers) over Celery."""

    def __init__(
        self,
        celery: Celery,
        registry: HandlerRegistry,
        settings: Settings,
        *,
        local_only: bool = False,
        obs: ObservabilityBus | None = None,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.celery = celery
        self._obs = obs
        self._span = tracer.producer_span
        self._registry = registry
        self._settings = settings
        #: True when the only worker is in this process (embedded default)
        self._local_only = local_only
        self._transport = transport_of(settings.broker())
        #: batched publisher confirms for commands and events, on RabbitMQ
        self._confirms = (
            ConfirmChannel(celery.connection_for_write, events_exchange(self._transport))
            if self._transport == "amqp"
            else None
        )
        self._publisher = BatchPublisher(celery.producer_or_acquire, acks=self._confirms)
        self._sender = CommandSender(celery, registry)
        self._waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ResultWaiter] = (
            weakref.WeakKeyDictionary()
        )

    # -- commands ---------------------------------------------------------

    async def execute(self, command: Command, timeout: float | None = None) -> CommandResult:
        """Run ``command`` on a worker and return its result; never raises for handler failures."""
        envelope = encode(command)  # a bad payload fails here, before anything is sent
        wait_for = self._timeout(timeout)
        missing = self._missing_handler(command)
        if missing is not None:
            return missing
        waiter = self._waiter()
        reply_to = waiter.reply_to  # the worker publishes the result there too
        waiter.expect(command.id, replied=reply_to is not None)
        correlation = outgoing_headers()
        with self._span(*_command_span(command, envelope, correlation)) as trace:
            # Not awaited: the result wakes this call; a failed send fails the wait.
            self._publisher.post(
                functools.partial(
                    self._send,
                    command,
                    envelope,
                    correlation={**correlation, **trace},
                    reply_to=reply_to,
                ),
                on_error=functools.partial(_fail_wait, waiter, command.id),
            )
            meta = await waiter.wait(command.id, wait_for)
        if meta is None:
            return self._timed_out(command.id, envelope["type"], wait_for)
        return results.from_meta(command.id, meta)

    def execute_sync(self, command: Command, timeout: float | None = None) -> CommandResult:
        """``execute`` for code without an event loop (web views, scripts)."""
        return self.send(command).get(timeout)

    def send(self, command: Command) -> CommandHandle:
        """Only enqueue ``command``; the handle fetches its result later.

        On RabbitMQ it returns once the broker confirmed the message; one it
        refused raises ``BrokerUnavailableError``. When no worker can have a
        handler (the embedded default, with none registered here), nothing is
        sent and the handle holds the failure.
        """
        envelope = encode(command)
        missing = self._missing_handler(command)
        if missing is None:
            correlation = outgoing_headers()
            with self._span(*_command_span(command, envelope, correlation)) as trace:
                send = functools.partial(
                    self._send, command, envelope, correlation={**correlation, **trace}
                )
                if self._confirms is None:
                    send()
                else:  # the confirm channel is the publisher thread's: returns once confirmed
                    self._publisher.submit_sync(send)
        return CommandHandle(command.id, envelope["type"], self, ready=missing)

    async def fetch_result(
        self, command_id: str, timeout: float | None = None, command_type: str = "command"
    ) -> CommandResult:
        """The result of a command sent earlier, from any process, by id."""
        wait_for = self._timeout(timeout)
        waiter = self._waiter()
        waiter.expect(command_id)
        meta = await waiter.wait(command_id, wait_for)
        if meta is None:
            return self._timed_out(command_id, command_type, wait_for)
        return results.from_meta(command_id, meta)

    def fetch_result_sync(
        self, command_id: str, timeout: float | None = None, command_type: str = "command"
    ) -> CommandResult:
        """``fetch_result`` without an event loop."""
        wait_for = self._timeout(timeout)
        async_result = self.celery.AsyncResult(command_id)
        try:
            async_result.get(timeout=wait_for, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            return self._timed_out(command_id, command_type, wait_for)
        meta = {
            "status": async_result.state,
            "result": async_result.result,
            "traceback": async_result.traceback,
        }
        return results.from_meta(command_id, meta)

    # -- events -----------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Publish ``event`` to every subscriber group; returns once the broker has it.

        On RabbitMQ "has it" means confirmed: concurrent publishes wait for
        their confirmations at the same time, not one after another.
        """
        envelope = encode(event)
        correlation = outgoing_headers()
        with self._span(*_event_span(event, envelope, correlation)) as trace:
            headers = event_headers(envelope, {**correlation, **trace})
            await self._publisher.submit(functools.partial(self._publish, envelope, headers))
        self._published(envelope, headers)

    def publish_sync(self, event: Event) -> None:
        """``publish`` for code without an event loop."""
        envelope = encode(event)
        correlation = outgoing_headers()
        with self._span(*_event_span(event, envelope, correlation)) as trace:
            headers = event_headers(envelope, {**correlation, **trace})
            self._publisher.submit_sync(functools.partial(self._publish, envelope, headers))
        self._published(envelope, headers)

    def subscribe(
        self, *event_types: type[E], session_id: str | None = None, max_buffer: int = 1000
    ) -> Subscription[E]:
        """Events published anywhere while ``async with`` is open, by type and session.

        ``async with bus.subscribe(MyEvent, session_id=sid) as events:
        async for event in events: ...`` streams through a queue of this
        process's own, removed when the block ends however it ends.
        """
        return subscribe(
            self.celery, self._transport, *event_types, session_id=session_id, max_buffer=max_buffer
        )

    # -- lifecycle --------------------------------------------------------

    async def aclose(self) -> None:
        """Close this loop's result waiter and the publisher thread."""
        waiter = self._waiters.pop(asyncio.get_running_loop(), None)
        if waiter is not None:
            await waiter.aclose()
        await asyncio.to_thread(self._publisher.close)
        if self._confirms is not None:
            self._confirms.close()

    # -- internals --------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        return self._settings.command_timeout if timeout is None else timeout

    def _missing_handler(self, command: Command) -> CommandResult | None:
        if self._local_only and self._registry.command_route(type(command)) is None:
            return results.no_handler(command.id, type_name(type(command)))
        return None

    def _send(
        self,
        command: Command,
        envelope: Envelope,
        producer: Any = None,
        correlation: dict[str, Any] | None = None,
        reply_to: str | None = None,
    ) -> Confirmation | None:
        with self._broker_errors():
            if self._confirms is None:
                self._sender.send(command, envelope, producer, correlation, reply_to)
                return None
            # on RabbitMQ, through Celery's publisher on the confirm channel
            send = functools.partial(
                self._sender.send,
                command,
                envelope,
                correlation=correlation,
                reply_to=reply_to,
                retry=False,
            )
            confirm = self._confirms.publish_with(send)
        return _BrokerConfirmation(confirm, self._broker_errors)

    def _publish(
        self, envelope: Envelope, headers: dict[str, Any], producer: Any = None
    ) -> Confirmation | None:
        headers = {**headers, topology.HEADER_SENT_AT: time.time()}
        with self._broker_errors():
            if self._confirms is None:
                publish_event(self.celery, self._transport, envelope, producer, headers)
                return None
            confirm = self._confirms.publish(envelope, headers, topology.EVENTS_ROUTING_KEY)
        return _BrokerConfirmation(confirm, self._broker_errors)

    def _published(self, envelope: Envelope, headers: dict[str, Any]) -> None:
        if self._obs is not None:
            self._obs.emit(published_record(envelope, headers, self._transport))

    def _timed_out(self, command_id: str, command_type: str, waited: float) -> CommandResult:
        if self._obs is not None:
            fields = {
                "command_id": command_id,
                "command_type": command_type,
                "task_id": command_id,
                "outcome": "timeout",
                "duration_ms": round(waited * 1000, 3),
            }
            self._obs.emit(Record(LogLevel.WARNING, records.COMMAND_TIMED_OUT, fields))
        return results.timed_out(command_id, command_type, waited)

    @contextlib.contextmanager
    def _broker_errors(self) -> Iterator[None]:
        """Broker trouble, raised as one typed error naming the (redacted) URL."""
        try:
            yield
        except (OperationalError, OSError) as exc:
            url = redact_url(self._settings.broker())
            raise BrokerUnavailableError(f"broker {url} is unavailable: {exc}") from exc

    def _waiter(self) -> ResultWaiter:
        loop = asyncio.get_running_loop()
        waiter = self._waiters.get(loop)
        if waiter is None:
            backend = self.celery.backend
            url = self._settings.backend()
            if url.startswith(("redis://", "rediss://")):
                waiter = RedisResultWaiter(url, backend)
            else:
                waiter = PollingResultWaiter(backend)
            self._waiters[loop] = waiter
        return waiter
