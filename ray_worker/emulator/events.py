"""The emulator's event-bus reader: worker events for this instance's online waiters (§4.3).

This module owns one background task that runs a plain ``XREAD`` (no consumer group) on
``<topic><instance_id>`` from "now", decodes each entry with :func:`protocol.decode_event`
and hands it to the waiter registered for its task id. A completion removes the waiter, so
later progress events of that task are dropped. Undecodable entries are logged and skipped;
Redis outages are logged and retried, so the reader never dies while the emulator runs.

It must not answer HTTP requests or touch the queues: the put handlers own their waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from ray_worker.bella.protocol import CompletionEvent, ProgressEvent, decode_event, now_ms

logger = logging.getLogger(__name__)

__all__ = ["EventBusReader", "StreamEvent"]

StreamEvent = ProgressEvent | CompletionEvent

_MAINTENANCE_EVERY_MS = 2000
_STREAM_TTL_S = 86400
_TRIM_WINDOW_MS = 10 * 60 * 1000


_STOP_TIMEOUT_S = 1.0
"""Longest a stop waits for Redis to delete the private stream and close the client."""


class EventBusReader:
    """Reads ``stream`` and dispatches events to per-task queues."""

    def __init__(self, redis_url: str, stream: str, *, block_ms: int = 1000) -> None:
        self.redis_url = redis_url
        self.stream = stream
        self.block_ms = block_ms
        self._waiters: dict[str, asyncio.Queue[StreamEvent]] = {}
        self._task: asyncio.Task[None] | None = None
        self._client: Redis | None = None
        self._last_maintenance_ms = 0
        self.last_id = "0-0"
        self.started = asyncio.Event()

    def register(self, task_id: str) -> asyncio.Queue[StreamEvent]:
        """Start waiting for ``task_id``'s events; call before the task is enqueued."""
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._waiters[task_id] = queue
        return queue

    def unregister(self, task_id: str) -> None:
        """Stop waiting for ``task_id`` (after its completion, timeout or disconnect)."""
        self._waiters.pop(task_id, None)

    @property
    def waiting(self) -> int:
        """How many online puts are waiting on this instance."""
        return len(self._waiters)

    async def start(self) -> None:
        """Start reading from "now"."""
        self.last_id = f"{now_ms()}-0"
        self._client = Redis.from_url(
            self.redis_url,
            decode_responses=True,
            socket_timeout=self.block_ms / 1000 + 5,
            socket_connect_timeout=2,
        )
        self._task = asyncio.create_task(self._run(), name=f"event-bus-reader {self.stream}")

    async def stop(self, *, delete_stream: bool = True) -> None:
        """Stop the reader; a graceful shutdown deletes the private stream as the server does."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            # Bounded: a connection the cancelled XREAD left mid-reply could hold the delete
            # (and so the server's shutdown) until the socket timeout.
            if delete_stream:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.delete(self.stream), _STOP_TIMEOUT_S)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), _STOP_TIMEOUT_S)

    async def _run(self) -> None:
        assert self._client is not None
        client = self._client
        backoff_s = 0.05
        failing = False
        self.started.set()
        while True:
            try:
                response = await client.xread(
                    {self.stream: self.last_id}, count=1000, block=self.block_ms
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    logger.warning("event-bus reader: Redis unavailable (%s); retrying", exc)
                    failing = True
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
                continue
            if failing:
                logger.info("event-bus reader: Redis is back")
                failing = False
            backoff_s = 0.05
            streams: list[Any] = list(response or [])
            for _stream, entries in streams:
                for entry_id, fields in entries:
                    self.last_id = str(entry_id)
                    self._dispatch(self.last_id, fields)
            await self._maintain(client)

    def _dispatch(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            event = decode_event(fields)
        except (ValueError, ValidationError) as exc:
            logger.warning("skipping undecodable event %s on %s: %s", entry_id, self.stream, exc)
            return
        if event is None:
            logger.debug("ignoring event %s with unknown name", entry_id)
            return
        if isinstance(event, CompletionEvent):
            waiter = self._waiters.pop(event.task_id, None)
        else:
            waiter = self._waiters.get(event.task_id)
        if waiter is None:
            logger.debug("no waiter for %s event of task %s", event.name, event.task_id)
            return
        waiter.put_nowait(event)

    async def _maintain(self, client: Redis) -> None:
        """``EXPIRE`` the stream and trim entries older than 10 min, at most every 2 s."""
        now = now_ms()
        if now - self._last_maintenance_ms < _MAINTENANCE_EVERY_MS:
            return
        self._last_maintenance_ms = now
        try:
            if await client.exists(self.stream):
                await client.expire(self.stream, _STREAM_TTL_S)
                await client.xtrim(self.stream, minid=now - _TRIM_WINDOW_MS, approximate=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("event-bus maintenance failed: %s", exc)
