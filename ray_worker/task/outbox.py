"""The outbox: HTTP completes kept and retried until their task can no longer matter.

This module owns what happens to an answer after the runner handed it over: ``complete``
admits it (waiting while the outbox is full: backpressure, never a silent drop) and returns;
a background delivery retries it with capped, jittered backoff until Bella-Queue accepts it,
the task's ``expire_time`` passes (a late complete is a no-op on the server, §2.5), or the
replica's stop runs out of drain time. Every answer given up is logged at ERROR with its task
id and counted. The outbox is bounded by entries and by bytes (the JSON size of the results).

It must not import Ray or httpx: it wraps a ``Completer`` (a ``QueueClient`` making one
attempt per call) and is one itself, so the runner uses it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_worker.bella.protocol import Task
from ray_worker.config import DispatcherConfig
from ray_worker.errors import PermanentError, QueueUnavailableError
from ray_worker.metrics import WorkerMetrics
from ray_worker.task.answers import Completer

logger = logging.getLogger(__name__)

__all__ = ["Outbox", "OutboxCounters", "OutboxEntry"]

_REMEMBERED_DEADLINES = 65_536
"""Most task deadlines kept for answers that have not come yet (oldest forgotten first)."""
_DRAIN_BACKOFF_MAX_S = 1.0
"""Longest wait between attempts while the replica stops (its drain time is short)."""


@dataclass(frozen=True)
class _Expectation:
    deadline: float
    """Wall-clock seconds after which the answer no longer matters."""
    level: int


@dataclass
class OutboxEntry:
    """One answer waiting for Bella-Queue."""

    task_id: str
    result: Mapping[str, Any]
    size: int
    """Bytes of the result as JSON (what the byte bound counts)."""
    deadline: float
    """Wall-clock seconds (``time.time()``) after which it is given up."""
    level: int | None
    """The task's level when known (the log of a give-up says what follows)."""
    attempts: int = 0
    last_error: str = ""


@dataclass
class OutboxCounters:
    """Plain counters, only ever incremented (status JSON and tests read them)."""

    admitted: int = 0
    delivered: int = 0
    retries: int = 0
    """Attempts after the first one of an answer."""
    expired: int = 0
    """Answers given up because their task's expire_time passed."""
    rejected: int = 0
    """Answers Bella-Queue refused for good (4xx): retrying cannot help."""
    undelivered_at_stop: int = 0
    """Answers still undelivered when the replica's drain time ran out."""
    backpressured: int = 0
    """Answers that had to wait for room in the outbox."""
    by_reason: dict[str, int] = field(default_factory=dict)


class Outbox:
    """A ``Completer`` that keeps every answer until Bella-Queue takes it or it stops
    mattering. Call :meth:`expect` with the task before its answer comes, so the deadline is
    the task's own ``expire_time``."""

    def __init__(
        self,
        completer: Completer,
        config: DispatcherConfig | None = None,
        *,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.completer = completer
        self.config = config or DispatcherConfig()
        self.metrics = metrics or WorkerMetrics(use_ray=False)
        self.counters = OutboxCounters()
        self._clock = clock
        self._rng = rng or random.Random()
        self._entries: dict[str, OutboxEntry] = {}
        self._admitted_at: dict[str, float] = {}
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._bytes = 0
        self._expected: OrderedDict[str, _Expectation] = OrderedDict()
        self._room = asyncio.Event()
        """Set (and replaced) whenever an answer leaves the outbox or the outbox closes."""
        self._wake = asyncio.Event()
        """Set to cut every backoff wait short (a delivery succeeded after failures, or the
        replica stops); replaced after each use."""
        self._failing = False
        self._draining = False
        self._closed = False

    # -- figures --------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        """Answers waiting (admitted, not delivered nor given up)."""
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Their size as JSON."""
        return self._bytes

    def stats(self) -> dict[str, Any]:
        """The outbox for the status JSON and the load report."""
        c = self.counters
        return {
            "outbox_entries": self.entries,
            "outbox_bytes": self._bytes,
            "outbox_max_entries": self.config.outbox_max_entries,
            "outbox_max_bytes": self.config.outbox_max_bytes,
            "outbox_oldest_age_s": self._oldest_age_s(),
            "complete_delivered": c.delivered,
            "complete_retries": c.retries,
            "complete_given_up": c.expired + c.rejected + c.undelivered_at_stop,
            "complete_expired": c.expired,
            "complete_rejected": c.rejected,
            "complete_undelivered_at_stop": c.undelivered_at_stop,
            "outbox_backpressured": c.backpressured,
        }

    def _oldest_age_s(self) -> float | None:
        if not self._admitted_at:
            return None
        return round(time.monotonic() - min(self._admitted_at.values()), 3)

    # -- the Completer --------------------------------------------------------------------

    def expect(self, task: Task) -> None:
        """Remember when ``task`` stops mattering: its ``expire_time``, or
        ``complete_max_retry_s`` from now when it has none."""
        if task.expire_time > 0:
            deadline = task.expire_time / 1000
        else:
            deadline = self._clock() + self.config.complete_max_retry_s
        self._expected[task.task_id] = _Expectation(deadline, int(task.level))
        self._expected.move_to_end(task.task_id)
        while len(self._expected) > _REMEMBERED_DEADLINES:
            self._expected.popitem(last=False)

    async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
        """Admit ``result`` for delivery and return; wait while the outbox is full.

        Raises ``QueueUnavailableError`` when the answer could not even be admitted: its task
        expired while it waited for room, or the replica stopped meanwhile (logged and
        counted either way). An answer already waiting for ``task_id`` is replaced.
        """
        expected = self._expected.pop(task_id, None)
        deadline = (
            expected.deadline
            if expected is not None
            else self._clock() + self.config.complete_max_retry_s
        )
        level = None if expected is None else expected.level
        body = dict(result)
        size = len(json.dumps(body, separators=(",", ":"), default=str).encode())
        entry = OutboxEntry(task_id, body, size, deadline, level)
        await self._admit(entry)
        previous = self._jobs.pop(task_id, None)
        if previous is not None:
            previous.cancel()
            self._drop(task_id)
        self._entries[task_id] = entry
        self._admitted_at[task_id] = time.monotonic()
        self._bytes += size
        self.counters.admitted += 1
        self._gauges()
        job = asyncio.get_running_loop().create_task(
            self._deliver(entry), name=f"complete-{task_id}"
        )
        self._jobs[task_id] = job
        job.add_done_callback(lambda j: self._finished(task_id, j))

    def _fits(self, size: int) -> bool:
        if not self._entries:
            return True  # one answer larger than the byte bound still goes, alone
        cfg = self.config
        if len(self._entries) >= cfg.outbox_max_entries:
            return False
        return self._bytes + size <= cfg.outbox_max_bytes

    async def _admit(self, entry: OutboxEntry) -> None:
        if self._fits(entry.size) and not self._closed:
            return
        self.counters.backpressured += 1
        self.metrics.inc("outbox_backpressure")
        logger.warning(
            "the outbox is full (%d answers, %d bytes): the answer waits for room",
            len(self._entries),
            self._bytes,
            extra={"task_id": entry.task_id},
        )
        while not self._closed and not self._fits(entry.size):
            left = entry.deadline - self._clock()
            if left <= 0:
                break
            room = self._room
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room.wait(), min(left, 60.0))
        if self._closed:
            self._give_up(entry, "undelivered_at_stop", "the replica stopped")
            raise QueueUnavailableError("the replica stopped before the answer could be sent")
        if not self._fits(entry.size):
            self._give_up(entry, "expired", "the outbox stayed full")
            raise QueueUnavailableError("the task expired while its answer waited for room")

    # -- delivery -------------------------------------------------------------------------

    def _backoff_s(self, retry: int) -> float:
        cfg = self.config
        cap = cfg.complete_backoff_max_s
        if self._draining:
            cap = min(cap, _DRAIN_BACKOFF_MAX_S)
        base = min(cap, cfg.complete_backoff_initial_s * 2.0 ** max(0, retry - 1))
        # Full jitter in the upper half: answers of one outage do not retry in lock step.
        return base * self._rng.uniform(0.5, 1.0)

    async def _deliver(self, entry: OutboxEntry) -> None:
        while True:
            if self._clock() >= entry.deadline:
                self._give_up(entry, "expired", entry.last_error or "the task expired")
                return
            if entry.attempts:
                self.counters.retries += 1
                self.metrics.inc("complete_retries")
            entry.attempts += 1
            try:
                await self.completer.complete(entry.task_id, entry.result)
            except PermanentError as err:
                self._give_up(entry, "rejected", str(err))
                return
            except Exception as err:
                entry.last_error = f"{type(err).__name__}: {err}"
                self._failing = True
            else:
                self.counters.delivered += 1
                if entry.attempts > 1:
                    logger.info(
                        "complete of %s delivered after %d attempts",
                        entry.task_id,
                        entry.attempts,
                        extra={"task_id": entry.task_id, "attempt": entry.attempts},
                    )
                if self._failing:
                    # Bella-Queue is back: the others need not wait out their backoff.
                    self._failing = False
                    self._wake_all()
                return
            delay_s = min(self._backoff_s(entry.attempts), max(0.0, entry.deadline - self._clock()))
            # One warning per answer, then one every tenth attempt: an outage must not flood.
            loud = entry.attempts == 1 or entry.attempts % 10 == 0
            log = logger.warning if loud else logger.debug
            log(
                "complete of %s failed (attempt %d): %s; retrying in %.2f s",
                entry.task_id,
                entry.attempts,
                entry.last_error,
                delay_s,
                extra={"task_id": entry.task_id, "attempt": entry.attempts},
            )
            wake = self._wake
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay_s)

    def _wake_all(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def _give_up(self, entry: OutboxEntry, reason: str, detail: str) -> None:
        if reason == "expired":
            self.counters.expired += 1
        elif reason == "rejected":
            self.counters.rejected += 1
        else:
            self.counters.undelivered_at_stop += 1
        self.counters.by_reason[reason] = self.counters.by_reason.get(reason, 0) + 1
        self.metrics.inc("complete_given_up", reason=reason)
        if entry.level == 1:
            follows = (
                "a level-1 task: the server redelivers it after its process_timeout when the "
                "take set one, otherwise it stays unanswered"
            )
        elif entry.level == 0:
            follows = "a level-0 task: the server never redelivers it, this answer is lost"
        else:
            follows = "level unknown"
        logger.error(
            "complete of %s given up (%s) after %d attempts: %s; %s",
            entry.task_id,
            reason,
            entry.attempts,
            detail,
            follows,
            extra={"task_id": entry.task_id, "attempt": entry.attempts},
        )

    def _drop(self, task_id: str) -> None:
        entry = self._entries.pop(task_id, None)
        self._admitted_at.pop(task_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def _finished(self, task_id: str, job: asyncio.Task[None]) -> None:
        if self._jobs.get(task_id) is job:
            del self._jobs[task_id]
            self._drop(task_id)
        if not job.cancelled() and job.exception() is not None:
            logger.error(
                "complete delivery crashed", exc_info=job.exception(), extra={"task_id": task_id}
            )
        self._gauges()
        self._signal_room()

    def _signal_room(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    def _gauges(self) -> None:
        self.metrics.set("outbox_entries", float(len(self._entries)))
        self.metrics.set("outbox_bytes", float(self._bytes))

    # -- stop -----------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Deliver what is waiting within ``timeout_s`` (backoff capped short meanwhile);
        give up the rest, each logged at ERROR with its task id. Returns how many were
        given up."""
        self._draining = True
        self._wake_all()
        jobs = list(self._jobs.values())
        pending: set[asyncio.Task[None]] = set()
        if jobs:
            _, pending = await asyncio.wait(jobs, timeout=max(0.0, timeout_s))
        self._closed = True
        self._signal_room()
        left = 0
        for job in pending:
            task_id = job.get_name().removeprefix("complete-")
            entry = self._entries.get(task_id)
            job.cancel()
            if entry is not None:
                left += 1
                self._give_up(
                    entry,
                    "undelivered_at_stop",
                    f"the replica's drain time ran out ({entry.last_error or 'no answer yet'})",
                )
        if pending:
            await asyncio.wait(pending, timeout=5)
        return left
