"""The Redis result backend reads before it writes only for redelivered messages."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmgine_celery import ApplicationConfig, Settings
from tests.integration.apps import APP_NAME, IntegrationApp
from tests.support import REDIS_BROKER_URL, require_service

pytestmark = pytest.mark.integration


def request(task_id: str, redelivered: bool) -> SimpleNamespace:
    """The parts of a Celery task request the backend looks at."""
    return SimpleNamespace(
        id=task_id, delivery_info={"redelivered": redelivered}, ignore_result=False,
        group=None, parent_id=None, root_id=None, children=[], chord=None,
    )  # fmt: skip


def test_a_redelivered_copy_cannot_overwrite_a_success(tmp_path: Path) -> None:
    require_service(REDIS_BROKER_URL)
    settings = Settings(broker_url=REDIS_BROKER_URL, embedded_worker=False, data_dir=tmp_path)
    backend = IntegrationApp(ApplicationConfig(name=APP_NAME, settings=settings)).celery.backend
    task_id = f"backend-test-{uuid.uuid4()}"

    backend.store_result(task_id, {"first": True}, "SUCCESS", request=request(task_id, False))
    backend.store_result(task_id, {"copy": True}, "SUCCESS", request=request(task_id, True))
    assert backend.get_task_meta(task_id, cache=False)["result"] == {"first": True}

    # A first delivery writes without reading: the same id sent twice is at-least-once.
    backend.store_result(task_id, {"second send": True}, "SUCCESS", request=request(task_id, False))
    assert backend.get_task_meta(task_id, cache=False)["result"] == {"second send": True}
    backend.forget(task_id)
