"""An event's handler tasks confirmed together, and the event settled on the hub's thread.

The hub and the message here are stand-ins recording what was asked of them:
what is tested is which of ack and requeue happens, when, and that a channel
gone in the meantime breaks nothing. The broker side (a real nack from
RabbitMQ keeps the event) is tested in ``tests/integration/test_events.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from llmgine_celery.bus.confirmed_dispatch import REQUEUE_DELAY, AllConfirmed, settle


class Answer:
    """A confirmation whose answer the test sets."""

    def __init__(self) -> None:
        self.answered = False
        self.error: BaseException | None = None
        self.waited = False

    def settled(self) -> bool:
        return self.answered

    def __call__(self) -> None:
        self.waited = True
        if self.error is not None:
            raise self.error


class Hub:
    """Records the callbacks asked of kombu's hub."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        self.later.append((delay, callback, args))

    def run_later(self) -> None:
        for _, callback, args in self.later:
            callback(*args)


class Message:
    def __init__(self, channel_gone: bool = False) -> None:
        self.settled: list[str] = []
        self.channel_gone = channel_gone

    def _settle(self, how: str) -> None:
        if self.channel_gone:
            raise ConnectionError("channel already closed")
        self.settled.append(how)

    def ack(self) -> None:
        self._settle("ack")

    def requeue(self) -> None:
        self._settle("requeue")


def test_all_confirmed_is_settled_when_every_answer_is_in() -> None:
    first, second = Answer(), Answer()
    both = AllConfirmed([first, second])
    assert not both.settled()
    first.answered = True
    assert not both.settled()
    second.answered = True
    assert both.settled()
    both()  # every one acked: nothing raised
    assert first.waited and second.waited


def test_all_confirmed_raises_the_refusal_of_any_one() -> None:
    first, second = Answer(), Answer()
    second.error = ConnectionError("the broker refused the message (nack)")
    first.answered = second.answered = True
    with pytest.raises(ConnectionError, match="nack"):
        AllConfirmed([first, second])()


def test_a_confirmed_event_is_acked_at_once() -> None:
    hub, message = Hub(), Message()
    settle(hub, message, None, "event e1")
    assert message.settled == ["ack"] and hub.later == []


def test_a_refused_event_goes_back_to_its_queue_after_the_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub, message = Hub(), Message()
    with caplog.at_level(logging.WARNING, "llmgine_celery.bus.confirmed_dispatch"):
        settle(hub, message, ConnectionError("nack"), "the handler tasks of event e2")
    assert message.settled == []  # held, unacked, for the delay: no redelivery loop
    assert [delay for delay, _, _ in hub.later] == [REQUEUE_DELAY]
    hub.run_later()
    assert message.settled == ["requeue"]
    assert "did not take the handler tasks of event e2 (nack)" in caplog.text


def test_an_event_whose_channel_is_gone_is_left_to_the_broker() -> None:
    hub, message = Hub(), Message(channel_gone=True)
    settle(hub, message, None, "event e3")  # the ack fails quietly: the broker redelivers
    settle(hub, message, ConnectionError("lost"), "event e3")
    hub.run_later()
    assert message.settled == []
