"""Publisher confirms on RabbitMQ, answered asynchronously.

kombu's ``confirm_publish`` waits for the broker after every message (one
round trip each). Here the publisher thread publishes on a confirm-mode
channel and goes on publishing; the broker's acks are read when they come
(``await_acks``, which the thread calls whenever it has nothing to send). Each
publish gets a confirmation that tells whether its answer is in and raises if
the broker refused (nacked) its message or the connection was lost before it
was acknowledged. Events are published on it directly (``publish``); commands
through Celery's own task publisher, given a kombu producer on the same
channel (``publish_with``).
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Callable
from typing import Any

import amqp
from kombu.entity import Exchange
from kombu.messaging import Producer
from kombu.utils.json import dumps

from llmgine_celery.bus.publisher import Confirmation
from llmgine_celery.observability.process import current_pid

logger = logging.getLogger(__name__)

#: seconds a publish waits for its ack
CONFIRM_TIMEOUT = 30.0
#: seconds the rest of a frame may take once its first bytes are in
FRAME_TIMEOUT = 1.0


class PublishNotConfirmedError(ConnectionError):
    """The broker did not confirm a message (nacked, or the connection was lost)."""


class ConfirmChannel:
    """A confirm-mode channel used only by the publisher thread."""

    def __init__(self, connect: Callable[[], Any], exchange: Exchange | None) -> None:
        # ``exchange``: declared on each new channel, and where ``publish`` sends; a
        # channel used only through ``publish_with`` needs none
        self._connect = connect
        self._exchange = exchange
        self._conn: Any = None
        #: the py-amqp connection under ``_conn``
        self._amqp: Any = None
        self._channel: Any = None
        self._producer: Producer | None = None
        #: the process that opened the channel: a forked child opens its own
        self._pid = 0
        self._generation = 0
        #: the last generation lost to an error, and the error
        self._lost: tuple[int, BaseException] | None = None
        self._published = 0
        self._acked_upto = 0
        self._acked: set[int] = set()
        self._nacked_upto = 0
        self._nacked: set[int] = set()

    def publish(
        self, body: dict[str, Any], headers: dict[str, Any], routing_key: str
    ) -> Confirmation:
        """Publish ``body`` as persistent JSON; the returned call waits for its ack."""
        channel = self._open()
        if self._exchange is None:
            raise TypeError("this confirm channel has no exchange: publish through publish_with")
        message = amqp.Message(
            dumps(body).encode(),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            application_headers=headers,
        )
        try:
            channel.basic_publish(message, exchange=self._exchange.name, routing_key=routing_key)
        except BaseException as exc:
            self._reset(exc)
            raise
        return self._sent()

    def publish_with(self, send: Callable[[Producer], None]) -> Confirmation:
        """Call ``send`` with a producer on the confirm channel; it publishes one message.

        Returns that message's confirmation. ``send`` must not
        retry on another channel: a failed publish resets the connection and
        raises, as ``publish`` does.
        """
        self._open()
        assert self._producer is not None
        try:
            send(self._producer)
        except BaseException as exc:
            self._reset(exc)
            raise
        return self._sent()

    def _sent(self) -> Confirmation:
        # the broker numbers the messages of a confirm-mode channel from 1
        self._published += 1
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        return _Confirm(self, self._generation, self._published, deadline)

    def await_acks(self, timeout: float, wake: int) -> None:
        """Read the acks that come within ``timeout`` s; return early if ``wake`` is readable.

        A lost connection is not raised here: the confirmations pending on it
        then fail, each with ``PublishNotConfirmedError``.
        """
        connection = self._amqp  # py-amqp's: kombu's would reconnect when asked for it
        if connection is None:
            return
        try:
            sock = connection.sock
            if not _buffered(sock):
                ready, _, _ = select.select([sock, wake], [], [], timeout)
                if sock not in ready:
                    return
            while True:  # a frame at a time, while one has begun to arrive
                connection.blocking_read(FRAME_TIMEOUT)
                if not (_buffered(sock) or select.select([sock], [], [], 0)[0]):
                    return
        except TimeoutError:
            return  # py-amqp keeps what it read of the frame; the rest comes later
        except Exception as exc:
            logger.warning("the confirm connection is lost (the next send opens another): %r", exc)
            self._reset(exc)

    def settled(self, generation: int, tag: int) -> bool:
        """Whether the answer for publish ``tag`` is in, or can no longer come."""
        return generation != self._generation or self._settled(tag)

    def close(self) -> None:
        """Close the connection (unconfirmed messages then fail their waits)."""
        self._reset()

    def _open(self) -> Any:
        if self._channel is not None and self._pid != current_pid():
            self._forget()  # a forked child shares its parent's socket: never close it
        if self._channel is None:
            conn = self._connect()
            conn.ensure_connection(max_retries=1)
            channel = conn.connection.channel()
            if self._exchange is not None:
                channel.exchange_declare(
                    self._exchange.name, self._exchange.type, durable=True, auto_delete=False
                )
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            self._conn, self._channel, self._pid = conn, channel, current_pid()
            self._amqp = conn.connection
            self._producer = Producer(channel, auto_declare=False)
        return self._channel

    def wait(self, generation: int, tag: int, deadline: float) -> None:
        """Wait until publish ``tag`` is answered; raise unless the broker acked it."""
        while generation == self._generation and not self._settled(tag):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishNotConfirmedError(f"no confirmation within {CONFIRM_TIMEOUT:g}s")
            try:
                self._conn.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
            except BaseException as exc:
                self._reset(exc)
                raise
        if generation != self._generation:
            cause = self._lost[1] if self._lost and self._lost[0] == generation else None
            raise PublishNotConfirmedError(
                "connection lost before the broker confirmed"
                + (f": {cause}" if cause is not None else "")
            ) from cause
        if tag <= self._nacked_upto or tag in self._nacked:
            raise PublishNotConfirmedError("the broker refused the message (nack)")
        self._acked.discard(tag)

    def _settled(self, tag: int) -> bool:
        return (
            tag <= self._acked_upto
            or tag in self._acked
            or tag <= self._nacked_upto
            or tag in self._nacked
        )

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._acked_upto = max(self._acked_upto, delivery_tag)
            self._acked = {t for t in self._acked if t > self._acked_upto}
        else:
            self._acked.add(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._nacked_upto = max(self._nacked_upto, delivery_tag)
        else:
            self._nacked.add(delivery_tag)

    def _reset(self, cause: BaseException | None = None) -> None:
        """Close the connection; ``cause``, why, is told to the confirmations pending on it."""
        if cause is not None:
            self._lost = (self._generation, cause)
        conn = self._forget()
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                conn.close()

    def _forget(self) -> Any:
        """Drop the connection and what was pending on it (waits then fail); return it."""
        conn, self._conn, self._channel, self._producer = self._conn, None, None, None
        self._amqp = None
        self._generation += 1
        self._published = self._acked_upto = self._nacked_upto = 0
        self._acked, self._nacked = set(), set()
        return conn


class _Confirm:
    """One publish's confirmation, on the channel that numbered it."""

    __slots__ = ("_channel", "_deadline", "_generation", "_tag")

    def __init__(self, channel: ConfirmChannel, generation: int, tag: int, deadline: float):
        self._channel = channel
        self._generation = generation
        self._tag = tag
        self._deadline = deadline

    def settled(self) -> bool:
        if time.monotonic() >= self._deadline:
            return True  # calling it raises: no confirmation in time
        return self._channel.settled(self._generation, self._tag)

    def __call__(self) -> None:
        self._channel.wait(self._generation, self._tag, self._deadline)


def _buffered(sock: Any) -> bool:
    """Whether a TLS socket holds decrypted bytes that ``select`` would not report."""
    pending = getattr(sock, "pending", None)
    return bool(pending()) if pending is not None else False
