"""The publisher thread's scheduling: sends go out while earlier confirmations are pending.

These drive ``BatchPublisher`` with sends and confirmations made here, and an
``AckSource`` whose answers the test gives: the thread's order of work is what
is tested, not a broker (the confirm channel itself is tested against
RabbitMQ in ``tests/integration/test_command_confirms.py``).
"""

from __future__ import annotations

import functools
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import pytest

from llmgine_celery.bus.publisher import BatchPublisher, Confirmation, PublisherClosedError
from tests.support import wait_for

DEADLINE = 5.0


class Answers:
    """An ``AckSource``: the test answers each confirmation; a pipe wakes the thread then."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        self._answers: dict[int, BaseException | None] = {}
        self._lock = threading.Lock()
        #: calls of ``await_acks`` so far, and the tag a fallback wait is on
        self.awaited = 0
        self.waiting_on: int | None = None

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)

    def answer(self, tag: int, error: BaseException | None = None) -> None:
        with self._lock:
            self._answers[tag] = error
        os.write(self._write, b"a")

    def await_acks(self, timeout: float, wake: int) -> None:
        self.awaited += 1
        ready, _, _ = select.select([self._read, wake], [], [], timeout)
        if self._read in ready:
            os.read(self._read, 4096)

    def confirmation(self, tag: int) -> Confirmation:
        return _Pending(self, tag)

    def settled(self, tag: int) -> bool:
        with self._lock:
            return tag in self._answers

    def outcome(self, tag: int) -> BaseException | None:
        with self._lock:
            return self._answers[tag]


class _Pending:
    def __init__(self, answers: Answers, tag: int) -> None:
        self._answers = answers
        self._tag = tag

    def settled(self) -> bool:
        return self._answers.settled(self._tag)

    def __call__(self) -> None:
        deadline = time.monotonic() + DEADLINE
        if not self._answers.settled(self._tag):
            self._answers.waiting_on = self._tag
        while not self._answers.settled(self._tag):  # only the fallback path waits here
            if time.monotonic() > deadline:
                raise TimeoutError(f"confirmation {self._tag} never answered")
            time.sleep(0.001)
        error = self._answers.outcome(self._tag)
        if error is not None:
            raise error


@pytest.fixture
def answers() -> Iterator[Answers]:
    made = Answers()
    yield made
    made.close()


def publisher(acks: Answers | None) -> BatchPublisher:
    return BatchPublisher(lambda: nullcontext(None), acks=acks)


def sending(
    answers: Answers, tag: int, published: list[int]
) -> Callable[[Any], Confirmation | None]:
    def send(_producer: Any) -> Confirmation:
        published.append(tag)
        return answers.confirmation(tag)

    return send


def in_thread(call: Callable[[], None]) -> tuple[threading.Thread, list[BaseException | None]]:
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_send_goes_out_while_the_one_before_waits_for_its_confirmation(
    answers: Answers,
) -> None:
    pub = publisher(answers)
    published: list[int] = []
    try:
        first, first_outcome = in_thread(lambda: pub.submit_sync(sending(answers, 1, published)))
        wait_for(lambda: published == [1], DEADLINE, "the first publish")
        second, second_outcome = in_thread(lambda: pub.submit_sync(sending(answers, 2, published)))
        # the first is still unanswered, and the second is published all the same
        wait_for(
            lambda: published == [1, 2], DEADLINE, "the second publish, before the first's answer"
        )
        assert first_outcome == [] and second_outcome == []
        answers.answer(2)  # answers may come in any order; each caller hears its own
        second.join(DEADLINE)
        assert second_outcome == [None] and first_outcome == []
        answers.answer(1)
        first.join(DEADLINE)
        assert first_outcome == [None]
    finally:
        answers.answer(1)
        answers.answer(2)
        pub.close()


def test_a_refused_publish_fails_only_its_own_caller(answers: Answers) -> None:
    pub = publisher(answers)
    published: list[int] = []
    refused = ConnectionError("the broker refused the message (nack)")
    try:
        calls = [
            in_thread(functools.partial(pub.submit_sync, sending(answers, tag, published)))
            for tag in (1, 2, 3)
        ]
        wait_for(lambda: sorted(published) == [1, 2, 3], DEADLINE, "three publishes")
        answers.answer(1)
        answers.answer(2, refused)
        answers.answer(3)
        for thread, _ in calls:
            thread.join(DEADLINE)
        outcomes = {tag: outcome for tag, (_, outcome) in zip((1, 2, 3), calls, strict=True)}
        assert outcomes == {1: [None], 2: [refused], 3: [None]}
    finally:
        pub.close()


def test_close_waits_for_pending_confirmations(answers: Answers) -> None:
    pub = publisher(answers)
    published: list[int] = []
    caller, outcome = in_thread(lambda: pub.submit_sync(sending(answers, 7, published)))
    wait_for(lambda: published == [7], DEADLINE, "the publish")
    closing, closed = in_thread(pub.close)
    wait_for(lambda: pub._stopping, DEADLINE, "close to begin")
    seen = answers.awaited
    # the thread goes on waiting for the answer after close asked it to stop
    wait_for(lambda: answers.awaited > seen, DEADLINE, "the thread to wait for acks again")
    assert closed == [] and outcome == []
    answers.answer(7)
    closing.join(DEADLINE)
    caller.join(DEADLINE)
    assert closed == [None] and outcome == [None]


def test_without_an_ack_source_each_confirmation_is_waited_for_in_turn(answers: Answers) -> None:
    pub = publisher(None)
    published: list[int] = []
    try:
        first, first_outcome = in_thread(lambda: pub.submit_sync(sending(answers, 1, published)))
        wait_for(
            lambda: answers.waiting_on == 1, DEADLINE, "the thread to wait for the first answer"
        )
        second, _ = in_thread(lambda: pub.submit_sync(sending(answers, 2, published)))
        wait_for(lambda: bool(pub._jobs), DEADLINE, "the second send to be queued")
        assert published == [1]  # not taken while the first answer is awaited
        answers.answer(1)
        first.join(DEADLINE)
        wait_for(
            lambda: published == [1, 2], DEADLINE, "the second publish, after the first's answer"
        )
        answers.answer(2)
        second.join(DEADLINE)
        assert first_outcome == [None]
    finally:
        answers.answer(1)
        answers.answer(2)
        pub.close()


def test_a_thread_that_close_gave_up_on_takes_no_more_work(answers: Answers) -> None:
    pub = publisher(answers)
    release = threading.Event()
    ran_on: list[tuple[str, threading.Thread]] = []

    def hanging(_producer: Any) -> None:  # a send stuck on the broker
        ran_on.append(("hanging", threading.current_thread()))
        release.wait(DEADLINE)

    def plain(tag: str) -> Callable[[Any], None]:
        def send(_producer: Any) -> None:
            ran_on.append((tag, threading.current_thread()))

        return send

    stuck, stuck_outcome = in_thread(lambda: pub.submit_sync(hanging))
    wait_for(lambda: bool(ran_on), DEADLINE, "the hanging send to start")
    old = ran_on[0][1]
    pub.close(timeout=0.05)  # gives up on the stuck thread
    pub.submit_sync(plain("after close"))  # a new thread serves it
    release.set()
    stuck.join(DEADLINE)
    assert stuck_outcome == [None]  # the stuck send itself completed
    old.join(DEADLINE)
    assert not old.is_alive()  # it ended instead of serving the queue beside the new one
    pub.submit_sync(plain("later"))
    threads = {tag: thread for tag, thread in ran_on}
    assert threads["after close"] is threads["later"] is not old
    pub.close()


def test_a_thread_that_close_gave_up_on_fails_the_confirmations_it_waits_for(
    answers: Answers,
) -> None:
    pub = publisher(answers)
    published: list[int] = []
    waiting, outcome = in_thread(lambda: pub.submit_sync(sending(answers, 1, published)))
    wait_for(lambda: published == [1], DEADLINE, "the send to go out")
    pub.close(timeout=0.05)  # confirmation 1 never comes: close gives up on the thread
    waiting.join(DEADLINE)
    assert not waiting.is_alive(), "the caller was never told"
    assert len(outcome) == 1
    assert isinstance(outcome[0], PublisherClosedError)


def test_send_then_tells_its_callback_the_outcome_on_the_publisher_thread(
    answers: Answers,
) -> None:
    pub = publisher(answers)
    published: list[int] = []
    told: list[tuple[int, BaseException | None, str]] = []
    refused = ConnectionError("the broker refused the message (nack)")

    def callback(tag: int, error: BaseException | None) -> None:
        told.append((tag, error, threading.current_thread().name))

    try:
        for tag in (1, 2):  # returns at once: nothing waits for the answers here
            pub.send_then(sending(answers, tag, published), functools.partial(callback, tag))
        wait_for(lambda: published == [1, 2], DEADLINE, "two publishes")
        assert told == []  # no answer yet
        answers.answer(2, refused)
        wait_for(lambda: len(told) == 1, DEADLINE, "the refusal")
        answers.answer(1)
        wait_for(lambda: len(told) == 2, DEADLINE, "the ack")
        assert told == [(2, refused, "llmgine-publisher"), (1, None, "llmgine-publisher")]
    finally:
        pub.close()


def test_a_callback_that_raises_does_not_stop_the_publisher_thread(answers: Answers) -> None:
    pub = publisher(answers)
    published: list[int] = []
    told: list[BaseException | None] = []

    def broken(_: BaseException | None) -> None:
        raise RuntimeError("the hub is closed")

    try:
        pub.send_then(sending(answers, 1, published), broken)
        answers.answer(1)
        pub.send_then(sending(answers, 2, published), told.append)
        wait_for(lambda: published == [1, 2], DEADLINE, "the second publish")
        answers.answer(2)
        wait_for(lambda: told == [None], DEADLINE, "the second callback")
    finally:
        pub.close()
