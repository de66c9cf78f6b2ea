"""Celery's Redis result backend, minus costs llmgine-celery does not need, plus replies.

* ``on_task_call``: Celery subscribes its synchronous pub/sub to every task it
  sends, and never reads those channels unless ``.get()`` is called, so results
  pile up in that socket. Our waiters subscribe on their own; ``.get()`` still
  subscribes when it is used.
* ``_store_result`` reads the stored state before every write, so that a
  duplicate delivery cannot overwrite a SUCCESS. Only a redelivered message can
  be such a duplicate, so the read is kept for those and skipped on a first
  delivery: one Redis round trip less per task.
* ``_set`` wraps SET and PUBLISH in MULTI/EXEC. Nothing needs them atomic
  (a reader between them sees the stored result, as a later one would), and
  the store was a fifth of a worker's CPU per command. They run as one Lua
  script instead (``EVALSHA``): one command to pack, the value sent once, one
  reply to parse. Against a pipeline it saved a worker 2-5% of its CPU per
  command (``bench/worker_cost.py --versus-checkout``: medians 0.95x and
  0.98x; the same code against itself measured 0.97x-1.04x per round). Each
  worker thread sends it on a Redis connection of its own (``result_store``):
  against redis-py's pooled client that took a threads worker's CPU per
  command to 0.85x-0.88x. A server that refuses scripts gets a pipeline.
* ``_get_result_meta`` looks up ``result_extended`` and converts the time zone
  on every call (19 us); with neither in use the meta is built directly (3 us).
* ``_encode``: a meta of text and None (a command's) is written with
  pydantic-core's JSON encoder, 1.5 us against kombu's 9 us; it decodes to the
  same meta, and compression still applies. Anything else goes through Celery.

A command sent by ``execute()`` names its caller's reply channel in a header
(``llmgine_reply_to``); its result is published there too, in the same script.
The caller then subscribes once per event loop rather than once per command
(``bus.waiters``). Publishing on the task's own channel stays, for anyone who
waits there (``AsyncResult.get()``, ``fetch_result`` from another process).
"""

from __future__ import annotations

import time
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from pydantic_core import PydanticSerializationError, to_json

from llmgine_celery.bus import topology
from llmgine_celery.bus.result_store import ResultStore
from llmgine_celery.observability.bus import iso_utc

#: Celery's own cap on a stored value (RedisBackend._MAX_STR_VALUE_SIZE)
MAX_VALUE_SIZE = getattr(RedisBackend, "_MAX_STR_VALUE_SIZE", 512 * 1024 * 1024)


def store_and_publish(
    backend: Any, key: Any, value: Any, expires: int | None, reply_to: str | None = None
) -> None:
    """SET ``key`` (expiring after ``expires`` seconds), PUBLISH it (and on ``reply_to``)."""
    store = backend.llmgine_result_store
    if store is None:  # a race makes two stores: harmless, each keeps its own connections
        store = backend.llmgine_result_store = ResultStore(backend.client)
    store.store(key, value, expires, reply_to)


def reply_channel_of(request: Any) -> str | None:
    """The caller's reply channel a task message names, if it names a valid one."""
    channel = getattr(request, topology.HEADER_REPLY_TO, None)
    return channel if topology.is_reply_channel(channel) else None


def first_delivery(request: Any) -> bool:
    """True unless the broker marked the message as delivered before."""
    if request is None:
        return False
    delivery_info = getattr(request, "delivery_info", None) or {}
    return not delivery_info.get("redelivered")


#: the keys of the meta ``llmgine_meta`` builds (with Celery's own meta: more)
PLAIN_META_KEYS = frozenset(
    {"status", "result", "traceback", "children", "date_done", "task_id", "group_id", "parent_id"}
)


def plain_meta(data: Any) -> bool:
    """Whether ``data`` is a result meta holding only text and None (a command's).

    kombu's JSON encoder and pydantic-core's write such a meta as JSON that
    decodes to the same meta (kombu's marks datetimes, UUIDs and the like to
    decode them back; a meta holding none needs no marks): kombu's in 9 us for
    a command's, pydantic-core's in 1.5 us. An exception's meta, a task's own
    result, subtasks (``children``) or Celery's extended meta are not plain.
    """
    if not isinstance(data, dict) or not data.keys() <= PLAIN_META_KEYS:
        return False
    return not data.get("children") and all(
        value is None or isinstance(value, str) for key, value in data.items() if key != "children"
    )


class LLMgineBackendMixin:
    """What llmgine changes in Celery's Redis backend (mixed in before it)."""

    #: writes results (made on first use: the client connects lazily)
    llmgine_result_store: ResultStore | None = None
    #: whether Celery's own meta is needed (result_extended, a local time zone)
    llmgine_celery_meta: bool | None = None

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None

    def _set(self: Any, key: Any, value: Any, expires: Any = None) -> None:
        store_and_publish(self, key, value, self.expires if expires is None else expires)

    def _store_result(
        self: Any,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self.llmgine_meta(result, state, traceback, request)
        meta["task_id"] = bytes_to_str(task_id)
        # As Celery does, a stored success stands; only a redelivery can meet one.
        redelivered = not first_delivery(request)
        if redelivered and self._get_task_meta_for(task_id).get("status") == states.SUCCESS:
            return result
        try:
            self.llmgine_store(self.get_key_for_task(task_id), self.encode(meta), state, request)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        return result

    def llmgine_meta(
        self: Any, result: Any, state: str, traceback: Any, request: Any
    ) -> dict[str, Any]:
        """Celery's result meta, without its per-call settings lookup and time zone math."""
        if self.llmgine_celery_meta is None:
            extended = self.app.conf.find_value_for_key("extended", "result")
            self.llmgine_celery_meta = bool(extended) or str(self.app.timezone) != "UTC"
        if self.llmgine_celery_meta:
            meta: dict[str, Any] = self._get_result_meta(
                result=result, state=state, traceback=traceback, request=request
            )
            return meta
        meta = {
            "status": state,
            "result": result,
            "traceback": traceback,
            "children": self.current_task_children(request),
            "date_done": iso_utc(time.time()) if state in self.READY_STATES else None,
        }
        for field, meta_key in (("group", "group_id"), ("parent_id", "parent_id")):
            value = getattr(request, field, None)
            if value:
                meta[meta_key] = value
        return meta

    def _encode(self: Any, data: Any) -> tuple[str, str, Any]:
        # Celery's encode compresses what this returns, when result_compression is set.
        if self.serializer == "json" and plain_meta(data):
            try:
                return "application/json", "utf-8", to_json(data)
            except PydanticSerializationError:  # a lone surrogate, say
                pass
        encoded: tuple[str, str, Any] = super()._encode(data)  # type: ignore[misc]
        return encoded

    def llmgine_store(self: Any, key: Any, value: Any, state: str, request: Any) -> None:
        """Store and publish one task state, with Celery's expiry and retries."""
        if isinstance(value, str | bytes) and len(value) > MAX_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        expires = getattr(self, "failure_expires", None) if state == states.FAILURE else None
        expires = self.expires if expires is None else expires
        args = (self, key, value, expires, reply_channel_of(request))
        try:  # the common case without kombu's retry wrapper around it
            store_and_publish(*args)
        except self.connection_errors:
            self.ensure(store_and_publish, args)


def llmgine_redis_backend(cls: type[RedisBackend]) -> type[RedisBackend]:
    """``cls`` (Celery's Redis backend or a subclass) with llmgine's changes mixed in."""
    return type(f"LLMgine{cls.__name__}", (LLMgineBackendMixin, cls), {})
