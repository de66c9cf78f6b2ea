"""The result backend writes a command's meta with pydantic-core, anything else with Celery."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from celery import Celery
from celery.backends.base import decompress_payload
from pydantic_core import to_json

from llmgine_celery.bus.result_backend import llmgine_redis_backend, plain_meta

#: a command's stored meta: its result is the JSON text of a CommandResult
COMMAND_META = {
    "status": "SUCCESS",
    "result": '{"command_id":"c-1","success":true,"result":"\u00e9\\"x\\"","error":null}',
    "traceback": None,
    "children": [],
    "date_done": "2026-12-05T01:02:03.000004+00:00",
    "task_id": "c-1",
}


def backends(compression: str | None) -> tuple[Any, Any]:
    """Celery's Redis backend and llmgine's, alike but for the class; nothing connects."""
    app = Celery("encode-test", backend="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.result_compression = compression
    celery_backend = app.backend
    ours = llmgine_redis_backend(type(celery_backend))(app=app, url="redis://127.0.0.1:1/0")
    return celery_backend, ours


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_command_meta_is_written_by_pydantic_core_and_reads_back_the_same(
    compression: str | None,
) -> None:
    celery_backend, ours = backends(compression)
    payload = ours.encode(COMMAND_META)
    if compression is not None:
        assert payload != to_json(COMMAND_META)  # compressed, as Celery compresses
    assert decompress_payload(payload) == to_json(COMMAND_META)  # the fast encoder wrote it
    assert celery_backend.decode(payload) == COMMAND_META == ours.decode(payload)
    assert celery_backend.decode(celery_backend.encode(COMMAND_META)) == COMMAND_META


@pytest.mark.parametrize(
    "meta",
    [
        {**COMMAND_META, "result": dt.datetime(2026, 12, 5, 1, 2, 3, tzinfo=dt.UTC)},
        {**COMMAND_META, "result": {"exc_type": "ValueError", "exc_message": ["bad"]}},
        {**COMMAND_META, "children": [[["child-1", None], None]]},
        {**COMMAND_META, "args": ["x"]},  # Celery's extended meta
    ],
    ids=["datetime result", "exception", "subtasks", "extended"],
)
def test_any_other_meta_is_written_by_celery(meta: dict[str, Any]) -> None:
    celery_backend, ours = backends(None)
    assert not plain_meta(meta)
    payload = ours.encode(meta)
    assert payload == celery_backend.encode(meta)
    assert ours.decode(payload) == celery_backend.decode(payload)


def test_a_meta_pydantic_core_cannot_encode_falls_back_to_celery() -> None:
    celery_backend, ours = backends(None)
    meta = {**COMMAND_META, "result": "lone \ud800 surrogate"}
    assert plain_meta(meta)
    assert ours.encode(meta) == celery_backend.encode(meta)
