"""Settings from LLMGINE_* variables: embedded default, URL checks, redaction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmgine_celery import ConfigurationError, Settings
from llmgine_celery.settings import redact_url

PASSWORD = "s3cr3t-pa55"


def test_nothing_set_is_embedded() -> None:
    settings = Settings()
    assert settings.embedded is True
    assert settings.runs_embedded_worker is True
    assert settings.broker() == "filesystem://"
    assert settings.backend().startswith("file://")


def test_embedded_backend_is_under_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLMGINE_DATA_DIR", str(tmp_path))
    assert Settings().backend() == f"file://{(tmp_path / 'results').resolve()}"


def test_settings_read_the_environment_when_constructed(monkeypatch: pytest.MonkeyPatch) -> None:
    before = Settings()
    monkeypatch.setenv("LLMGINE_BROKER_URL", "redis://127.0.0.1:6379/0")
    assert before.embedded is True
    assert Settings().embedded is False


def test_redis_broker_without_backend_uses_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:6379/0"
    monkeypatch.setenv("LLMGINE_BROKER_URL", url)
    settings = Settings()
    assert settings.embedded is False
    assert settings.runs_embedded_worker is False
    assert settings.broker() == url
    assert settings.backend() == url


def test_explicit_backend_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGINE_BROKER_URL", "amqp://guest:guest@localhost:5672//")
    monkeypatch.setenv("LLMGINE_RESULT_BACKEND", "redis://localhost:6379/1")
    assert Settings().backend() == "redis://localhost:6379/1"


def test_amqp_broker_without_backend_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMGINE_BROKER_URL", f"amqp://user:{PASSWORD}@rabbit:5672//")
    settings = Settings()
    assert settings.broker().startswith("amqp://")
    with pytest.raises(ConfigurationError) as info:
        settings.backend()
    assert "LLMGINE_RESULT_BACKEND" in str(info.value)
    assert PASSWORD not in str(info.value)
    assert "rabbit" in str(info.value)


def test_unsupported_broker_scheme_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMGINE_BROKER_URL", f"kafka://user:{PASSWORD}@x:9092")
    with pytest.raises(ConfigurationError) as info:
        Settings().broker()
    assert "kafka" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_broker_scheme_with_transport_suffix_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGINE_BROKER_URL", "redis+socket:///tmp/redis.sock")
    assert Settings().broker() == "redis+socket:///tmp/redis.sock"


@pytest.mark.parametrize("variable", ["LLMGINE_BROKER_URL", "LLMGINE_RESULT_BACKEND"])
def test_value_without_scheme_is_a_validation_error(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "localhost:6379")
    with pytest.raises(ValidationError, match="is not a URL"):
        Settings()


def test_validation_error_does_not_show_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGINE_BROKER_URL", f"user:{PASSWORD}@rabbit:5672")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert PASSWORD not in str(info.value)


def test_secret_urls_are_hidden_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGINE_BROKER_URL", f"amqp://user:{PASSWORD}@rabbit:5672//")
    monkeypatch.setenv("LLMGINE_RESULT_BACKEND", f"redis://:{PASSWORD}@redis:6379/0")
    settings = Settings()
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)


def test_numeric_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGINE_COMMAND_TIMEOUT", "2.5")
    monkeypatch.setenv("LLMGINE_EMBEDDED_WORKER", "false")
    settings = Settings()
    assert settings.command_timeout == 2.5
    assert settings.runs_embedded_worker is False


def test_non_positive_timeout_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGINE_COMMAND_TIMEOUT", "0")
    with pytest.raises(ValidationError, match="command_timeout"):
        Settings()


def test_redact_url_hides_password_keeps_user_and_host() -> None:
    redacted = redact_url("amqp://user:secret@host:5672//")
    assert "secret" not in redacted
    assert redacted == "amqp://user:***@host:5672//"


def test_redact_url_without_username() -> None:
    assert redact_url("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"


def test_redact_url_without_password_is_unchanged() -> None:
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("filesystem://") == "filesystem://"


def test_import_does_not_read_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGINE_")}
    env["LLMGINE_BROKER_URL"] = "garbage"
    env["LLMGINE_COMMAND_TIMEOUT"] = "not-a-number"
    code = (
        "import llmgine_celery, llmgine_celery.cli, llmgine_celery.bus.celery_app\n"
        "from llmgine_celery import Settings\n"
        "try:\n"
        "    Settings()\n"
        "except Exception as exc:\n"
        "    print('settings-invalid', type(exc).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "settings-invalid ValidationError"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pa#ss@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://user:p/a?ss@host:5672//", "amqp://user:***@host:5672//"),
        ("user:s3cr3t@rabbit:5672", "user:***@rabbit:5672"),
        ("amqp://guest@host//", "amqp://guest@host//"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url_hides_passwords_with_url_delimiters(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_an_empty_sentry_dsn_turns_sentry_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENTRY_DSN", "")
    assert Settings().sentry_dsn is None
    monkeypatch.setenv("SENTRY_DSN", "https://key@o1.ingest.sentry.io/1")
    assert Settings().sentry_dsn is not None
