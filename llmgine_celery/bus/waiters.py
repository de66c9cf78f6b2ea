"""Waiting for command results without blocking the event loop.

On a Redis result backend one pub/sub connection per event loop serves every
pending call. Commands this loop sends with ``execute`` name its reply channel
(``reply_to``), and the worker publishes their results there: the waiter
subscribes to it once, not once per command. For a command sent elsewhere
(``fetch_result``) ``expect`` queues a SUBSCRIBE to the task's own channel
(sent in one batch per loop iteration).

Either way the command can be sent at once: when Redis confirms a subscription
the waiter reads the stored keys it covers (one MGET per batch), which catches
a result published before the subscription took hold. Other backends are
polled with growing sleeps (the embedded file store).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any, Protocol

import redis.asyncio as aioredis

from llmgine_celery.bus import topology
from llmgine_celery.bus.results import READY_STATES
from llmgine_celery.observability.process import current_pid

logger = logging.getLogger(__name__)

Meta = dict[str, Any]

#: a standing subscription keeps the connection in pub/sub mode between calls
_IDLE_CHANNEL = b"llmgine.results.idle"
#: what the names of a waiter's connections in Redis' CLIENT LIST start with
CLIENT_NAME = "llmgine.results"
#: seconds after which a call waiting on replies also reads its key, and how often:
#: a result whose publish it missed (a worker that ignores the reply header, a
#: dropped pub/sub connection) still arrives, within two intervals
SWEEP_INTERVAL = 1.0


def client_name(pid: int | None = None) -> str:
    """The name of this process's (or ``pid``'s) waiter connections: ``llmgine.results.<pid>``.

    An operator reading ``CLIENT LIST`` sees which process holds them.
    """
    return f"{CLIENT_NAME}.{current_pid() if pid is None else pid}"


class ResultWaiter(Protocol):
    """Waits for the stored state of tasks, by task id."""

    #: the channel a worker publishes results to for this waiter (None: no replies)
    reply_to: str | None

    def expect(self, task_id: str, *, replied: bool = False) -> None:
        """Get ready to receive ``task_id``'s result; call before sending it.

        ``replied``: the command names ``reply_to``, so no subscription of its own.
        """

    def fail(self, task_id: str, error: BaseException) -> None:
        """Make the wait for ``task_id`` raise ``error`` (its send failed)."""

    async def wait(self, task_id: str, timeout: float) -> Meta | None:
        """The task's ready state, or None when ``timeout`` expires first."""

    async def aclose(self) -> None:
        """Release connections."""


class CeleryBackend(Protocol):
    """The parts of a Celery result backend the waiters use."""

    def get_key_for_task(self, task_id: str) -> bytes: ...

    def decode(self, payload: Any) -> Any: ...

    def get_task_meta(self, task_id: str) -> Meta: ...


class _Batch:
    """Keys gathered for one command, flushed by one callback.

    With no delay the batch is flushed at the end of the current loop
    iteration; with a delay, after that many seconds or once it holds
    ``limit`` keys, whichever comes first.
    """

    def __init__(self, flush: Any, delay: float = 0.0, limit: int = 1024) -> None:
        self.keys: list[bytes] = []
        self._flush = flush
        self._delay = delay
        self._limit = limit
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None

    def add(self, key: bytes) -> None:
        self.keys.append(key)
        loop = asyncio.get_running_loop()
        if len(self.keys) >= self._limit:
            self._run()
        elif self._timer is None:
            if self._delay:
                self._timer = loop.call_later(self._delay, self._run)
            else:
                self._timer = loop.call_soon(self._run)

    def _run(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keys, self.keys = self.keys, []
        if keys:
            self._flush(keys)


class RedisResultWaiter:
    """Every pending result of one event loop, over one pub/sub connection."""

    def __init__(self, url: str, backend: CeleryBackend) -> None:
        self._backend = backend
        self._client: aioredis.Redis = aioredis.Redis.from_url(url, client_name=client_name())
        self._pubsub = self._client.pubsub()
        self._pending: dict[bytes, asyncio.Future[Meta]] = {}
        self.reply_to: str | None = topology.reply_channel(uuid.uuid4().hex)
        self._reply = self.reply_to.encode()
        #: pending keys whose results come on the reply channel, and since when
        self._replied: dict[bytes, float] = {}
        #: the reply channel's SUBSCRIBE was queued (its confirmation reads the stored keys)
        self._reply_asked = False
        self._subscribe = _Batch(self._flush_subscribe)
        # Nothing more is published on a channel once its result came, so
        # unsubscribing can wait and go out in large batches.
        self._unsubscribe = _Batch(self._flush_unsubscribe, delay=0.05)
        self._confirmed = _Batch(self._flush_confirmed)
        self._reader: asyncio.Task[None] | None = None
        #: reads the keys of calls waiting on replies for longer than SWEEP_INTERVAL
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def expect(self, task_id: str, *, replied: bool = False) -> None:
        key = self._backend.get_key_for_task(task_id)
        if key in self._pending:
            return
        self._pending[key] = asyncio.get_running_loop().create_future()
        if not replied:
            self._subscribe.add(key)
            return
        self._replied[key] = time.monotonic()
        if not self._reply_asked:  # its confirmation reads what was stored meanwhile
            self._reply_asked = True
            self._subscribe.add(self._reply)
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def fail(self, task_id: str, error: BaseException) -> None:
        future = self._pending.get(self._backend.get_key_for_task(task_id))
        if future is not None and not future.done():
            future.set_exception(error)

    async def wait(self, task_id: str, timeout: float) -> Meta | None:
        key = self._backend.get_key_for_task(task_id)
        if key not in self._pending:
            self.expect(task_id)
        future = self._pending[key]
        timer = asyncio.get_running_loop().call_later(timeout, _expire, future)
        try:
            return await future
        except TimeoutError:
            return None
        finally:
            timer.cancel()
            self._forget(key)

    async def aclose(self) -> None:
        self._closed = True
        # Until none is left: one may start another before it sees the flag.
        while tasks := [*self._background, *(t for t in (self._reader, self._sweeper) if t)]:
            self._reader = self._sweeper = None
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._background.difference_update(tasks)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        await self._client.aclose()

    # -- batches -------------------------------------------------------------

    def _flush_subscribe(self, keys: list[bytes]) -> None:
        keys = [k for k in keys if k in self._pending or k == self._reply]
        if keys and not self._closed:
            self._spawn(self._send_subscribe(keys))

    async def _send_subscribe(self, keys: list[bytes]) -> None:
        try:
            if self._reader is None:
                await self._pubsub.subscribe(_IDLE_CHANNEL, *keys)
                if self._closed:  # closed meanwhile: no reader to outlive it
                    return
                self._reader = asyncio.get_running_loop().create_task(self._read())
            else:
                await self._pubsub.subscribe(*keys)
        except Exception as exc:
            logger.exception("subscribing to %d result channels failed", len(keys))
            if self._reply in keys:  # every call waiting on replies fails; the next one retries
                self._reply_asked = False
                keys = [*keys, *self._replied]
            for key in keys:
                future = self._pending.get(key)
                if future is not None and not future.done():
                    future.set_exception(exc)

    def _flush_confirmed(self, keys: list[bytes]) -> None:
        keys = [k for k in keys if k in self._pending]
        if keys and not self._closed:
            self._spawn(self._check_stored(keys))

    async def _check_stored(self, keys: list[bytes]) -> None:
        try:
            values = await self._client.mget(keys)
        except Exception:
            logger.exception("reading %d stored results failed", len(keys))
            return
        for key, value in zip(keys, values, strict=True):
            self._resolve(key, value)

    def _flush_unsubscribe(self, keys: list[bytes]) -> None:
        keys = [k for k in keys if k not in self._pending]
        if keys and not self._closed:
            self._spawn(self._send_unsubscribe(keys))

    async def _send_unsubscribe(self, keys: list[bytes]) -> None:
        try:
            await self._pubsub.unsubscribe(*keys)
        except Exception:
            logger.exception("unsubscribing from %d result channels failed", len(keys))

    # -- reading -------------------------------------------------------------

    async def _read(self) -> None:
        while not self._closed:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._closed:  # its connection was closed under it
                    return
                logger.exception("result subscription failed; resubscribing")
                await asyncio.sleep(0.1)
                own = [k for k in self._pending if k not in self._replied]
                reply = [self._reply] if self._reply_asked else []
                with contextlib.suppress(Exception):
                    await self._pubsub.subscribe(_IDLE_CHANNEL, *reply, *own)
                continue
            if message is not None:
                self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        kind = message["type"]
        if kind == "message":
            if channel == self._reply:
                self._resolve_reply(message["data"])
            else:
                self._resolve(channel, message["data"])
        elif kind == "subscribe":
            if channel == self._reply:
                for key in self._replied:  # sent before the subscription held
                    self._confirmed.add(key)
            elif channel in self._pending:
                self._confirmed.add(channel)

    def _resolve(self, key: bytes, payload: Any) -> None:
        future = self._pending.get(key)
        if future is None or future.done() or payload is None:
            return
        self._settle(future, decode_meta(self._backend, payload))

    def _resolve_reply(self, payload: Any) -> None:
        meta = decode_meta(self._backend, payload)
        task_id = meta.get("task_id") if isinstance(meta, dict) else None
        if isinstance(task_id, str):
            future = self._pending.get(self._backend.get_key_for_task(task_id))
            if future is not None and not future.done():
                self._settle(future, meta)

    @staticmethod
    def _settle(future: asyncio.Future[Meta], meta: Any) -> None:
        if isinstance(meta, dict) and meta.get("status") in READY_STATES:
            future.set_result(meta)

    def _forget(self, key: bytes) -> None:
        if self._pending.pop(key, None) is None:
            return
        if self._replied.pop(key, None) is not None:
            return  # nothing of its own to unsubscribe from
        self._unsubscribe.add(key)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            due = time.monotonic() - SWEEP_INTERVAL
            for key in [k for k, since in self._replied.items() if since <= due]:
                self._confirmed.add(key)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._background.discard)


def decode_meta(backend: CeleryBackend, payload: Any) -> Any:
    """A stored task state; plain JSON is read without kombu's per-object hook.

    kombu's decoder calls a Python hook for every JSON object, to restore the
    types it marks (``__type__``); a meta with no mark (a command's result is
    text) reads the same without it. Anything else, a compressed payload
    among them, goes through the backend.
    """
    if isinstance(payload, bytes) and payload[:1] == b"{" and b'"__type__"' not in payload:
        return json.loads(payload)
    return backend.decode(payload)


def _expire(future: asyncio.Future[Meta]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class PollingResultWaiter:
    """Polls a backend with growing sleeps; for backends without push."""

    reply_to: str | None = None

    def __init__(self, backend: CeleryBackend, max_interval: float = 0.1) -> None:
        self._backend = backend
        self._max_interval = max_interval
        self._failed: dict[str, BaseException] = {}

    def expect(self, task_id: str, *, replied: bool = False) -> None:
        return None

    def fail(self, task_id: str, error: BaseException) -> None:
        self._failed[task_id] = error

    async def wait(self, task_id: str, timeout: float) -> Meta | None:
        deadline = time.monotonic() + timeout
        interval = 0.002
        while True:
            error = self._failed.pop(task_id, None)
            if error is not None:
                raise error
            meta = self._backend.get_task_meta(task_id)
            if meta.get("status") in READY_STATES:
                return meta
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 1.5, self._max_interval)

    async def aclose(self) -> None:
        return None
