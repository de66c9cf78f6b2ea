"""The read-ahead transport on RabbitMQ: frames left buffered are not left waiting.

Bytes the transport holds are invisible to the hub's poll. A read outside the
hub's reader (a channel waiting for its reply, here a plain ``drain_events``)
can leave whole deliveries buffered with nothing more in the socket; the hub
must still deliver them, without waiting for the broker to send anything else.
"""

from __future__ import annotations

import fcntl
import struct
import termios
import time
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub
from kombu.message import Message

from llmgine_celery.bus.amqp_transport import READ_AHEAD_TRANSPORT, ReadAheadTCPTransport
from tests.support import DEPLOYMENTS, ensure_test_vhost, require_service, wait_for

pytestmark = pytest.mark.integration

#: messages queued before the consumer starts
MESSAGES = 50
#: seconds the hub gets to deliver what is buffered; its poll alone waits 1 s a turn
DEADLINE = 5.0


def unread_in_socket(transport: ReadAheadTCPTransport) -> int:
    """Bytes the kernel holds for the socket (``FIONREAD``)."""
    held = fcntl.ioctl(transport.sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", held)[0])


@pytest.fixture
def queue() -> Iterator[tuple[str, Queue]]:
    """A queue holding ``MESSAGES`` messages, deleted after the test."""
    broker = DEPLOYMENTS["rabbitmq"][0]
    require_service(broker)
    ensure_test_vhost()
    name = f"test.read-ahead.{uuid.uuid4().hex}"
    declared = Queue(name, Exchange(name, type="direct"), routing_key=name, durable=False)
    with Connection(broker) as conn:
        producer = Producer(conn.default_channel, exchange=declared.exchange, routing_key=name)
        declared(conn.default_channel).declare()
        for i in range(MESSAGES):
            producer.publish({"n": i}, serializer="json")
        wait_for(
            lambda: (
                declared(conn.default_channel).queue_declare(passive=True).message_count == MESSAGES
            ),
            timeout=DEADLINE,
            what="the messages in the queue",
        )
    try:
        yield broker, declared
    finally:
        with Connection(broker) as conn:
            declared(conn.default_channel).delete()
            declared.exchange(conn.default_channel).delete()


def test_deliveries_another_read_left_buffered_come_before_the_hub_polls(
    queue: tuple[str, Queue],
) -> None:
    broker, declared = queue
    received: list[int] = []

    def on_message(body: dict[str, int], message: Message) -> None:
        received.append(body["n"])
        message.ack()

    with Connection(broker, transport=READ_AHEAD_TRANSPORT) as conn:
        consumer = Consumer(conn.default_channel, [declared], callbacks=[on_message])
        consumer.consume()
        amqp = conn.connection
        transport = amqp.transport
        assert isinstance(transport, ReadAheadTCPTransport)
        # read outside any hub until whole deliveries sit in the buffer and the
        # socket holds nothing more: the poll has nothing to report from here on
        while not (transport.whole_frame_buffered() and unread_in_socket(transport) == 0):
            if len(received) == MESSAGES:
                pytest.fail("each delivery came in a read of its own: none was left buffered")
            amqp.drain_events(timeout=DEADLINE)
        buffered = MESSAGES - len(received)

        hub = Hub()
        try:
            conn.transport.register_with_event_loop(amqp, hub)
            loop = hub.create_loop()
            deadline = time.monotonic() + DEADLINE
            while len(received) < MESSAGES and time.monotonic() < deadline:
                next(loop)
        finally:
            hub.close()
    assert buffered > 0
    assert sorted(received) == list(range(MESSAGES)), (
        f"{MESSAGES - len(received)} of the {buffered} buffered deliveries never came"
    )
