"""Every wire name in one place: exchanges, queues, task names, header keys."""

from __future__ import annotations

import re

#: default queue of command tasks
COMMAND_QUEUE = "llmgine.commands"
#: prefix of command task names: ``llmgine.command.<TypeName>``
COMMAND_TASK_PREFIX = "llmgine.command."
#: the exchange every event is published to (fanout; see ``events_exchange_type``)
EVENTS_EXCHANGE = "llmgine.events"
#: routing key of events (ignored by fanout; used by the direct exchange on Redis)
EVENTS_ROUTING_KEY = "llmgine.event"
#: prefix of a subscriber group's durable event queue: ``llmgine.events.<group>``
GROUP_QUEUE_PREFIX = "llmgine.events."
#: prefix of a group's handler work queue: ``llmgine.handlers.<group>``
HANDLER_QUEUE_PREFIX = "llmgine.handlers."
#: prefix of event handler task names: ``llmgine.event.<group>.<handler>``
HANDLER_TASK_PREFIX = "llmgine.event."
#: prefix of a live subscription's own queue: ``<prefix><host>.<pid>.<uuid8>``
SUBSCRIPTION_QUEUE_PREFIX = "llmgine.subscription."
#: where failures go after their last retry (a durable queue on a direct exchange of that name)
DEAD_LETTER_QUEUE = "llmgine.dead_letter"
#: prefix of the result-backend key marking a handler run as done: ``<prefix><task id>``
DONE_KEY_PREFIX = "llmgine-done-"

#: message header keys mirroring ids carried in the body
HEADER_COMMAND_ID = "llmgine_command_id"
HEADER_EVENT_ID = "llmgine_event_id"
HEADER_SESSION_ID = "llmgine_session_id"
HEADER_MESSAGE_TYPE = "llmgine_type"
#: correlation: the trace every record of one causal chain shares (32 hex digits)
HEADER_TRACE_ID = "llmgine_trace_id"
#: correlation: the span (16 hex digits) that sent the message
HEADER_PARENT_SPAN_ID = "llmgine_parent_span_id"
#: correlation: the id of the command or event being handled when the message was sent
HEADER_CAUSATION_ID = "llmgine_causation_id"
#: when the message was sent (seconds since the epoch): a worker's queue wait is measured from it
HEADER_SENT_AT = "llmgine_sent_at"
#: the Redis channel the caller waits on: a worker publishes the command's result there too
HEADER_REPLY_TO = "llmgine_reply_to"
#: prefix of a waiting process's reply channel: ``llmgine.reply.<32 hex digits>``
REPLY_CHANNEL_PREFIX = "llmgine.reply."

#: header names of the ids above, by the field name records give them
CORRELATION_HEADERS = {
    "command_id": HEADER_COMMAND_ID,
    "event_id": HEADER_EVENT_ID,
    "session_id": HEADER_SESSION_ID,
    "type": HEADER_MESSAGE_TYPE,
    "trace_id": HEADER_TRACE_ID,
    "parent_span_id": HEADER_PARENT_SPAN_ID,
    "causation_id": HEADER_CAUSATION_ID,
    "sent_at": HEADER_SENT_AT,
}

_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is safe inside queue and task names, else ValueError."""
    if not _NAME_OK.match(name):
        raise ValueError(f"{kind} {name!r} may hold only letters, digits, '_', '.' and '-'")
    return name


_REPLY_CHANNEL = re.compile(rf"^{re.escape(REPLY_CHANNEL_PREFIX)}[0-9a-f]{{32}}$")


def reply_channel(token: str) -> str:
    """The reply channel named by ``token`` (32 hex digits)."""
    return REPLY_CHANNEL_PREFIX + token


def is_reply_channel(name: object) -> bool:
    """Whether a message's reply header names a channel a worker may publish to."""
    return isinstance(name, str) and _REPLY_CHANNEL.match(name) is not None


def command_task_name(type_name: str) -> str:
    """The Celery task name of a command type."""
    return COMMAND_TASK_PREFIX + type_name


def group_queue_name(group: str) -> str:
    """The durable queue a subscriber group's events arrive on."""
    return GROUP_QUEUE_PREFIX + group


def handler_queue_name(group: str) -> str:
    """The Celery queue a group's handler tasks (and their retries) run from."""
    return HANDLER_QUEUE_PREFIX + group


def handler_task_name(group: str, handler: str) -> str:
    """The Celery task name of one event handler in one group."""
    return f"{HANDLER_TASK_PREFIX}{group}.{handler}"


def handler_task_id(event_id: str, group: str, handler: str) -> str:
    """Task id of one handler run: unique per (event, group, handler)."""
    return f"{event_id}:{group}:{handler}"


def events_exchange_type(transport: str) -> str:
    """Exchange type that gives every group its own durable copy on ``transport``.

    kombu's Redis transport implements fanout with PUB/SUB, which drops events
    for a group with no consumer attached; its direct exchange pushes into each
    bound list instead, so on Redis every group queue is bound with the same
    routing key to a direct exchange, which is a durable fanout in effect.
    """
    return "direct" if transport in {"redis", "rediss"} else "fanout"
