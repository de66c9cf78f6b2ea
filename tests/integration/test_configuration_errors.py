"""Bad broker settings give one clear, redacted error, not a stack of retries."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from llmgine_celery import ApplicationConfig, BrokerUnavailableError, ConfigurationError, Settings
from tests.integration.apps import IntegrationApp, WhereAmI
from tests.support import RABBITMQ_URL, ensure_test_vhost, require_service

pytestmark = pytest.mark.integration


def app_for(
    tmp_path: Path, broker: str, backend: str = "redis://127.0.0.1:6379/0"
) -> IntegrationApp:
    settings = Settings(
        broker_url=broker, result_backend=backend, data_dir=tmp_path, connect_timeout=2
    )
    return IntegrationApp(ApplicationConfig(name="itest", settings=settings))


def test_an_unreachable_broker_fails_bootstrap_naming_the_redacted_url(tmp_path: Path) -> None:
    app = app_for(tmp_path, "amqp://guest:s3cret-pw@127.0.0.1:1//")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(app.bootstrap())
    message = str(caught.value)
    assert "amqp://guest:***@127.0.0.1:1//" in message
    assert "s3cret-pw" not in message and "s3cret-pw" not in repr(caught.value.args)
    assert time.monotonic() - started < 15


def test_an_unreachable_redis_broker_fails_the_same_way(tmp_path: Path) -> None:
    app = app_for(tmp_path, "redis://:s3cret-pw@127.0.0.1:1/0", "redis://:s3cret-pw@127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailableError, match=r"redis://:\*\*\*@127\.0\.0\.1:1/0") as caught:
        asyncio.run(app.bootstrap())
    assert "s3cret-pw" not in str(caught.value)


def test_an_unreachable_result_backend_is_named(tmp_path: Path) -> None:
    require_service(RABBITMQ_URL)
    ensure_test_vhost()
    app = app_for(tmp_path, RABBITMQ_URL, "redis://:pw-x@127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailableError, match="result backend") as caught:
        asyncio.run(app.bootstrap())
    assert "pw-x" not in str(caught.value)


def test_a_malformed_broker_url_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unsupported scheme 'kafka'") as caught:
        _ = app_for(tmp_path, "kafka://user:pw-y@host:9092").celery
    assert "pw-y" not in str(caught.value)


def test_amqp_without_a_result_backend_asks_for_one(tmp_path: Path) -> None:
    settings = Settings(broker_url=RABBITMQ_URL, data_dir=tmp_path)
    app = IntegrationApp(ApplicationConfig(name="itest", settings=settings))
    with pytest.raises(ConfigurationError, match="LLMGINE_RESULT_BACKEND"):
        _ = app.celery


def test_a_send_that_fails_raises_instead_of_waiting_out_the_timeout(tmp_path: Path) -> None:
    require_service("redis://127.0.0.1:6379/14")
    app = app_for(tmp_path, "amqp://guest:pw-z@127.0.0.1:1//", "redis://127.0.0.1:6379/14")
    started = time.monotonic()

    async def execute() -> None:
        try:
            await app.message_bus.execute(WhereAmI(tag="lost"), timeout=120)
        finally:
            await app.message_bus.aclose()

    with pytest.raises(BrokerUnavailableError, match=r"amqp://guest:\*\*\*@127\.0\.0\.1:1//"):
        asyncio.run(execute())
    assert time.monotonic() - started < 60
