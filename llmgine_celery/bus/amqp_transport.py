"""The worker's task connection to RabbitMQ: py-amqp's, reading what the socket holds at once.

py-amqp reads a frame with three ``recv`` calls (its header, its payload, its
end octet), and kombu's hub sets and restores the socket's timeout around every
frame it reads (two ``ioctl`` calls). A delivered task is three frames: about
ten system calls. In a threads-pool worker each one lets go of the GIL on the
consumer's thread, the thread every message passes through, which then waits
behind the pool threads to take it back.

This transport asks ``recv`` for up to ``READ_AHEAD`` bytes and cuts frames out
of what it got; a frame already buffered is read with no system call and no
timeout change. The worker's task consumer uses it (``consumer_transport``);
producers, the event dispatcher and publisher confirms keep py-amqp's own.

The hub's poll cannot see bytes held here. So the hub's reader goes on while a
whole frame is buffered, and asks to be called again only when its last
``recv`` filled the buffer (more may be waiting in the socket). A hook run
before every poll reads the frames another read left here: a channel waiting
for ``basic.qos-ok``, say, reads whatever the broker sent before it.
"""

from __future__ import annotations

import errno
from struct import Struct
from typing import TYPE_CHECKING, Any

from amqp.exceptions import RecoverableConnectionError, UnexpectedFrame
from amqp.transport import TCPTransport
from kombu.transport import pyamqp

from llmgine_celery.bus.hub_wake import wake_for_waiting_callbacks

if TYPE_CHECKING:
    from collections.abc import Callable

    from celery import Celery

#: bytes one ``recv`` asks for
READ_AHEAD = 65536
#: a frame's header: type (octet), channel (short), payload size (long)
_HEADER = Struct(">BHI")
#: a frame's header and its end octet
_FRAME_OVERHEAD = _HEADER.size + 1
_FRAME_END = 0xCE
#: ``recv`` errors of a socket with nothing to read yet
_NOTHING_YET = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})
#: broker URL schemes whose connection this transport may replace
_PLAIN_AMQP = frozenset({"amqp", "pyamqp"})


class ReadAheadTCPTransport(TCPTransport):
    """py-amqp's TCP transport, reading up to ``READ_AHEAD`` bytes per ``recv``."""

    def _setup_transport(self) -> None:
        super()._setup_transport()
        self._buffer = bytearray()
        #: where the unread bytes of ``_buffer`` start
        self._start = 0
        #: whether the last ``recv`` filled its request (the socket may hold more)
        self.more_waiting = False

    def whole_frame_buffered(self) -> bool:
        """Whether the next frame is buffered whole (then reading it takes no system call)."""
        return self._next_frame() is not None

    def buffered_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame if it is buffered whole, taken from the buffer; else None."""
        found = self._next_frame()
        if found is None:
            return None
        frame_type, channel, end = found
        buffer, start = self._buffer, self._start
        self._start = end + 1
        if buffer[end] != _FRAME_END:
            raise UnexpectedFrame(f"Received frame_end {buffer[end]:#04x} while expecting 0xce")
        return frame_type, channel, bytes(buffer[start + _HEADER.size : end])

    def read_frame(self, unpack: Any = None) -> tuple[int, int, bytes]:
        """The next frame; ``socket.timeout`` if the socket has not brought all of it yet.

        A partly received frame stays buffered for the next call, as in py-amqp.
        """
        while (frame := self.buffered_frame()) is None:
            self._receive()
        return frame

    def _next_frame(self) -> tuple[int, int, int] | None:
        """The next frame's type, channel and end octet's index, if the frame is all buffered."""
        buffer, start = self._buffer, self._start
        if len(buffer) - start < _FRAME_OVERHEAD:
            return None
        frame_type, channel, size = _HEADER.unpack_from(buffer, start)
        end = start + _HEADER.size + size
        return (frame_type, channel, end) if end < len(buffer) else None

    def _receive(self) -> None:
        try:  # py-amqp's bound recv: on a closed transport, an OSError as py-amqp's own
            data = self._quick_recv(READ_AHEAD)
        except TimeoutError:  # socket.timeout: a socket with a timeout had nothing in time
            raise
        except OSError as exc:
            if exc.errno in _NOTHING_YET:
                raise TimeoutError("timed out") from exc
            self.connected = False
            raise
        if not data:
            self.connected = False
            raise OSError("Server unexpectedly closed connection")
        if self._start:  # drop what was read, once per recv rather than per frame
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data
        self.more_waiting = len(data) == READ_AHEAD


class ReadAheadConnection(pyamqp.Connection):
    """kombu's py-amqp connection on ``ReadAheadTCPTransport`` (TLS keeps py-amqp's)."""

    def Transport(  # py-amqp's name for its transport factory, called with these positions
        self,
        host: str,
        connect_timeout: float | None,
        ssl: Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        if ssl:
            timeouts = (read_timeout, write_timeout)
            return super().Transport(host, connect_timeout, ssl, *timeouts, **kwargs)
        return ReadAheadTCPTransport(
            host,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            **kwargs,
        )

    def blocking_read(self, timeout: float | None = None) -> Any:
        transport = self.transport
        if isinstance(transport, ReadAheadTCPTransport):
            frame = transport.buffered_frame()
            if frame is not None:  # no socket call: no timeout to set
                return self.on_inbound_frame(frame)
        return super().blocking_read(timeout)


class ReadAheadTransport(pyamqp.Transport):
    """kombu's py-amqp transport on ``ReadAheadConnection``, its hub reader draining the buffer."""

    Connection = ReadAheadConnection

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        loop.on_tick.add(_BufferedFrames(self, connection, loop))

    def _make_reader(self, connection: Any, *_: Any, **__: Any) -> Callable[[Any], None]:
        def read(loop: Any) -> None:
            if not connection.connected:
                raise RecoverableConnectionError("Socket was disconnected")
            transport = connection.transport
            try:
                connection.drain_events(timeout=0)
                while connection.connected and _buffered(transport):  # a callback may close it
                    connection.drain_events(timeout=0)
            except TimeoutError:  # socket.timeout: nothing more has come yet
                return
            except OSError as exc:
                if exc.errno in _NOTHING_YET:
                    return
                raise
            if getattr(transport, "more_waiting", True):
                loop.call_soon(read, loop)

        return read


class _BufferedFrames:
    """Before each poll: read the frames a read outside the hub's reader left buffered."""

    def __init__(self, transport: ReadAheadTransport, connection: Any, loop: Any) -> None:
        self.transport, self.connection, self.loop = transport, connection, loop

    def __call__(self) -> None:
        if not self.connection.connected:  # closed: the hook goes with it
            self.loop.on_tick.discard(self)
        elif _buffered(self.connection.transport):
            self.transport.on_readable(self.connection, self.loop)
            # what that queued on this thread (a solo pool's ack) must not wait out the poll
            wake_for_waiting_callbacks(self.loop)


def _buffered(transport: Any) -> bool:
    return isinstance(transport, ReadAheadTCPTransport) and transport.whole_frame_buffered()


#: ``ReadAheadTransport`` by name: a worker's broker info (``celery inspect stats``,
#: Flower) carries the transport, and a name goes into JSON where a class would not
READ_AHEAD_TRANSPORT = f"{__name__}:{ReadAheadTransport.__name__}"


def consumer_transport(celery: Celery) -> str | None:
    """The transport for a worker's task consumer: this one on plain AMQP, else Celery's choice.

    A config module that names ``broker_transport``, or a broker on TLS
    (``amqps://`` or ``broker_use_ssl``), keeps what it asked for.
    """
    conf = celery.conf
    url = conf.broker_read_url or conf.broker_url or ""
    if conf.broker_transport or conf.broker_use_ssl or not isinstance(url, str):
        return None
    first = url.split(";", 1)[0].strip()
    return READ_AHEAD_TRANSPORT if first.split("://", 1)[0] in _PLAIN_AMQP else None
