"""A value refreshed at most once per ``max_age_s`` however many callers ask, for status pages.

This module owns :class:`StatusCache`: the poller's ``GET /bella`` is served from one, so that
any number of callers (the port answers anyone who reaches it) costs at most one status build,
and one fan-out to the publisher actor, per second. Concurrent callers share one refresh; at
most ``max_waiting`` of them wait for it, the others get the last value at once (or ``None``
before the first refresh finished: the caller answers 503). It must not know what it caches,
and it imports no Ray.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["StatusCache"]

T = TypeVar("T")


class StatusCache(Generic[T]):
    """The last result of ``refresh``, recomputed at most once per ``max_age_s``.

    A refresh starts when a caller finds the last one started ``max_age_s`` ago or more and
    none is running, so refreshes never overlap and start at least ``max_age_s`` apart. It
    runs as a task of its own: a caller that goes away (a closed connection) does not cancel
    it for the others. A failed refresh keeps the previous value; its error reaches the
    callers that waited for it, and, until the next refresh may start, callers that find no
    value.
    """

    def __init__(
        self,
        refresh: Callable[[], Awaitable[T]],
        *,
        max_age_s: float = 1.0,
        max_waiting: int | None = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refresh = refresh
        self.max_age_s = max_age_s
        self.max_waiting = max_waiting
        """Most callers waiting for one refresh; None: no bound."""
        self._clock = clock
        self._value: T | None = None
        self._has_value = False
        self._error: BaseException | None = None
        self._started_at = -math.inf
        self._task: asyncio.Task[T] | None = None
        self._waiting = 0
        self.refreshes = 0
        """Refreshes started."""
        self.shed = 0
        """Callers that did not wait for a running refresh (too many waited already)."""

    async def get(self) -> T | None:
        """The value, refreshed if it is ``max_age_s`` old; ``None`` only while too many
        callers wait for the first refresh (nothing to hand out yet)."""
        if self._task is None:
            if self._clock() - self._started_at < self.max_age_s:
                if self._has_value:
                    return self._value
                if self._error is not None:
                    raise self._error
            self._start()
        task = self._task
        assert task is not None
        if self.max_waiting is not None and self._waiting >= self.max_waiting:
            self.shed += 1
            return self._value if self._has_value else None
        self._waiting += 1
        try:
            # shield: a caller cancelled while waiting leaves the refresh to the others.
            return await asyncio.shield(task)
        finally:
            self._waiting -= 1

    def _start(self) -> None:
        self._started_at = self._clock()
        self.refreshes += 1
        task = asyncio.get_running_loop().create_task(self._run(), name="status-refresh")
        # Retrieved here so that a failure nobody waited for is not logged as lost.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._task = task

    async def _run(self) -> T:
        try:
            value = await self._refresh()
        except Exception as exc:
            self._error = exc
            raise
        else:
            self._value, self._has_value, self._error = value, True, None
            return value
        finally:
            self._task = None
