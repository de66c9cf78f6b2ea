"""Celery's Redis result backend, minus three costs llmgine-celery does not need, plus replies.

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
  0.98x; the same code against itself measured 0.97x-1.04x per round). A
  server that refuses scripts (an ACL without ``@scripting``, a renamed or
  disabled ``EVALSHA``) gets the same two commands as a pipeline, from then
  on; so does a result without expiry.

A command sent by ``execute()`` names its caller's reply channel in a header
(``llmgine_reply_to``); its result is published there too, in the same script.
The caller then subscribes once per process rather than once per command
(``bus.waiters``). Publishing on the task's own channel stays, for anyone who
waits there (``AsyncResult.get()``, ``fetch_result`` from another process).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoPermissionError, ResponseError

from llmgine_celery.bus import topology

logger = logging.getLogger(__name__)

#: SET with expiry, then PUBLISH, of one key: KEYS[1], ARGV = value, seconds[, reply channel]
STORE_AND_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local receivers = redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[3] then
  receivers = receivers + redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return receivers
"""
#: Celery's own cap on a stored value (RedisBackend._MAX_STR_VALUE_SIZE)
MAX_VALUE_SIZE = getattr(RedisBackend, "_MAX_STR_VALUE_SIZE", 512 * 1024 * 1024)


def scripts_refused(exc: ResponseError) -> bool:
    """Whether ``exc`` says this user or server may not run the script at all."""
    return isinstance(exc, NoPermissionError) or "unknown command" in str(exc).lower()


def store_and_publish(
    backend: Any, key: Any, value: Any, expires: int | None, reply_to: str | None = None
) -> None:
    """SET ``key`` (expiring after ``expires`` seconds, if any), then PUBLISH it.

    Published on ``reply_to`` as well, when given. One script call where the
    server allows scripts; else, and for a key that never expires, the commands
    in a pipeline (no transaction).
    """
    client = backend.client
    if expires and backend.llmgine_scripts_allowed:
        script = backend.llmgine_store_script
        if script is None:  # a race makes two equal scripts: harmless
            script = backend.llmgine_store_script = client.register_script(STORE_AND_PUBLISH)
        args = [value, int(expires)] if reply_to is None else [value, int(expires), reply_to]
        try:
            script(keys=[key], args=args, client=client)
            return
        except ResponseError as exc:  # NOSCRIPT is handled by redis-py itself
            if not scripts_refused(exc):
                raise
            backend.llmgine_scripts_allowed = False
            logger.warning(
                "Redis refused the result store script (%s); "
                "storing results with SET and PUBLISH from now on",
                exc,
            )
    with client.pipeline(transaction=False) as pipe:
        pipe.set(key, value, ex=expires or None)
        pipe.publish(key, value)
        if reply_to is not None:
            pipe.publish(reply_to, value)
        pipe.execute()


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


def llmgine_redis_backend(cls: type[RedisBackend]) -> type[RedisBackend]:
    """``cls`` (Celery's Redis backend or a subclass) with the three costs removed."""

    class LLMgineRedisBackend(cls):
        def on_task_call(self, producer: Any, task_id: str) -> None:
            return None

        #: the store script, registered on first use
        llmgine_store_script: Any = None
        #: False once the server refused the script: pipelines from then on
        llmgine_scripts_allowed = True

        def _set(self, key: Any, value: Any, expires: Any = None) -> None:
            store_and_publish(self, key, value, self.expires if expires is None else expires)

        def _store_result(
            self,
            task_id: str,
            result: Any,
            state: str,
            traceback: Any = None,
            request: Any = None,
            **kwargs: Any,
        ) -> Any:
            meta = self._get_result_meta(
                result=result, state=state, traceback=traceback, request=request
            )
            meta["task_id"] = bytes_to_str(task_id)
            # As Celery does, a stored success stands; only a redelivery can meet one.
            redelivered = not first_delivery(request)
            if redelivered and self._get_task_meta_for(task_id).get("status") == states.SUCCESS:
                return result
            try:
                self.llmgine_store(
                    self.get_key_for_task(task_id), self.encode(meta), state, request
                )
            except BackendStoreError as exc:
                raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
            return result

        def llmgine_store(self, key: Any, value: Any, state: str, request: Any) -> None:
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

    LLMgineRedisBackend.__name__ = LLMgineRedisBackend.__qualname__ = f"LLMgine{cls.__name__}"
    return LLMgineRedisBackend
