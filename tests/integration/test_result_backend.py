"""The Redis result backend: reads before it writes only for redelivered messages,
stores and publishes with one script, or a pipeline where scripts are refused."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from llmgine_celery import ApplicationConfig, Settings
from llmgine_celery.bus import topology
from tests.integration.apps import APP_NAME, IntegrationApp
from tests.support import REDIS_BROKER_URL, require_service, wait_for

pytestmark = pytest.mark.integration


def request(task_id: str, redelivered: bool, reply_to: str | None = None) -> SimpleNamespace:
    """The parts of a Celery task request the backend looks at."""
    found = SimpleNamespace(
        id=task_id, delivery_info={"redelivered": redelivered}, ignore_result=False,
        group=None, parent_id=None, root_id=None, children=[], chord=None,
    )  # fmt: skip
    if reply_to is not None:
        setattr(found, topology.HEADER_REPLY_TO, reply_to)
    return found


def backend_on(url: str, tmp_path: Path) -> Any:
    settings = Settings(broker_url=url, embedded_worker=False, data_dir=tmp_path)
    return IntegrationApp(ApplicationConfig(name=APP_NAME, settings=settings)).celery.backend


def test_a_redelivered_copy_cannot_overwrite_a_success(tmp_path: Path) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    task_id = f"backend-test-{uuid.uuid4()}"

    backend.store_result(task_id, {"first": True}, "SUCCESS", request=request(task_id, False))
    backend.store_result(task_id, {"copy": True}, "SUCCESS", request=request(task_id, True))
    assert backend.get_task_meta(task_id, cache=False)["result"] == {"first": True}

    # A first delivery writes without reading: the same id sent twice is at-least-once.
    backend.store_result(task_id, {"second send": True}, "SUCCESS", request=request(task_id, False))
    assert backend.get_task_meta(task_id, cache=False)["result"] == {"second send": True}
    backend.forget(task_id)


def store_watched(backend: Any, task_id: str, result: Any) -> Any:
    """Store ``result``; return what a subscriber to the result's channel received."""
    return store_replied(backend, task_id, result, None)[0]


MARK = b"test: everything published before this"


def store_replied(
    backend: Any,
    task_id: str,
    result: Any,
    reply_to: str | None,
    watched: str = "",
    redelivered: bool = False,
) -> tuple[Any, list[Any]]:
    """Store ``result`` for a message naming ``reply_to``.

    Returns what the result's own channel received, and everything channel
    ``watched`` (default: ``reply_to``) received up to a mark published after the store.
    """
    key = backend.get_key_for_task(task_id)
    other = (watched or reply_to or "test.nothing").encode()
    with redis.Redis.from_url(REDIS_BROKER_URL) as watcher, watcher.pubsub() as pubsub:
        pubsub.subscribe(key, other)
        for _ in range(2):
            wait_for(lambda: pubsub.get_message(timeout=0.1), what="the subscriptions")
        delivery = request(task_id, redelivered, reply_to)
        backend.store_result(task_id, result, "SUCCESS", request=delivery)
        watcher.publish(other, MARK)  # after whatever the store published, on this connection
        own: Any = None
        replies: list[Any] = []
        while True:
            message = wait_for(lambda: pubsub.get_message(timeout=0.1), what="the messages")
            if message["channel"] == key:
                own = json.loads(message["data"])
            elif message["data"] == MARK:
                return own, replies
            else:
                replies.append(json.loads(message["data"]))


def evalsha_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_result_is_stored_and_published_by_one_script(tmp_path: Path) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    task_id = f"backend-test-{uuid.uuid4()}"
    with redis.Redis.from_url(REDIS_BROKER_URL) as client:
        before = evalsha_calls(client)
        published = store_watched(backend, task_id, {"n": 1})
        assert evalsha_calls(client) > before
        key = backend.get_key_for_task(task_id)
        assert 0 < client.ttl(key) <= backend.expires
    assert published["result"] == {"n": 1} and published["status"] == "SUCCESS"
    assert backend.get_task_meta(task_id, cache=False)["result"] == {"n": 1}
    backend.forget(task_id)


REPLY = topology.reply_channel("0123456789abcdef" * 2)


@pytest.mark.parametrize("redelivered", [False, True], ids=["first delivery", "redelivered"])
def test_a_result_is_published_on_the_reply_channel_its_message_names(
    tmp_path: Path, redelivered: bool
) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    task_id = f"backend-test-{uuid.uuid4()}"
    own, replies = store_replied(backend, task_id, {"n": 3}, REPLY, redelivered=redelivered)
    assert own["result"] == {"n": 3} and own["task_id"] == task_id
    assert replies == [own]  # once, the same meta
    backend.forget(task_id)


@pytest.mark.parametrize("channel", ["llmgine.results.someone-else", "llmgine.reply.short"])
def test_a_reply_header_that_is_no_reply_channel_gets_nothing(tmp_path: Path, channel: str) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    task_id = f"backend-test-{uuid.uuid4()}"
    own, replies = store_replied(backend, task_id, {"n": 4}, channel)
    assert own["result"] == {"n": 4} and replies == []
    backend.forget(task_id)


def test_a_user_refused_scripts_stores_and_publishes_with_a_pipeline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_service(REDIS_BROKER_URL)
    user, password = f"llmgine-noscript-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    parts = urlsplit(REDIS_BROKER_URL)
    url = urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))
    with redis.Redis.from_url(REDIS_BROKER_URL) as admin:
        admin.acl_setuser(
            user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
            commands=["+@all", "-@scripting"],
        )  # fmt: skip
        try:
            backend = backend_on(url, tmp_path)
            first, second = (f"backend-test-{uuid.uuid4()}" for _ in range(2))
            with caplog.at_level(logging.WARNING, logger="llmgine_celery.bus.result_store"):
                assert store_watched(backend, first, {"n": 1})["result"] == {"n": 1}
                own, replies = store_replied(backend, second, {"n": 2}, REPLY)
                assert own["result"] == {"n": 2} and replies == [own]
            refused = [r for r in caplog.records if "refused the result store script" in r.message]
            assert len(refused) == 1  # told once; the second store went straight to the pipeline
            assert password not in caplog.text
            for task_id, n in ((first, 1), (second, 2)):
                assert backend.get_task_meta(task_id, cache=False)["result"] == {"n": n}
                assert 0 < admin.ttl(backend.get_key_for_task(task_id)) <= backend.expires
                backend.forget(task_id)
        finally:
            admin.acl_deluser(user)


def connections_received(client: redis.Redis) -> int:
    return int(client.info("stats")["total_connections_received"])


def test_each_thread_stores_on_one_connection_not_one_per_result(tmp_path: Path) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    ids = [[f"backend-test-{uuid.uuid4()}" for _ in range(20)] for _ in range(3)]

    def store_all(task_ids: list[str]) -> None:
        for task_id in task_ids:
            backend.store_result(
                task_id, {"t": task_id}, "SUCCESS", request=request(task_id, False)
            )

    with redis.Redis.from_url(REDIS_BROKER_URL) as client:
        before = connections_received(client)
        threads = [threading.Thread(target=store_all, args=(chunk,)) for chunk in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert connections_received(client) - before == 3  # one per thread, not one per store
    for task_id in (i for chunk in ids for i in chunk):
        assert backend.get_task_meta(task_id, cache=False)["result"] == {"t": task_id}
        backend.forget(task_id)


def test_a_killed_connection_is_replaced_and_the_result_still_stored(tmp_path: Path) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    first, second = (f"backend-test-{uuid.uuid4()}" for _ in range(2))
    backend.store_result(first, 1, "SUCCESS", request=request(first, False))
    with redis.Redis.from_url(REDIS_BROKER_URL) as admin:
        mine = [c for c in admin.client_list() if c["cmd"] == "evalsha"]
        assert mine, "the store's connection ran the script"
        for found in mine:
            admin.client_kill_filter(_id=found["id"])
    backend.store_result(second, 2, "SUCCESS", request=request(second, False))
    assert backend.get_task_meta(second, cache=False)["result"] == 2
    for task_id in (first, second):
        backend.forget(task_id)


def test_a_flushed_script_cache_is_reloaded(tmp_path: Path) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    task_id = f"backend-test-{uuid.uuid4()}"
    with redis.Redis.from_url(REDIS_BROKER_URL) as client:
        client.script_flush()  # as a restarted server has no scripts
        before = evalsha_calls(client)
        published = store_watched(backend, task_id, {"n": 5})
        assert evalsha_calls(client) > before
        assert 0 < client.ttl(backend.get_key_for_task(task_id)) <= backend.expires
    assert published["result"] == {"n": 5}
    backend.forget(task_id)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # 3.12+: threads in pytest
def test_a_forked_child_stores_on_a_connection_of_its_own(tmp_path: Path) -> None:
    require_service(REDIS_BROKER_URL)
    backend = backend_on(REDIS_BROKER_URL, tmp_path)
    parent_ids = [f"backend-test-{uuid.uuid4()}" for _ in range(300)]
    child_ids = [f"backend-test-{uuid.uuid4()}" for _ in range(300)]
    backend.store_result(parent_ids[0], 0, "SUCCESS", request=request(parent_ids[0], False))
    pid = os.fork()
    if pid == 0:  # the child: store, then leave without pytest's cleanup
        code = 1
        try:
            for task_id in child_ids:
                backend.store_result(task_id, "child", "SUCCESS", request=request(task_id, False))
            code = 0
        finally:
            os._exit(code)
    for task_id in parent_ids[1:]:  # meanwhile, on the parent's connection
        backend.store_result(task_id, "parent", "SUCCESS", request=request(task_id, False))
    assert os.waitpid(pid, 0)[1] == 0
    for task_ids, value in ((parent_ids[1:], "parent"), (child_ids, "child")):
        for task_id in task_ids:
            assert backend.get_task_meta(task_id, cache=False)["result"] == value
            backend.forget(task_id)
    backend.forget(parent_ids[0])
