"""Storing and publishing a task's result in Redis: one script call, on the thread's own connection.

A result is a SET with expiry and a PUBLISH (two, when the message names a reply
channel), run as one Lua script (``EVALSHA``). Through a redis-py client each
call also takes a connection from the pool, checks that it has nothing unread
(a ``poll`` system call) and gives it back; a worker thread here keeps a
connection of its own instead and sends the command on it directly. A broken
connection is dropped, and the next call opens a new one.

A server that refuses scripts (an ACL without ``@scripting``, a renamed or
disabled ``EVALSHA``) gets the same commands as a pipeline, from then on; so
does a result without expiry.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

import redis
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

from llmgine_celery.observability.process import current_pid

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
STORE_AND_PUBLISH_SHA = hashlib.sha1(STORE_AND_PUBLISH.encode()).hexdigest()


def scripts_refused(exc: ResponseError) -> bool:
    """Whether ``exc`` says this user or server may not run the script at all."""
    return isinstance(exc, NoPermissionError) or "unknown command" in str(exc).lower()


class ResultStore:
    """Writes the results of one Redis client: SET, PUBLISH (and PUBLISH to a reply channel)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        pool = getattr(client, "connection_pool", None)
        # a plain (or Sentinel) pool makes connections on request; anything else
        # (a cluster client, a test double) is used through its own client
        self._pool = pool if isinstance(pool, redis.ConnectionPool) else None
        self._local = threading.local()
        #: False once the server refused the script: pipelines from then on
        self.scripts_allowed = True

    def store(self, key: Any, value: Any, expires: int | None, reply_to: str | None = None) -> None:
        """SET ``key`` (expiring after ``expires`` seconds, if any), then PUBLISH it.

        Published on ``reply_to`` as well, when given.
        """
        if expires and self.scripts_allowed:
            args = (
                (key, value, int(expires))
                if reply_to is None
                else (key, value, int(expires), reply_to)
            )
            try:
                self._run_script(args)
                return
            except ResponseError as exc:
                if not scripts_refused(exc):
                    raise
                self.scripts_allowed = False
                logger.warning(
                    "Redis refused the result store script (%s); "
                    "storing results with SET and PUBLISH from now on",
                    exc,
                )
        with self._client.pipeline(transaction=False) as pipe:
            pipe.set(key, value, ex=expires or None)
            pipe.publish(key, value)
            if reply_to is not None:
                pipe.publish(reply_to, value)
            pipe.execute()

    def _run_script(self, args: tuple[Any, ...]) -> None:
        try:
            self._call("EVALSHA", STORE_AND_PUBLISH_SHA, 1, *args)
        except NoScriptError:  # a new or flushed server: load it, once
            self._call("SCRIPT", "LOAD", STORE_AND_PUBLISH)
            self._call("EVALSHA", STORE_AND_PUBLISH_SHA, 1, *args)

    def _call(self, *command: Any) -> Any:
        if self._pool is None:
            return self._client.execute_command(*command)
        connection = self._connection()
        try:
            connection.send_command(*command)
            return connection.read_response()
        except ResponseError:  # the server answered: the connection is fine
            raise
        except BaseException:  # a half-done exchange leaves it unusable
            connection.disconnect()
            raise

    def _connection(self) -> Any:
        local = self._local
        pid = current_pid()
        if getattr(local, "pid", None) != pid:  # this thread's first call, or a forked child's
            assert self._pool is not None
            local.connection = self._pool.make_connection()
            local.pid = pid
        return local.connection
