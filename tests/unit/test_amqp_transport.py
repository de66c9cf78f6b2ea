"""The read-ahead AMQP transport: frames cut from one buffer, and when a consumer uses it.

The transport reads from one end of a socket pair; the test writes AMQP frames
into the other end, whole, cut in pieces or bigger than one read.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from amqp.exceptions import UnexpectedFrame
from celery import Celery

from llmgine_celery.bus.amqp_transport import (
    READ_AHEAD,
    READ_AHEAD_TRANSPORT,
    ReadAheadTCPTransport,
    consumer_transport,
)


def frame(payload: bytes, frame_type: int = 1, channel: int = 1, end: int = 0xCE) -> bytes:
    """An AMQP frame: header, payload, end octet."""
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


@pytest.fixture
def pair() -> Iterator[tuple[ReadAheadTCPTransport, socket.socket]]:
    """A transport on one end of a socket pair, and the other end to write frames into."""
    ours, theirs = socket.socketpair()
    transport = ReadAheadTCPTransport("127.0.0.1:5672")
    transport.sock = ours
    transport._setup_transport()
    transport.connected = True
    try:
        yield transport, theirs
    finally:
        ours.close()
        theirs.close()


def test_frames_sent_together_are_read_one_by_one_from_one_recv(
    pair: tuple[ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    payloads = [b"method", b"header" * 10, b"x" * 1024]
    peer.sendall(b"".join(frame(p, frame_type=i + 1) for i, p in enumerate(payloads)))
    assert transport.read_frame() == (1, 1, payloads[0])
    # the peer is gone: what is left can only come from the buffer
    peer.close()
    assert transport.whole_frame_buffered()
    assert transport.read_frame() == (2, 1, payloads[1])
    assert transport.read_frame() == (3, 1, payloads[2])
    assert not transport.whole_frame_buffered()
    with pytest.raises(OSError, match="closed"):
        transport.read_frame()
    assert not transport.connected


def test_a_frame_that_has_not_all_come_times_out_and_is_read_whole_later(
    pair: tuple[ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    whole = frame(b"payload of a frame cut in two")
    peer.sendall(whole[:10])
    with transport.having_timeout(0), pytest.raises(TimeoutError):
        transport.read_frame()
    assert transport.connected
    peer.sendall(whole[10:] + frame(b"next", channel=2))
    with transport.having_timeout(0):
        assert transport.read_frame() == (1, 1, b"payload of a frame cut in two")
        assert transport.read_frame() == (1, 2, b"next")


def test_a_frame_bigger_than_one_read_is_put_together(
    pair: tuple[ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    payload = bytes(range(256)) * (3 * READ_AHEAD // 256 + 7)
    writer = threading.Thread(target=peer.sendall, args=(frame(payload, frame_type=3),))
    writer.start()
    try:
        assert transport.read_frame() == (3, 1, payload)  # blocking: no timeout set
    finally:
        writer.join()


def test_a_read_that_fills_the_buffer_says_more_may_be_waiting(
    pair: tuple[ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    small = frame(b"s" * 100)
    count = READ_AHEAD // len(small) + 2  # a little more than one read takes
    peer.sendall(small * count)  # all in the socket before the first read
    transport.read_frame()
    assert transport.more_waiting
    for _ in range(count - 1):
        transport.read_frame()
    assert not transport.more_waiting  # the second read took the rest


def test_a_wrong_frame_end_is_an_unexpected_frame(
    pair: tuple[ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.sendall(frame(b"bad", end=0x00))
    with pytest.raises(UnexpectedFrame, match="0x00"):
        transport.read_frame()


def test_a_peer_that_closes_mid_frame_disconnects(
    pair: tuple[ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.sendall(frame(b"never finished")[:9])
    peer.close()
    with pytest.raises(OSError, match="closed"):
        transport.read_frame()
    assert not transport.connected


def app(broker: str, **conf: object) -> Celery:
    celery = Celery("t", broker=broker, set_as_current=False)
    celery.conf.update(conf)
    return celery


@pytest.mark.parametrize(
    "broker",
    ["amqp://guest:guest@127.0.0.1:5672//", "pyamqp://h//", "amqp://a//;amqp://b//"],
)
def test_a_consumer_on_plain_amqp_reads_ahead(broker: str) -> None:
    assert consumer_transport(app(broker)) == READ_AHEAD_TRANSPORT


@pytest.mark.parametrize(
    ("broker", "conf"),
    [
        ("amqps://h//", {}),
        ("amqp://h//", {"broker_use_ssl": {"cert_reqs": 0}}),
        ("amqp://h//", {"broker_transport": "pyamqp"}),
        ("redis://127.0.0.1:6379/0", {}),
        ("filesystem://", {}),
        ("redis://127.0.0.1:6379/0", {"broker_read_url": "redis://127.0.0.1:6379/1"}),
        ("amqp://h//", {"broker_read_url": "redis://127.0.0.1:6379/1"}),
    ],
)
def test_other_brokers_and_a_named_transport_keep_celerys_choice(
    broker: str, conf: dict[str, object]
) -> None:
    assert consumer_transport(app(broker, **conf)) is None


def test_the_consumer_reads_from_its_read_url() -> None:
    celery = app("redis://127.0.0.1:6379/0", broker_read_url="amqp://h//")
    assert consumer_transport(celery) == READ_AHEAD_TRANSPORT


def test_reading_a_closed_transport_is_a_socket_error(
    pair: tuple[ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, _ = pair
    transport.close()
    with pytest.raises(OSError):  # as py-amqp's own: a connection error, not an AttributeError
        transport.read_frame()
    assert not transport.connected
