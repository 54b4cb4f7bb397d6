"""Cancellation reaching the engine: a replica's watch over its long offline tasks.

Bella-Queue never tells a worker that a task it holds was cancelled (§1.6): cancel only sets an
offline task's status to ``cancelled`` (``GET /v1/queue/{id}``, §1.7), and a batch's cancel only
flags the batch (``GET /v1/batches/{id}`` says ``cancelling``/``cancelled``, §7), whose later
completes write no output. So every ``interval_s`` this watch looks at the replica's level-1
offline tasks that have run at least that long, asks about them (one request per batch for
batch tasks, one per task for the others; at most ``max_requests`` per round, the least
recently checked first, a few at a time) and has the runner abort the cancelled ones: the
engine request ends, the slot is free, no answer goes out.

It must not import Ray or httpx (the status source is a ``StatusSource``). A failed check
(Bella-Queue away, a 500) never ends a task: only an explicit cancelled status does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ray_worker.bella.protocol import Batch, Task
from ray_worker.metrics import WorkerMetrics
from ray_worker.task.runner import TaskRunner

logger = logging.getLogger(__name__)

__all__ = ["BATCH_CANCELLED_STATUSES", "TASK_CANCELLED_STATUS", "CancelWatch", "StatusSource"]

TASK_CANCELLED_STATUS = "cancelled"
"""An offline task's status once its producer cancelled it (§2.4)."""
BATCH_CANCELLED_STATUSES = frozenset({"cancelling", "cancelled"})
"""Batch statuses after ``POST /v1/batches/{id}/cancel``: its answers are written nowhere."""

_CONCURRENCY = 4
"""Status requests in flight at once (the round's requests are few; no burst)."""


class StatusSource(Protocol):
    """Where the watch reads statuses: the replica's ``QueueClient``."""

    async def get_task(self, task_id: str) -> Task:
        """``GET /v1/queue/{task_id}`` (offline tasks)."""
        ...

    async def get_batch(self, batch_id: str) -> Batch:
        """``GET /v1/batches/{batch_id}``."""
        ...


@dataclass
class _Unit:
    """One status request: a batch (all its running tasks) or one task."""

    key: str
    batch_id: str
    tasks: list[Task] = field(default_factory=list)
    age_s: float = 0.0


class CancelWatch:
    """Checks a replica's long offline tasks for cancellation and aborts the cancelled ones."""

    def __init__(
        self,
        runner: TaskRunner,
        source: StatusSource,
        *,
        interval_s: float,
        max_requests: int,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive (0 means: do not start a watch)")
        self.runner = runner
        self.source = source
        self.interval_s = interval_s
        self.max_requests = max_requests
        self.metrics = metrics or runner.metrics
        self.clock = clock
        self._checked: dict[str, float] = {}
        """When each batch id or task id was last asked about (monotonic seconds)."""
        self.aborted = 0
        """Tasks this watch aborted."""

    async def run(self) -> None:
        """Check every ``interval_s`` until cancelled; a failing round is logged, never fatal."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:
                logger.exception("cancellation check failed; trying again next round")

    def _units(self) -> list[_Unit]:
        units: dict[str, _Unit] = {}
        for task, age_s in self.runner.offline_running():
            if age_s < self.interval_s:
                continue
            key = f"batch:{task.batch_id}" if task.batch_id else f"task:{task.task_id}"
            unit = units.setdefault(key, _Unit(key, task.batch_id or ""))
            unit.tasks.append(task)
            unit.age_s = max(unit.age_s, age_s)
        # Forget what no longer runs, so the memory stays bounded by what runs.
        self._checked = {k: v for k, v in self._checked.items() if k in units}
        # Never checked first, then the least recently checked; the oldest among equals.
        return sorted(units.values(), key=lambda u: (self._checked.get(u.key, -1.0), -u.age_s))

    async def check_once(self) -> int:
        """One round: ask about up to ``max_requests`` batches/tasks; return how many tasks
        were aborted."""
        units = self._units()[: self.max_requests]
        if not units:
            return 0
        gate = asyncio.Semaphore(_CONCURRENCY)
        now = self.clock()
        for unit in units:
            self._checked[unit.key] = now

        async def check(unit: _Unit) -> int:
            async with gate:
                return await self._check(unit)

        aborted = sum(await asyncio.gather(*(check(u) for u in units)))
        self.aborted += aborted
        return aborted

    async def _check(self, unit: _Unit) -> int:
        kind = "batch" if unit.batch_id else "task"
        try:
            if unit.batch_id:
                batch = await self.source.get_batch(unit.batch_id)
                cancelled = batch.status in BATCH_CANCELLED_STATUSES
                reason = f"batch {unit.batch_id} is {batch.status}"
            else:
                task = await self.source.get_task(unit.tasks[0].task_id)
                cancelled = task.status == TASK_CANCELLED_STATUS
                reason = "the task was cancelled"
        except Exception as err:
            # Not knowing is not cancelled: the task runs on.
            self.metrics.inc("cancel_checks", kind=kind, result="error")
            logger.warning(
                "cancellation check of %s failed (the task runs on): %s",
                unit.batch_id or unit.tasks[0].task_id,
                err,
                extra=_context(unit),
            )
            return 0
        self.metrics.inc("cancel_checks", kind=kind, result="cancelled" if cancelled else "ok")
        if not cancelled:
            return 0
        aborted = 0
        for task in unit.tasks:
            aborted += int(self.runner.abort(task.task_id, reason))
        return aborted


def _context(unit: _Unit) -> dict[str, Any]:
    first = unit.tasks[0]
    return {"task_id": first.task_id, "batch_id": unit.batch_id, "queue": first.full_queue}
