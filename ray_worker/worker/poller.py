"""The take loop: pulls only what fits from Bella-Queue and hands tasks to the dispatcher.

This module owns ``POST /v1/queue/take`` pacing. Queues are grouped by the deployment whose
capacity they draw on (a *pool*); each pool runs one loop:

- ``size = min(max_take_size, remaining_capacity)``; a task taken counts as its ``n``
  (``Dispatcher.fan_out``), so a take of fanned-out tasks may overshoot once; level-1 queues
  are taken only while capacity above the online reserve is left, so level-0 work is never
  starved;
- re-poll at once while tasks flow; after an empty take wait 5 ms, 10 ms, ... up to
  ``idle_backoff_max_s`` (with jitter), so an idle worker picks a new task up within tens
  of milliseconds; after a failed take back off exponentially up to ``error_backoff_max_s``;
- with no capacity, wait until a task finishes or a replica reports more room.

It must not run tasks (the dispatcher does) nor talk to Ray: ``QueuePoller`` in
``ray_worker.serve.poller_host`` is the thin Serve deployment around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ray_worker.aio import SPREAD, Backoff
from ray_worker.bella.protocol import FIFO_TAKE_CAP, Level, TakeRequest, TakeResponse, TakeStrategy
from ray_worker.config import PollerConfig, QueueSpec
from ray_worker.errors import AuthenticationError, WorkerError
from ray_worker.metrics import WorkerMetrics
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

__all__ = ["Poller", "Pool", "Taker"]


class Taker(Protocol):
    """Bella-Queue's take (a ``QueueClient``).

    A taker with ``timeout_s`` and ``connect_timeout_s`` attributes (a ``QueueClient``) bounds
    a take by them; otherwise ``PollerConfig.take_timeout_s`` stands for both.
    """

    async def take(self, request: TakeRequest) -> TakeResponse:
        """``POST /v1/queue/take``."""
        ...


@dataclass
class Pool:
    """The queues that draw on one model deployment's capacity, and the loop's state."""

    model_id: str
    online: list[str]
    offline: list[str]
    state: str = "starting"
    takes: int = 0
    tasks_taken: int = 0
    full_takes: int = 0
    empty_takes: int = 0
    failed_takes: int = 0
    last_take_at: float | None = None
    last_take_size: int = 0
    last_take_count: int = 0
    backoff_s: float = 0.0
    last_error: str | None = None
    errors_in_a_row: int = 0
    probe_at_zero: bool = False
    """Take one task while no replica runs, so the deployment can scale up from zero."""
    saturated: bool = False
    """A take came back full, and no take of all the pool's queues came back short since:
    the queues likely hold more. (An empty take of the online queues alone, made while
    offline is at capacity, says nothing of the offline queues.)"""
    backlog: int = 0
    """Estimated tasks waiting in Bella-Queue that current replicas cannot absorb."""
    stats_checked_at: float = 0.0

    def status(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "model": self.model_id,
            "queues": self.online + self.offline,
            "state": self.state,
            "takes": self.takes,
            "tasks_taken": self.tasks_taken,
            "full_takes": self.full_takes,
            "empty_takes": self.empty_takes,
            "failed_takes": self.failed_takes,
            "last_take_age_s": None
            if self.last_take_at is None
            else round(time.monotonic() - self.last_take_at, 3),
            "last_take_size": self.last_take_size,
            "last_take_count": self.last_take_count,
            "backoff_s": round(self.backoff_s, 4),
            "last_error": self.last_error,
            "backlog": self.backlog,
        }


def make_pools(queues: list[QueueSpec], queue_model: dict[str, str]) -> list[Pool]:
    """Group queues by model; level-0 queues listed first, config order kept within a level."""
    pools: dict[str, Pool] = {}
    for queue in queues:
        model = queue_model[queue.name]
        pool = pools.setdefault(model, Pool(model_id=model, online=[], offline=[]))
        (pool.online if queue.level is Level.ONLINE else pool.offline).append(queue.name)
    return list(pools.values())


class Poller:
    """One take loop per pool; stops cleanly; its status is a plain dict."""

    def __init__(
        self,
        *,
        taker: Taker,
        dispatcher: Dispatcher,
        capacity: CapacityTracker,
        pools: list[Pool],
        config: PollerConfig | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.taker = taker
        self.dispatcher = dispatcher
        self.capacity = capacity
        self.pools = pools
        self.config = config or PollerConfig()
        self.metrics = metrics or dispatcher.metrics
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._taking: dict[int, float] = {}
        """``id()`` of the pools whose take request is on the wire, with the monotonic time
        by which its own HTTP timeouts have ended it (see :meth:`take_bound_s`)."""

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loops (idempotent)."""
        if not self._loops:
            self._loops = [
                asyncio.create_task(self._loop(pool), name=f"poll-{pool.model_id}")
                for pool in self.pools
            ]

    @property
    def alive(self) -> bool:
        """False when a loop died of an unexpected error (the health check fails then)."""
        return self.failure() is None

    def failure(self) -> BaseException | None:
        """The exception a loop died of, if any."""
        for task in self._loops:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def stop(self) -> None:
        """Stop taking; in-flight tasks keep running (drain them with the dispatcher).

        A take already sent is let finish: the server may have popped its tasks, which are
        then handed to the dispatcher (it runs them, or answers or leaves them once its drain
        began) instead of being lost. It is waited for until its own HTTP timeouts end it
        (:meth:`take_bound_s` from when it began), never cut short before; only a take that
        outlives them (an answer still trickling in) is cancelled, its tasks left to the
        server (level 1 comes back after ``process_timeout``; level 0 is lost).
        """
        self._stop.set()
        for task, pool in zip(self._loops, self.pools, strict=True):
            if id(pool) not in self._taking:
                task.cancel()
        if self._taking:
            wait_s = max(self._taking.values()) - time.monotonic()
            await asyncio.wait(self._loops, timeout=max(0.0, wait_s))
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for pool in self.pools:
            pool.state = "stopped"

    def take_bound_s(self) -> float:
        """The longest a take lasts before its own HTTP timeouts end it: the connection pool,
        connect, write and read timeouts in turn (httpx counts each on its own)."""
        timeout_s = float(getattr(self.taker, "timeout_s", self.config.take_timeout_s))
        connect_s = float(getattr(self.taker, "connect_timeout_s", timeout_s))
        return 3 * timeout_s + connect_s

    def status(self) -> dict[str, Any]:
        """Per pool: take state and capacity."""
        capacity = self.capacity.snapshot()
        return {
            "in_flight": self.dispatcher.in_flight,
            "pools": [{**p.status(), "capacity": capacity.get(p.model_id, {})} for p in self.pools],
        }

    # -- the loop -------------------------------------------------------------------------

    async def _loop(self, pool: Pool) -> None:
        cfg = self.config
        idle = Backoff(cfg.idle_backoff_initial_s, cfg.idle_backoff_max_s)
        failing = Backoff(cfg.error_backoff_initial_s, cfg.error_backoff_max_s, jitter=SPREAD)
        while not self._stop.is_set():
            request = self._next_request(pool)
            if request is None:
                await self._estimate_backlog(pool)
                await self.capacity.wait_changed(1.0)
                continue
            covers_all = len(request.queues) == len(pool.online) + len(pool.offline)
            if not covers_all:
                # Offline is at capacity while the online reserve is open: the offline queues
                # may still hold a backlog the takes of online queues alone cannot see.
                await self._estimate_backlog(pool)
            started = time.monotonic()
            pool.takes += 1
            pool.last_take_size = request.size
            self._taking[id(pool)] = started + self.take_bound_s()
            try:
                try:
                    response = await self.taker.take(request)
                finally:
                    self._taking.pop(id(pool), None)
            except WorkerError as err:
                pool.failed_takes += 1
                pool.errors_in_a_row += 1
                pool.last_error = f"{type(err).__name__}: {err}"
                pool.state = "failing"
                self.metrics.inc("take_failures", model=pool.model_id)
                log = logger.error if isinstance(err, AuthenticationError) else logger.warning
                log(
                    "take failed (%d in a row): %s",
                    pool.errors_in_a_row,
                    err,
                    extra={"model": pool.model_id, "queues": request.queues},
                )
                # A gateway's or Bella-Queue's Retry-After is a floor.
                retry_after_s = getattr(err, "retry_after_s", None) or 0.0
                pool.backoff_s = max(failing.next_s(), retry_after_s)
                await self._sleep(pool.backoff_s)
                continue
            self.metrics.observe("take_latency_s", time.monotonic() - started, model=pool.model_id)
            failing.reset()
            pool.errors_in_a_row = 0
            pool.last_take_at = time.monotonic()
            tasks = response.all_tasks()
            for invalid in response.rejected:
                # Popped by the server but unreadable: answered 400 where it can be.
                self.dispatcher.reject(invalid.raw, invalid.reason)
            popped = len(tasks) + len(response.rejected)
            pool.last_take_count = popped
            if not popped:
                pool.empty_takes += 1
                if covers_all:
                    pool.state = "idle"
                    pool.saturated = False
                    pool.backlog = 0
                else:  # only the online queues are empty; offline ones were not asked
                    pool.state = "at offline capacity"
                pool.backoff_s = idle.next_s()
                await self._sleep(pool.backoff_s)
                continue
            idle.reset()
            pool.backoff_s = 0.0
            pool.state = "taking"
            pool.tasks_taken += len(tasks)
            if popped >= request.size:
                pool.saturated = True
                pool.full_takes += 1
            elif covers_all:
                pool.saturated = False
                pool.backlog = 0  # the queues gave less than asked: nothing left waiting
            for task in tasks:
                # Any level but 0 is offline: a server's odd level must not stop the loop.
                level = Level.ONLINE if task.level == 0 else Level.OFFLINE
                self.metrics.inc("tasks_taken", queue=task.full_queue)
                # A task holds its n engine sequences: counted as n, released as n, once.
                n = self.dispatcher.fan_out(task)
                self.capacity.acquire(pool.model_id, level, n, task_id=task.task_id)
                if not self.dispatcher.submit(task, pool.model_id, n):
                    self.capacity.release(pool.model_id, level, n, task_id=task.task_id)
            # Tasks flow: re-poll at once (the next request is sized by what is left).

    def _next_request(self, pool: Pool) -> TakeRequest | None:
        cfg = self.config
        remaining_offline = self.capacity.remaining(pool.model_id, Level.OFFLINE)
        remaining_online = self.capacity.remaining(pool.model_id, Level.ONLINE)
        if pool.offline and remaining_offline > 0:
            queues, size = pool.online + pool.offline, remaining_offline
        elif pool.online and remaining_online > 0:
            queues, size = pool.online, remaining_online
        elif (
            pool.probe_at_zero
            and self.capacity.replicas(pool.model_id) == 0
            and self.capacity.model(pool.model_id).total_in_flight == 0
        ):
            # Scaled to zero: one task, dispatched, waits at the handle and wakes the deployment.
            queues, size = pool.online + pool.offline, 1
        else:
            replicas = self.capacity.replicas(pool.model_id)
            pool.state = "waiting for replicas" if replicas == 0 else "at capacity"
            return None
        size = min(size, cfg.max_take_size)
        if cfg.strategy is TakeStrategy.FIFO:
            size = min(size, FIFO_TAKE_CAP)
        with_offline = any(q in pool.offline for q in queues)
        return TakeRequest(
            queues=queues,
            size=size,
            strategy=cfg.strategy,
            process_timeout=cfg.process_timeout_s if with_offline else 0,
            process_max_retries=cfg.process_max_retries if with_offline else 0,
            min_age_seconds=cfg.min_age_seconds,
        )

    def backlog(self, model_id: str) -> int:
        """The backlog estimate of a model's pool (reported to its autoscaling policy)."""
        return sum(p.backlog for p in self.pools if p.model_id == model_id)

    async def _estimate_backlog(self, pool: Pool) -> None:
        """While at capacity after full takes, estimate what still waits in the queues.

        Uses the queues' stats endpoint when the server reports ``pending`` (the emulator
        does); otherwise assumes one more replica's worth, which scales up one step at a time
        while takes keep coming back full.
        """
        if not pool.saturated:
            pool.backlog = 0
            return
        now = time.monotonic()
        if now - pool.stats_checked_at < self.config.stats_interval_s:
            return
        pool.stats_checked_at = now
        replicas = max(1, self.capacity.replicas(pool.model_id))
        fallback = max(1, self.capacity.target(pool.model_id) // replicas)
        stats = getattr(self.taker, "stats", None)
        if stats is None:
            pool.backlog = fallback
            return
        pending = 0
        known = False
        for queue in pool.online + pool.offline:
            try:
                body = await stats(queue)
            except WorkerError:
                continue
            if isinstance(body, dict) and isinstance(body.get("pending"), int):
                pending += body["pending"]
                known = True
        pool.backlog = pending if known else fallback
        if pool.backlog == 0:
            pool.saturated = False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
