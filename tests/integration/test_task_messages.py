"""What a command's task message and stored result look like on the wire."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import pytest
from celery.app.trace import trace_task_ret
from kombu import Connection
from kombu.exceptions import ContentDisallowed
from kombu.message import Message
from kombu.serialization import prepare_accept_content

from llmgine_celery import ApplicationConfig
from llmgine_celery.bus import topology
from llmgine_celery.bus.sender import TaskSender, task_message
from llmgine_celery.bus.task_request import DecodedOnceRequest
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


def _queued_command(producer: IntegrationApp, command: WhereAmI) -> Message:
    """``command`` as a worker receives it: sent to a queue nobody consumes, read back."""
    queue = f"itest.nobody.{uuid.uuid4().hex[:8]}"
    name = topology.command_task_name("WhereAmI")
    with Connection(DEPLOYMENTS["rabbitmq"][0]) as conn:
        channel = conn.default_channel
        try:
            TaskSender(producer.celery).send(name, command.id, encode(command), queue=queue)
            raw = channel.basic_get(queue, no_ack=True)
            assert raw is not None
            message: Message = channel.message_to_python(raw)
        finally:
            channel.queue_delete(queue)
    # what a worker's task consumer sets: only the accepted content types decode
    message.accept = prepare_accept_content(producer.celery.conf.accept_content)
    return message


def test_the_worker_decodes_a_command_message_once(producer: IntegrationApp) -> None:
    command = WhereAmI(tag="decoded-once")
    message = _queued_command(producer, command)
    task = producer.celery.tasks[topology.command_task_name("WhereAmI")]
    ours = [t for n, t in producer.celery.tasks.items() if n.startswith("llmgine.")]
    handler_tasks = [t for t in ours if t.name.startswith(topology.HANDLER_TASK_PREFIX)]
    assert handler_tasks and all(t.Request is DecodedOnceRequest for t in ours)

    request = task.Request(message, app=producer.celery, task=task)

    # the body the consumer decoded goes to the pool, with no content type to decode by
    assert request.content_type is None and request.content_encoding is None
    args, kwargs, embed = request.body
    assert args == [encode(command)] and kwargs == {} and embed["chain"] is None
    assert request.args is args  # one decode, shared with the request, not a second copy
    # Celery's pool entry point runs the task on that body as it is
    failed, value, _ = trace_task_ret(
        request.type,
        request.id,
        request.request_dict,
        request.body,
        request.content_type,
        request.content_encoding,
        app=producer.celery,
    )
    assert not failed
    stored = producer.message_bus.fetch_result_sync(command.id, timeout=10)
    assert stored.success and stored.result["tag"] == "decoded-once", (value, stored)


def test_a_pickled_command_message_is_refused_before_the_pool(producer: IntegrationApp) -> None:
    received = _queued_command(producer, WhereAmI(tag="pickled"))
    pickled = Message(
        body=pickle.dumps(([{"type": "WhereAmI"}], {}, {})),
        content_type="application/x-python-serialize",
        content_encoding="binary",
        headers=received.headers,
        delivery_info=received.delivery_info,
        properties=received.properties,
        accept=received.accept,
    )
    task = producer.celery.tasks[topology.command_task_name("WhereAmI")]
    with pytest.raises(ContentDisallowed):
        task.Request(pickled, app=producer.celery, task=task)
