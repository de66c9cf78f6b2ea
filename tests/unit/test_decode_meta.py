"""decode_meta reads what Celery's backend decode reads: plain JSON fast, the rest through it."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from celery import Celery

from llmgine_celery.bus.waiters import decode_meta


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize(
    "result",
    [
        '{"command_id":"c-1","success":true,"result":"\\u00e9\\"x\\""}',  # a command's result text
        {"nested": [1, 2.5, None, True], "text": "\u00e9\u4e2d"},
        dt.datetime(2026, 12, 5, 1, 2, 3, tzinfo=dt.UTC),  # kombu marks the type
        uuid.UUID(int=7),
    ],
    ids=["command text", "plain object", "datetime", "uuid"],
)
def test_decode_meta_reads_what_the_backend_reads(compression: str | None, result: object) -> None:
    # redis:// only names the backend class; nothing connects
    app = Celery("decode-test", backend="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.result_compression = compression
    backend = app.backend
    meta = {"status": "SUCCESS", "result": result, "task_id": "t-1", "children": []}
    payload = backend.encode(meta)
    payload = payload.encode() if isinstance(payload, str) else payload
    assert decode_meta(backend, payload) == backend.decode(payload)
    assert decode_meta(backend, payload)["result"] == result
