"""ApplicationBootstrap wiring that needs no broker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import llmgine_celery
from llmgine_celery import (
    ApplicationBootstrap,
    ApplicationConfig,
    Command,
    CommandResult,
    ConfigurationError,
    DuplicateHandlerError,
    Event,
    Settings,
)


@dataclass
class Ping(Command):
    text: str


@dataclass
class Pinged(Event):
    text: str


class PingApp(ApplicationBootstrap):
    def _register_command_handlers(self) -> None:
        self.register_command_handler(Ping, self.ping)

    def _register_event_handlers(self) -> None:
        self.register_event_handler(Pinged, self.on_pinged)
        self.register_event_handler(Pinged, self.on_pinged, group="audit")

    def ping(self, command: Ping) -> CommandResult:
        return CommandResult(command_id=command.id, success=True, result=command.text)

    def on_pinged(self, event: Pinged) -> None:
        return None


def embedded(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


def test_the_package_root_exports_the_public_api() -> None:
    for name in (
        "ApplicationBootstrap", "ApplicationConfig", "Command", "CommandResult", "Event",
        "LogLevel", "MessageBus", "ObservabilityBus", "Settings",
    ):  # fmt: skip
        assert name in llmgine_celery.__all__
        assert getattr(llmgine_celery, name) is not None


def test_the_application_is_named_after_its_class_unless_configured() -> None:
    assert PingApp().name == "PingApp"
    assert PingApp(config=ApplicationConfig(name="ping-service")).name == "ping-service"


def test_an_application_name_unsafe_in_queue_names_is_refused() -> None:
    with pytest.raises(ValueError, match="application name"):
        PingApp(ApplicationConfig(name="my app/1"))


def test_constructing_an_application_reads_no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGINE_BROKER_URL", "kafka://nowhere")
    app = PingApp()  # nothing is read or connected yet
    with pytest.raises(ConfigurationError, match="kafka"):
        _ = app.celery


def test_the_celery_app_has_a_task_per_command_type_and_handler(tmp_path: Path) -> None:
    app = PingApp(ApplicationConfig(name="pinger", settings=embedded(tmp_path)))
    tasks = set(app.celery.tasks)
    assert "llmgine.command.Ping" in tasks
    assert {"llmgine.event.pinger.on_pinged", "llmgine.event.audit.on_pinged"} <= tasks
    queues = {q.name for q in app.celery.conf.task_queues}
    assert queues == {"llmgine.commands", "llmgine.handlers.pinger", "llmgine.handlers.audit"}
    assert app.celery.conf.accept_content == ["json"]


def test_a_second_handler_for_a_command_type_is_refused(tmp_path: Path) -> None:
    class TwiceApp(PingApp):
        def _register_command_handlers(self) -> None:
            super()._register_command_handlers()
            self.register_command_handler(Ping, self.ping)

    app = TwiceApp(ApplicationConfig(settings=embedded(tmp_path)))
    with pytest.raises(DuplicateHandlerError, match="Ping already has a handler"):
        _ = app.celery


def test_two_applications_do_not_share_a_celery_app(tmp_path: Path) -> None:
    first = PingApp(ApplicationConfig(name="one", settings=embedded(tmp_path)))
    second = PingApp(ApplicationConfig(name="two", settings=embedded(tmp_path)))
    assert first.celery is not second.celery
    assert "llmgine.event.one.on_pinged" not in second.celery.tasks


@dataclass
class Unhandled(Command):
    text: str


def test_on_the_embedded_default_a_type_without_handler_fails_at_once(tmp_path: Path) -> None:
    app = PingApp(ApplicationConfig(settings=embedded(tmp_path)))
    handle = app.message_bus.send(Unhandled(text="x"))  # nothing is sent: no worker could run it
    result = handle.get(timeout=0.1)
    assert handle.ready is result
    assert not result.success and "Unhandled" in (result.error or "")
    again = app.message_bus.execute_sync(Unhandled(text="y"))
    assert not again.success and again.error == result.error
