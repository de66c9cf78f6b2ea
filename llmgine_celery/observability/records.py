"""The record vocabulary: every name a record's ``event`` may take, and its fields.

Sinks key on these names; so do ``llmgine-celery trace`` and ``logs``. One record
per thing that happened, made by the Celery signal receivers (``signals``) and
the MessageBus:

========================  ========  =================================================
event                     state     made when
========================  ========  =================================================
``command.sent``          sent      a command is published (producer)
``command.started``       started   its handler starts in a worker
``command.result``        succeeded the handler returned or raised (``outcome``)
``command.timed_out``     -         ``execute`` gave up waiting (producer)
``event.published``       -         an event is published and confirmed (producer)
``handler.started``       started   an event handler task starts
``handler.succeeded``     succeeded it returned
``handler.retried``       retried   it raised and will be retried
``handler.failed``        failed    it raised for the last time
``handler.skipped``       succeeded a copy of a run that already succeeded was skipped
``dead_letter``           -         a message or handler run was dead-lettered
``task.sent``             sent      any other task is published (not handler tasks)
``task.received``         received  a worker received a task (DEBUG)
``task.started`` ...      ...       the same stages for tasks that are not llmgine's
``task.rejected``         rejected  a worker rejected a message
``task.unknown``          unknown   a worker got a task it does not know
``task.revoked``          revoked   a task was revoked
``worker.ready``          -         a worker is ready (``celery_worker_up`` 1)
``worker.stopping``       -         a worker is shutting down (``celery_worker_up`` 0)
``beat.started``          -         celery beat started
``span``                  -         an ``ObservabilityBus.span`` ended (``span`` = its name)
========================  ========  =================================================

Fields (absent when unknown): ``task_id``, ``task_name``, ``queue``, ``retries``,
``command_id``, ``command_type``, ``event_id``, ``event_type``, ``session_id``,
``trace_id``, ``span_id``, ``parent_span_id``, ``causation_id``, ``group``,
``handler``, ``outcome`` (``success``, ``failure``, ``no_handler``, ``invalid``,
``timeout``, ``error``), ``error``, ``exception`` (the exception's type name),
``duration_ms``, ``queue_wait_ms``, ``state`` (the Celery stage, for metrics),
``kind`` and ``reason`` (dead letters), ``worker`` (a worker's hostname), plus
``messaging.*`` keys of the OpenTelemetry messaging conventions.
"""

from __future__ import annotations

from typing import Final

COMMAND_SENT: Final = "command.sent"
COMMAND_STARTED: Final = "command.started"
COMMAND_RESULT: Final = "command.result"
COMMAND_TIMED_OUT: Final = "command.timed_out"
EVENT_PUBLISHED: Final = "event.published"
HANDLER_STARTED: Final = "handler.started"
HANDLER_SUCCEEDED: Final = "handler.succeeded"
HANDLER_RETRIED: Final = "handler.retried"
HANDLER_FAILED: Final = "handler.failed"
HANDLER_SKIPPED: Final = "handler.skipped"
DEAD_LETTER: Final = "dead_letter"
TASK_SENT: Final = "task.sent"
TASK_RECEIVED: Final = "task.received"
TASK_STARTED: Final = "task.started"
TASK_SUCCEEDED: Final = "task.succeeded"
TASK_FAILED: Final = "task.failed"
TASK_RETRIED: Final = "task.retried"
TASK_REJECTED: Final = "task.rejected"
TASK_UNKNOWN: Final = "task.unknown"
TASK_REVOKED: Final = "task.revoked"
WORKER_READY: Final = "worker.ready"
WORKER_STOPPING: Final = "worker.stopping"
BEAT_STARTED: Final = "beat.started"
SPAN: Final = "span"

#: values of the ``state`` field: celery-exporter's task stages
STATES: Final = (
    "sent",
    "received",
    "started",
    "succeeded",
    "failed",
    "retried",
    "rejected",
    "revoked",
    "unknown",
)

#: values of ``outcome`` on ``command.result``
OUTCOMES: Final = ("success", "failure", "no_handler", "invalid", "timeout", "error")

#: every name above: records the framework makes (a console shows them only when asked)
LIFECYCLE: Final = frozenset(
    {
        COMMAND_SENT,
        COMMAND_STARTED,
        COMMAND_RESULT,
        COMMAND_TIMED_OUT,
        EVENT_PUBLISHED,
        HANDLER_STARTED,
        HANDLER_SUCCEEDED,
        HANDLER_RETRIED,
        HANDLER_FAILED,
        HANDLER_SKIPPED,
        DEAD_LETTER,
        TASK_SENT,
        TASK_RECEIVED,
        TASK_STARTED,
        TASK_SUCCEEDED,
        TASK_FAILED,
        TASK_RETRIED,
        TASK_REJECTED,
        TASK_UNKNOWN,
        TASK_REVOKED,
        WORKER_READY,
        WORKER_STOPPING,
        BEAT_STARTED,
        SPAN,
    }
)
