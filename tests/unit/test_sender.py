"""TaskSender: a publish goes out once without kombu's retry wrapper; a lost connection retries."""

from __future__ import annotations

from typing import Any

import pytest
from amqp.exceptions import RecoverableConnectionError
from celery import Celery

from llmgine_celery.bus.sender import TaskSender

ENVELOPE = {"type": "Ask", "v": 1, "data": {"id": "c-1", "question": "q"}}


class Connection:
    """What TaskSender asks of a producer's connection: which errors are worth a retry."""

    recoverable_connection_errors = (RecoverableConnectionError, ConnectionResetError)
    recoverable_channel_errors = ()


class Producer:
    connection = Connection()


@pytest.fixture
def app() -> Celery:
    # memory:// only for building messages; nothing here connects or sends
    return Celery("sender-test", broker="memory://", set_as_current=False)


def sender_recording(app: Celery, failures: list[BaseException]) -> tuple[TaskSender, list[Any]]:
    calls: list[dict[str, Any]] = []

    def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> None:
        calls.append(options)
        if failures:
            raise failures.pop(0)

    app.amqp.send_task_message = send_task_message
    return TaskSender(app), calls


def test_a_publish_goes_out_once_without_the_retry_wrapper(app: Celery) -> None:
    sender, calls = sender_recording(app, [])
    sender.send("t", "c-1", ENVELOPE, queue="q", producer=Producer())
    assert len(calls) == 1 and calls[0]["retry"] is False


def test_a_lost_connection_is_retried_as_celery_would(app: Celery) -> None:
    sender, calls = sender_recording(app, [ConnectionResetError("peer reset")])
    sender.send("t", "c-1", ENVELOPE, queue="q", producer=Producer())
    assert [c.get("retry") for c in calls] == [False, None]  # None: task_publish_retry's policy


def test_other_errors_are_raised_without_a_retry(app: Celery) -> None:
    sender, calls = sender_recording(app, [ValueError("not a connection problem")])
    with pytest.raises(ValueError, match="not a connection problem"):
        sender.send("t", "c-1", ENVELOPE, queue="q", producer=Producer())
    assert len(calls) == 1
