"""The sinks Settings turn on, and what they keep out of the JSONL file."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from llmgine_celery.observability.bus import ConsoleSink, LogLevel, ObservabilityBus
from llmgine_celery.observability.setup import configured_sinks
from llmgine_celery.observability.threaded import ThreadedSink
from llmgine_celery.settings import Settings

BROKER = "amqp://llm:br0ker-Pa55@rabbit.internal:5672/prod"
DSN = "https://0123456789abcdef@o1.ingest.sentry.io/42"


def settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        broker_url=SecretStr(BROKER),
        result_backend=SecretStr("redis://:r3dis-Pa55@cache.internal:6379/0"),
        sentry_dsn=SecretStr(DSN),
        data_dir=tmp_path,
        metrics=False,
        **extra,  # type: ignore[arg-type]
    )


def test_the_broker_backend_and_sentry_secrets_never_reach_the_file(tmp_path: Path) -> None:
    bus = ObservabilityBus("svc", configured_sinks(settings(tmp_path), "svc"))
    bus.log(
        LogLevel.ERROR,
        "connection lost",
        error=f"cannot reach {BROKER} (password br0ker-Pa55), dsn={DSN}",
        nested={"deep": ["redis://:r3dis-Pa55@cache.internal:6379/0", "r3dis-Pa55"]},
        api_key="sk-live-123",
        max_tokens=512,
    )
    bus.close()
    text = (tmp_path / "logs" / "svc.jsonl").read_text()
    for secret in ("br0ker-Pa55", "r3dis-Pa55", "0123456789abcdef", "sk-live-123"):
        assert secret not in text
    assert '"max_tokens":512' in text  # counts stay readable


def test_each_sink_is_on_only_when_settings_say_so(tmp_path: Path) -> None:
    quiet = configured_sinks(settings(tmp_path, log_jsonl=False), "svc")
    assert [type(s) for s in quiet] == [ConsoleSink]
    loud = configured_sinks(settings(tmp_path, log_dir=tmp_path / "elsewhere"), "svc")
    assert [type(s) for s in loud] == [ConsoleSink, ThreadedSink]
    ObservabilityBus("svc", loud).log(LogLevel.INFO, "here")
    loud[1].close()
    assert (tmp_path / "elsewhere" / "svc.jsonl").read_text().count("\n") == 1
