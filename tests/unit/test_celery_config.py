"""build_celery: JSON-only messages, config modules, embedded folders; no broker."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from llmgine_celery import ConfigurationError, Settings
from llmgine_celery.bus import topology
from llmgine_celery.bus.celery_app import REQUIRED, build_celery, transport_of

ConfigModule = Callable[[str], str]


@pytest.fixture
def config_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConfigModule:
    """Write a Celery config module into tmp_path; returns a function giving its name."""
    folder = tmp_path / "config_modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(source: str) -> str:
        name = f"llmgine_test_celeryconfig_{uuid.uuid4().hex}"
        (folder / f"{name}.py").write_text(source)
        return name

    return write


def embedded(tmp_path: Path, **kwargs: object) -> Settings:
    return Settings(data_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_embedded_app_is_json_only(tmp_path: Path) -> None:
    celery = build_celery("app", embedded(tmp_path), [], set())
    assert celery.conf.accept_content == ["json"]
    assert celery.conf.result_accept_content == ["json"]
    assert celery.conf.task_serializer == "json"
    assert celery.conf.result_serializer == "json"
    assert celery.conf.event_serializer == "json"


def test_embedded_app_uses_filesystem_broker_and_file_results(tmp_path: Path) -> None:
    celery = build_celery("app", embedded(tmp_path), [], set())
    assert celery.conf.broker_url == "filesystem://"
    assert celery.conf.result_backend == f"file://{(tmp_path / 'results').resolve()}"
    options = celery.conf.broker_transport_options
    assert Path(options["data_folder_in"]).is_dir()
    assert Path(options["control_folder"]).is_dir()
    assert Path(options["data_folder_in"]).is_relative_to(tmp_path.resolve())
    assert (tmp_path / "results").is_dir()


def test_framework_defaults_are_applied(tmp_path: Path) -> None:
    celery = build_celery("app", embedded(tmp_path), [], set())
    assert celery.conf.worker_prefetch_multiplier == 1
    assert celery.conf.task_acks_late is True
    assert celery.conf.task_default_queue == topology.COMMAND_QUEUE


def test_task_queues_cover_commands_groups_and_routed_queues(tmp_path: Path) -> None:
    celery = build_celery("app", embedded(tmp_path), ["billing", "audit"], {"fast"})
    names = [q.name for q in celery.conf.task_queues]
    assert names == [
        topology.COMMAND_QUEUE,
        topology.handler_queue_name("billing"),
        topology.handler_queue_name("audit"),
        "fast",
    ]


def test_config_module_with_pickle_serializer_is_refused(
    tmp_path: Path, config_module: ConfigModule
) -> None:
    name = config_module('task_serializer = "pickle"\n')
    with pytest.raises(ConfigurationError, match="JSON") as info:
        build_celery("app", embedded(tmp_path, celery_config=name), [], set())
    assert "task_serializer" in str(info.value)


@pytest.mark.parametrize(
    "source",
    [
        'accept_content = ["json", "pickle"]\n',
        'result_serializer = "pickle"\n',
        'result_accept_content = ["pickle"]\n',
        'event_serializer = "yaml"\n',
    ],
)
def test_config_module_may_not_weaken_json_only(
    tmp_path: Path,
    config_module: ConfigModule,
    source: str,
) -> None:
    with pytest.raises(ConfigurationError, match="JSON"):
        build_celery("app", embedded(tmp_path, celery_config=config_module(source)), [], set())


def test_config_module_setting_is_applied(tmp_path: Path, config_module: ConfigModule) -> None:
    name = config_module("worker_prefetch_multiplier = 4\nCONSTANT = 1\n_private = 2\n")
    celery = build_celery("app", embedded(tmp_path, celery_config=name), [], set())
    assert celery.conf.worker_prefetch_multiplier == 4
    assert celery.conf.accept_content == ["json"]
    assert celery.conf.task_acks_late is True


def test_config_module_may_repeat_the_required_values(
    tmp_path: Path, config_module: ConfigModule
) -> None:
    name = config_module('task_serializer = "json"\naccept_content = ["json"]\n')
    celery = build_celery("app", embedded(tmp_path, celery_config=name), [], set())
    assert celery.conf.task_serializer == "json"
    assert celery.conf.accept_content == ["json"]


def test_missing_config_module_is_a_configuration_error(tmp_path: Path) -> None:
    settings = embedded(tmp_path, celery_config="no_such_module_for_llmgine_tests")
    with pytest.raises(ConfigurationError, match="no_such_module_for_llmgine_tests"):
        build_celery("app", settings, [], set())


def test_config_module_from_environment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config_module: ConfigModule,
) -> None:
    monkeypatch.setenv("LLMGINE_CELERY_CONFIG", config_module("worker_prefetch_multiplier = 3\n"))
    celery = build_celery("app", Settings(data_dir=tmp_path), [], set())
    assert celery.conf.worker_prefetch_multiplier == 3


def test_required_settings_are_json_only() -> None:
    assert all("pickle" not in str(value) for value in REQUIRED.values())
    assert REQUIRED["accept_content"] == ["json"]


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("amqp://h//", "amqp"),
        ("pyamqp://h//", "amqp"),
        ("amqps://h//", "amqp"),
        ("redis://h:6379/0", "redis"),
        ("rediss://h:6379/0", "rediss"),
        ("filesystem://", "filesystem"),
    ],
)
def test_transport_of(url: str, transport: str) -> None:
    assert transport_of(url) == transport
