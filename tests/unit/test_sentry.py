"""Sentry: init once, redaction of every envelope, tags, trace headers, beat crons.

A recording transport keeps envelopes in a list and the DSN's host never
resolves (``.invalid``): nothing is sent over the network.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import sentry_sdk
from celery import Celery
from celery.beat import ScheduleEntry, Scheduler
from celery.exceptions import Retry
from celery.schedules import crontab
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from llmgine_celery.errors import ConfigurationError
from llmgine_celery.observability import sentry
from llmgine_celery.settings import Settings

DSN = "https://public@sentry.invalid/1"
OTHER_DSN = "https://other@sentry.invalid/2"
BROKER_PASSWORD = "br0ker-Pa55"
BACKEND_PASSWORD = "r3dis-Pa55"
BROKER = f"amqp://app:{BROKER_PASSWORD}@rabbit.invalid:5672/prod"
BACKEND = f"redis://:{BACKEND_PASSWORD}@redis.invalid:6379/0"
SECRETS = (DSN, BROKER_PASSWORD, BACKEND_PASSWORD)
TRACE_ID = "0123456789abcdef0123456789abcdef"


class Recording(Transport):
    """Keeps every envelope as JSON text (what would go over the wire)."""

    sent: ClassVar[list[dict[str, Any]]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        items = [
            {"type": item.type, "payload": json.loads(item.payload.get_bytes())}
            for item in envelope.items
        ]
        Recording.sent.append({"headers": envelope.headers, "items": items})


def settings(dsn: str | None = DSN, **extra: Any) -> Settings:
    return Settings(broker_url=BROKER, result_backend=BACKEND, sentry_dsn=dsn, **extra)


def payloads(kind: str) -> list[dict[str, Any]]:
    sentry_sdk.flush()
    return [i["payload"] for e in Recording.sent for i in e["items"] if i["type"] == kind]


@pytest.fixture(autouse=True)
def no_sentry() -> Iterator[None]:
    """Every test starts and ends with no Sentry client."""
    sentry.close_sentry()
    Recording.sent = []
    yield
    sentry.close_sentry()


@pytest.fixture
def active() -> list[dict[str, Any]]:
    """Sentry initialised with the recording transport; the envelopes sent."""
    assert sentry.init_sentry(settings(), "unit", {"transport": Recording})
    return Recording.sent


# -- init ------------------------------------------------------------------------


def test_without_a_dsn_nothing_is_initialised() -> None:
    assert sentry.init_sentry(settings(dsn=None), "unit", {"transport": Recording}) is False
    assert not sentry.is_active()
    assert sentry.trace_headers() == {}
    assert sentry.current_trace_id() is None
    sentry.set_tags({"command_id": "c1"})
    sentry.capture_error(ValueError("nobody hears this"))
    with sentry.producer_span("llmgine.command.X", "c1") as headers:
        assert headers == {}
    assert Recording.sent == []


def test_init_once_per_process(active: list[dict[str, Any]]) -> None:
    client = sentry_sdk.get_client()
    assert client.is_active()
    assert sentry.init_sentry(settings(), "unit", {"transport": Recording})
    assert sentry_sdk.get_client() is client
    with pytest.raises(ConfigurationError, match="another DSN"):
        sentry.init_sentry(settings(dsn=OTHER_DSN), "unit")
    assert sentry_sdk.get_client() is client


def test_settings_shape_the_client(active: list[dict[str, Any]]) -> None:
    sentry.close_sentry()
    configured = settings(
        SENTRY_ENVIRONMENT="staging", sentry_traces_sample_rate=0.25, sentry_monitor_beat_tasks=True
    )
    assert sentry.init_sentry(configured, "unit", {"transport": Recording, "release": "r-42"})
    client = sentry_sdk.get_client()
    assert client.options["environment"] == "staging"
    assert client.options["traces_sample_rate"] == 0.25
    assert client.options["release"] == "r-42"
    integration = client.get_integration(sentry.CeleryIntegration)
    assert integration is not None
    assert integration.monitor_beat_tasks is True
    assert integration.propagate_traces is True


def test_the_dsn_comes_from_settings_only() -> None:
    with pytest.raises(ConfigurationError, match="SENTRY_DSN"):
        sentry.init_sentry(settings(), "unit", {"dsn": OTHER_DSN})
    assert not sentry.is_active()


def test_a_client_the_application_made_is_left_alone() -> None:
    sentry_sdk.init(dsn=OTHER_DSN, transport=Recording)
    try:
        theirs = sentry_sdk.get_client()
        assert sentry.init_sentry(settings(), "unit", {"transport": Recording})
        assert sentry_sdk.get_client() is theirs
        assert theirs.options["dsn"] == OTHER_DSN
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


def test_a_consumer_imported_early_is_given_the_patched_tracer() -> None:
    """Celery's consumer binds build_tracer at import: a stale one loses every task."""
    import celery.worker.consumer.consumer as consumer
    from celery.app import trace

    def stale(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not the integration's tracer")

    original = consumer.build_tracer
    consumer.build_tracer = stale
    try:
        assert sentry.init_sentry(settings(), "unit", {"transport": Recording})
        assert consumer.build_tracer is trace.build_tracer
        # the integration's wrapper, not Celery's own function
        assert trace.build_tracer.__module__.startswith("sentry_sdk")
    finally:
        consumer.build_tracer = original
    assert "celery.worker.consumer.consumer" in sys.modules


# -- redaction -------------------------------------------------------------------


def raise_with_secrets() -> None:
    password = BROKER_PASSWORD  # a local named like a secret, and one holding a URL
    url = BACKEND
    raise RuntimeError(f"cannot reach {BROKER} nor {url} ({password}); report to {DSN}")


def test_no_secret_leaves_in_an_error_event(active: list[dict[str, Any]]) -> None:
    sentry_sdk.set_extra("broker", BROKER)
    sentry_sdk.set_extra("openai_api_key", "sk-live-abcdef")
    sentry_sdk.add_breadcrumb(message=f"connecting to {BACKEND}")
    try:
        raise_with_secrets()
    except RuntimeError as exc:
        sentry.capture_error(exc)
    sentry_sdk.capture_message(f"dsn is {DSN}")
    events = payloads("event")
    assert len(events) == 2
    wire = json.dumps(active)
    for secret in SECRETS:
        assert secret not in wire
    error = events[0]
    assert error["exception"]["values"][0]["value"] == (
        "cannot reach *** nor *** (***); report to ***"
    )
    assert error["extra"]["openai_api_key"] == "***"
    # what is not secret still reads
    assert "rabbit.invalid" not in wire  # the whole URL is a secret value
    assert error["exception"]["values"][0]["type"] == "RuntimeError"


def test_no_secret_leaves_in_a_transaction(active: list[dict[str, Any]]) -> None:
    with (
        sentry_sdk.start_transaction(op="task", name=f"job for {BROKER}"),
        sentry_sdk.start_span(op="db", name=f"SELECT '{BACKEND_PASSWORD}'") as span,
    ):
        span.set_data("dsn", DSN)
        span.set_data("rows", 3)
    (sent,) = payloads("transaction")
    assert not any(secret in json.dumps(active) for secret in SECRETS)
    assert sent["spans"][0]["data"]["rows"] == 3
    assert sent["spans"][0]["data"]["dsn"] == "***"


def test_hooks_in_options_run_before_the_redaction() -> None:
    seen: list[str] = []

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(event["message"])
        if "drop me" in event["message"]:
            return None
        event.setdefault("extra", {})["added"] = f"by the hook: {BROKER_PASSWORD}"
        return event

    options = {"transport": Recording, "before_send": before_send}
    assert sentry.init_sentry(settings(), "unit", options)
    sentry_sdk.capture_message("keep me")
    sentry_sdk.capture_message("drop me")
    (event,) = payloads("event")
    assert seen == ["keep me", "drop me"]
    assert event["extra"]["added"] == "by the hook: ***"


# -- tags, errors ----------------------------------------------------------------

FIELDS = {
    "command_id": "c-1",
    "command_type": "Ask",
    "event_id": "e-1",
    "event_type": "Asked",
    "session_id": "s-1",
    "group": "billing",
    "handler": "charge",
    "trace_id": TRACE_ID,
    "task_id": "not a tag",
    "outcome": None,
}


def test_llmgine_ids_become_tags(active: list[dict[str, Any]]) -> None:
    with sentry_sdk.new_scope():
        sentry.set_tags({**FIELDS, "session_id": None})
        sentry_sdk.capture_message("tagged")
    sentry_sdk.capture_message("outside the scope")
    tagged, outside = payloads("event")
    expected = {sentry.TAGS[k]: v for k, v in FIELDS.items() if k in sentry.TAGS}
    del expected["session_id"]  # a None value is no tag
    assert {k: tagged["tags"][k] for k in expected} == expected
    assert "session_id" not in tagged["tags"]
    assert "task_id" not in tagged["tags"]
    assert tagged["tags"]["llmgine.trace_id"] == TRACE_ID
    assert tagged["tags"]["service"] == "unit"
    assert "command_id" not in outside["tags"]


def test_an_exception_is_captured_once(active: list[dict[str, Any]]) -> None:
    error = ValueError("handler failed")
    sentry.capture_error(error)
    sentry.capture_error(error)
    sentry.capture_error(Retry("control flow, not an error"))
    sentry.capture_error(ValueError("another failure"))
    values = [e["exception"]["values"][-1]["value"] for e in payloads("event")]
    assert values == ["handler failed", "another failure"]


# -- traces ----------------------------------------------------------------------


def test_trace_headers_carry_the_current_span(active: list[dict[str, Any]]) -> None:
    with sentry_sdk.start_transaction(op="http.server", name="view") as transaction:
        headers = sentry.trace_headers()
        assert sentry.current_trace_id() == transaction.trace_id
    nested = headers.pop("headers")
    assert nested == headers  # Celery's worker reads the nested copy (celery#4875)
    assert set(headers) == {"sentry-trace", "baggage", "sentry-task-enqueued-time"}
    assert headers["sentry-trace"] == f"{transaction.trace_id}-{transaction.span_id}-1"
    assert f"sentry-trace_id={transaction.trace_id}" in headers["baggage"]
    assert isinstance(headers["sentry-task-enqueued-time"], float)
    # the worker's side: what the integration does with the request's headers
    with sentry_sdk.isolation_scope():
        continued = sentry_sdk.continue_trace(nested, op="queue.task.celery", name="task")
    assert continued.trace_id == transaction.trace_id
    assert continued.parent_span_id == transaction.span_id


def test_forwarded_headers_keep_the_trace() -> None:
    trace = f"{TRACE_ID}-0123456789abcdef-1"
    for incoming in (
        {"sentry-trace": trace, "baggage": "sentry-trace_id=x", "other": 1},
        {"headers": {"sentry-trace": trace, "baggage": "sentry-trace_id=x"}},
    ):
        forwarded = sentry.forward_trace_headers(incoming)
        assert forwarded["sentry-trace"] == forwarded["headers"]["sentry-trace"] == trace
        assert forwarded["headers"]["baggage"] == "sentry-trace_id=x"
        assert "other" not in forwarded
    assert sentry.forward_trace_headers({"other": 1}) == {}


def test_producer_span_is_a_transaction_on_llmgine_trace(active: list[dict[str, Any]]) -> None:
    fields = {"command_id": "c-9", "trace_id": TRACE_ID}
    with sentry.producer_span("llmgine.command.Ask", "c-9", "llmgine.commands", fields) as h:
        assert h["sentry-trace"].startswith(f"{TRACE_ID}-")
    sentry_sdk.capture_message("after the span")
    (transaction,) = payloads("transaction")
    (after,) = payloads("event")
    trace = transaction["contexts"]["trace"]
    assert trace["trace_id"] == TRACE_ID
    assert h["sentry-trace"] == f"{TRACE_ID}-{trace['span_id']}-1"
    assert trace["op"] == "queue.publish"
    assert trace["data"]["messaging.message.id"] == "c-9"
    assert trace["data"]["messaging.destination.name"] == "llmgine.commands"
    assert transaction["tags"]["command_id"] == "c-9"
    assert "command_id" not in after["tags"]


def test_producer_span_inside_a_transaction_is_its_child(active: list[dict[str, Any]]) -> None:
    with (
        sentry_sdk.start_transaction(op="http.server", name="view") as view,
        sentry.producer_span("llmgine.command.Ask", "c-9", fields={"trace_id": TRACE_ID}) as h,
    ):
        pass
    (transaction,) = payloads("transaction")
    (span,) = [s for s in transaction["spans"] if s["op"] == "queue.publish"]
    assert span["parent_span_id"] == view.span_id
    assert h["sentry-trace"] == f"{view.trace_id}-{span['span_id']}-1"


def test_a_span_left_on_the_scope_is_no_parent(active: list[dict[str, Any]]) -> None:
    """As sentry-sdk's redis.asyncio spans are left when a command raises or is cancelled."""
    stale = sentry_sdk.start_span(op="db.redis", name="MGET")  # no transaction: detached
    stale.__enter__()
    try:
        headers = sentry.trace_headers()
        assert headers["sentry-trace"].split("-")[0] == sentry.current_trace_id()
        with sentry.producer_span("llmgine.command.Ask", "c-9", fields={"trace_id": TRACE_ID}) as h:
            assert h["sentry-trace"].startswith(f"{TRACE_ID}-")
    finally:
        stale.__exit__(None, None, None)
    (transaction,) = payloads("transaction")
    assert transaction["contexts"]["trace"]["parent_span_id"] is None


def test_a_finished_transaction_left_on_the_scope_is_no_parent(
    active: list[dict[str, Any]],
) -> None:
    done = sentry_sdk.start_transaction(op="http.server", name="earlier request")
    done.__enter__()
    done.finish()  # finished, but still the scope's span
    try:
        assert not sentry.trace_headers()["sentry-trace"].startswith(done.trace_id)
        with sentry.producer_span("llmgine.command.Ask", "c-9", fields={"trace_id": TRACE_ID}) as h:
            assert h["sentry-trace"].startswith(f"{TRACE_ID}-")
    finally:
        done.__exit__(None, None, None)


# -- beat entries as crons -----------------------------------------------------


def test_beat_entries_carry_cron_headers() -> None:
    """Beat's Scheduler, patched by the integration, on kombu's in-memory transport."""
    assert sentry.init_sentry(
        settings(sentry_monitor_beat_tasks=True), "beat", {"transport": Recording}
    )
    app = Celery("beat-unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_default_queue = "beat-unit"

    @app.task(name="nightly.report", shared=False)
    def report() -> None: ...

    scheduler = Scheduler(app, lazy=True)
    entry = ScheduleEntry(
        name="nightly-report", task="nightly.report", schedule=crontab(minute=0, hour=3), app=app
    )
    scheduler.apply_entry(entry, producer=None)
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue("beat-unit", no_ack=True).get(timeout=5)
    (check_in,) = payloads("check_in")
    assert check_in["monitor_slug"] == "nightly-report"
    assert check_in["status"] == "in_progress"
    assert check_in["monitor_config"]["schedule"] == {"type": "crontab", "value": "0 3 * * *"}
    nested = message.headers["headers"]  # what the worker's receivers read
    assert nested["sentry-monitor-slug"] == "nightly-report"
    assert nested["sentry-monitor-check-in-id"] == check_in["check_in_id"]
    assert "sentry-trace" in nested
    app.close()
