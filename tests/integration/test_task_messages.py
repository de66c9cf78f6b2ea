"""What a command's task message and stored result look like on the wire."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from llmgine_celery import ApplicationConfig
from llmgine_celery.bus import topology
from llmgine_celery.bus.sender import TaskSender, task_message
from llmgine_celery.messages.envelope import encode
from tests.integration.apps import APP_NAME, IntegrationApp, WhereAmI
from tests.support import DEPLOYMENTS, producer_settings

pytestmark = pytest.mark.integration

#: Celery protocol 2 headers a lean message carries (the worker defaults the rest)
CELERY_HEADERS = {"lang", "task", "id", "root_id", "argsrepr", "kwargsrepr", "origin"}


@pytest.fixture
def producer(tmp_path: Path) -> IntegrationApp:
    settings = producer_settings("rabbitmq", tmp_path)
    return IntegrationApp(ApplicationConfig(name=APP_NAME, settings=settings))


@pytest.mark.parametrize("session_id", [None, "s-7"])
def test_a_command_message_carries_only_headers_that_say_something(
    producer: IntegrationApp, session_id: str | None
) -> None:
    queue = f"itest.nobody.{uuid.uuid4().hex[:8]}"  # nobody consumes it: the test reads it
    command = WhereAmI(tag="wire", session_id=session_id)
    sender = TaskSender(producer.celery)
    with Connection(DEPLOYMENTS["rabbitmq"][0]) as conn:
        channel = conn.default_channel
        try:  # the first send declares the queue
            headers = {topology.HEADER_TRACE_ID: "f" * 32}
            if session_id is not None:
                headers[topology.HEADER_SESSION_ID] = session_id
            name = topology.command_task_name("WhereAmI")
            sender.send(name, command.id, encode(command), queue=queue, headers=headers)
            message = channel.basic_get(queue, no_ack=True)
        finally:
            channel.queue_delete(queue)
    assert message is not None
    got = message.headers
    ours = {k for k in got if k.startswith("llmgine_")}
    assert set(got) - ours == CELERY_HEADERS
    assert (got["task"], got["id"], got["root_id"]) == (name, command.id, command.id)
    assert got["argsrepr"].startswith(f"<WhereAmI {command.id}>")
    expected = {topology.HEADER_TRACE_ID}
    if session_id is not None:
        expected.add(topology.HEADER_SESSION_ID)
    assert expected <= ours and topology.HEADER_COMMAND_ID not in ours
    assert message.properties["correlation_id"] == command.id
    args, kwargs, embed = json.loads(message.body)
    assert args == [encode(command)] and kwargs == {} and embed["chain"] is None


def test_a_sent_event_is_built_when_celery_is_told_to_send_them(producer: IntegrationApp) -> None:
    command = WhereAmI(tag="sent-event")
    name = topology.command_task_name("WhereAmI")
    producer.celery.conf.task_send_sent_event = False
    assert task_message(producer.celery, command.id, name, encode(command)).sent_event is None
    producer.celery.conf.task_send_sent_event = True
    message = task_message(producer.celery, command.id, name, encode(command), parent_id="p1")
    assert message.sent_event is not None
    assert message.sent_event["uuid"] == command.id and message.sent_event["name"] == name
    assert message.sent_event["parent_id"] == "p1" == message.headers["parent_id"]
