"""Typed settings from ``LLMGINE_*`` environment variables, read when asked."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmgine_celery.errors import ConfigurationError

KNOWN_BROKER_SCHEMES = frozenset(
    {"amqp", "amqps", "pyamqp", "redis", "rediss", "memory", "filesystem"}
)


#: userinfo with a password: everything between "user:" and the last "@"
_PASSWORD = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:)(?P<secret>.*)@(?P<rest>[^@]*)$"
)
_PASSWORD_NO_SCHEME = re.compile(r"^(?P<head>[^:/@]*:)(?P<secret>.*)@(?P<rest>[^@]*)$")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (even one with '/', '#' or '?')."""
    pattern = _PASSWORD if "://" in url else _PASSWORD_NO_SCHEME
    match = pattern.match(url)
    if match is None:
        return url
    return f"{match['head']}***@{match['rest']}"


class Settings(BaseSettings):
    """Deployment settings; ``Settings()`` reads the environment at that moment."""

    # hide_input_in_errors: a rejected URL may carry a password
    model_config = SettingsConfigDict(
        env_prefix="LLMGINE_", extra="ignore", hide_input_in_errors=True, populate_by_name=True
    )

    #: broker URL; unset means the embedded default (filesystem broker in ``data_dir``)
    broker_url: SecretStr | None = None
    #: result backend URL; unset means the broker's Redis, or files in ``data_dir``
    result_backend: SecretStr | None = None
    #: folder of the embedded broker and result store
    data_dir: Path = Path(".llmgine")
    #: run a worker inside the process (default: only on the embedded broker)
    embedded_worker: bool | None = None
    #: seconds ``execute`` waits for a result unless told otherwise
    command_timeout: float = Field(default=60.0, gt=0)
    #: dotted module with Celery settings applied over the framework's defaults
    celery_config: str | None = None
    #: event groups a worker consumes; unset means every group of its application
    event_groups: str | None = None
    #: seconds to wait for the broker before giving up with a clear error
    connect_timeout: float = Field(default=5.0, gt=0)
    #: seconds between a Redis worker's re-binds of its group queues
    rebind_interval: float = Field(default=30.0, gt=0)
    #: event messages larger than this are dead-lettered unread
    max_message_bytes: int = Field(default=1024 * 1024, gt=0)

    # -- observability ------------------------------------------------------
    #: folder of the JSONL logs (default: ``<data_dir>/logs``)
    log_dir: Path | None = None
    #: lowest level written to the JSONL file and the console (DEBUG adds task.received)
    log_level: str = "INFO"
    #: write JSONL records (one file per service, rotated by size)
    log_jsonl: bool = True
    #: also print records on stderr
    log_console: bool = False
    #: bytes after which a JSONL file rotates (0: never)
    log_max_bytes: int = Field(default=50 * 1024 * 1024, ge=0)
    #: rotated JSONL files kept
    log_backups: int = Field(default=5, ge=1)
    #: collect Prometheus metrics
    metrics: bool = True
    #: a worker serves ``/metrics`` on this port (unset: no HTTP server)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: address the metrics server binds to
    metrics_host: str = "127.0.0.1"
    #: folder of prometheus-client's multiprocess files (default: ``<data_dir>/metrics``)
    metrics_dir: Path | None = None
    #: Sentry DSN (``SENTRY_DSN`` or ``LLMGINE_SENTRY_DSN``); unset: no Sentry
    sentry_dsn: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SENTRY_DSN", "LLMGINE_SENTRY_DSN")
    )
    #: Sentry environment tag (``SENTRY_ENVIRONMENT`` or ``LLMGINE_SENTRY_ENVIRONMENT``)
    sentry_environment: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SENTRY_ENVIRONMENT", "LLMGINE_SENTRY_ENVIRONMENT"),
    )
    #: share of traces sent to Sentry
    sentry_traces_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    #: report beat entries as Sentry crons
    sentry_monitor_beat_tasks: bool = False
    #: also publish CommandStartedEvent / CommandResultEvent as events (two per command)
    command_events: bool = False

    @field_validator("broker_url", "result_backend", mode="after")
    @classmethod
    def _has_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and "://" not in value.get_secret_value():
            raise ValueError(f"{redact_url(value.get_secret_value())!r} is not a URL")
        return value

    @field_validator("sentry_dsn", mode="after")
    @classmethod
    def _empty_dsn_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # SENTRY_DSN="" (as compose files pass an unset variable) means no Sentry
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("log_level", mode="after")
    @classmethod
    def _known_level(cls, value: str) -> str:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if value.upper() not in levels:
            raise ValueError(f"log level {value!r} is not one of {', '.join(levels)}")
        return value.upper()

    @property
    def logs(self) -> Path:
        """The folder of the JSONL logs."""
        return self.log_dir if self.log_dir is not None else self.data_dir / "logs"

    @property
    def metrics_folder(self) -> Path:
        """The folder of prometheus-client's multiprocess files."""
        return self.metrics_dir if self.metrics_dir is not None else self.data_dir / "metrics"

    def secrets(self) -> list[str]:
        """Secret values that must never appear in a record (URLs' passwords, the DSN)."""
        found = []
        for secret in (self.broker_url, self.result_backend, self.sentry_dsn):
            if secret is None:
                continue
            value = secret.get_secret_value()
            found.append(value)
            match = _PASSWORD.match(value)
            if match is not None and match["secret"]:
                found.append(match["secret"])
        return found

    @property
    def embedded(self) -> bool:
        """True when no broker is configured, so nothing needs a server."""
        return self.broker_url is None

    @property
    def runs_embedded_worker(self) -> bool:
        """True when ``bootstrap()`` should start a worker inside the process."""
        return self.embedded if self.embedded_worker is None else self.embedded_worker

    def broker(self) -> str:
        """The broker URL to use (with its secret)."""
        if self.broker_url is None:
            return "filesystem://"
        url = self.broker_url.get_secret_value()
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        if scheme not in KNOWN_BROKER_SCHEMES:
            raise ConfigurationError(
                f"LLMGINE_BROKER_URL {redact_url(url)!r} has an unsupported scheme {scheme!r}; "
                f"use one of {sorted(KNOWN_BROKER_SCHEMES)}"
            )
        return url

    def backend(self) -> str:
        """The result backend URL to use (with its secret)."""
        if self.result_backend is not None:
            return self.result_backend.get_secret_value()
        broker = self.broker()
        if broker.startswith(("redis://", "rediss://")):
            return broker
        if self.embedded or broker.startswith(("memory://", "filesystem://")):
            return f"file://{(self.data_dir / 'results').resolve()}"
        raise ConfigurationError(
            f"LLMGINE_RESULT_BACKEND must be set with broker {redact_url(broker)!r}: "
            "command results travel through it (e.g. redis://127.0.0.1:6379/0)"
        )
