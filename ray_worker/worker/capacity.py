"""The capacity model: how many more tasks the worker may take, per served model.

This module owns the arithmetic behind ``remaining_capacity``: the live load each LLM
replica reports (running and waiting requests, KV-cache use, ``max_num_seqs``), which
replicas count as running (those that reported recently), and what the worker holds in
flight. It must not do I/O or import Ray; the poller feeds it reports and asks it for sizes.

Per replica ``r`` of a model, with ``width(r)`` its configured ``max_num_seqs`` (the seats
offline work may hold) and ``seats(r)`` the engine seats above it kept for online work
(``ray_worker.task.seats``; the engine runs ``width + seats``):

    offline(r) = ceil(width(r) * target_ratio)              # target, not max: the excess
                                                            # waits in the replica for a seat
    offline(r) = min(offline(r), running(r) + waiting(r))   # when its KV cache is nearly full
    offline(r) = seats(r) = 0                               # while it stops (draining)
    T, W, S    = sums of offline(r), width(r), seats(r) over fresh replicas
    remaining  = max(0, T + S - online - min(offline, W))   # level 0
    remaining  = max(0, T - offline - max(0, online - S))   # level 1

``online``/``offline`` count the tasks the worker took and has not answered yet (queued in the
worker, waiting in a replica or running), so the worker never takes more than it can start
soon. Online work may use every seat (beyond the free ones it preempts offline runs), so the
offline tasks waiting in a replica beyond the width do not hold it back; offline work gives
way once online work overflows its seats. A task with ``n`` > 1 counts as its ``n``
sequences (the caller says how many, and releases as many). Tasks a replica holds that this
tracker did not count (``held_unknown``) count one each, at both levels. A data-parallel
group's ranks (each one replica with its own engine) count only while the whole group reports
and none drains (``ray_worker.hop.counted_replicas``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_worker.bella.protocol import Level
from ray_worker.config import CapacityConfig
from ray_worker.hop import ReplicaLoad, counted_replicas

__all__ = ["CapacityTracker", "ModelCapacity"]

_RECENT_MAX = 100_000


@dataclass(frozen=True, slots=True)
class _Seen:
    """A replica's last load report, as this tracker holds it."""

    load: ReplicaLoad
    received_at: float
    """When it came (this tracker's clock)."""
    held_unknown: int = 0
    """Tasks the replica runs that this poller did not hand it (a restarted poller's
    predecessor did): counted as in flight so a restart takes nothing twice."""


@dataclass
class ModelCapacity:
    """What the tracker knows of one served model's deployment."""

    model_id: str
    loads: dict[str, _Seen] = field(default_factory=dict)
    """Each replica's last report, by replica id."""
    in_flight: dict[Level, int] = field(default_factory=lambda: {Level.ONLINE: 0, Level.OFFLINE: 0})
    declined: int = 0
    """Tasks the poller wanted to take but could not for lack of capacity (a backlog hint)."""

    @property
    def total_in_flight(self) -> int:
        """In flight at both levels."""
        return self.in_flight[Level.ONLINE] + self.in_flight[Level.OFFLINE]


class CapacityTracker:
    """Remaining capacity per model from replica load reports and in-flight counts."""

    def __init__(
        self,
        config: CapacityConfig,
        model_ids: list[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self._models = {m: ModelCapacity(m) for m in model_ids}
        self._waiters: set[asyncio.Future[None]] = set()
        self._mine: set[str] = set()
        """Ids of the tasks counted in ``in_flight``."""
        self._recent: OrderedDict[str, float] = OrderedDict()
        """Ids released lately: a report sent before the release may still list them."""

    def model(self, model_id: str) -> ModelCapacity:
        """The state of one model; ``KeyError`` if it is not served."""
        return self._models[model_id]

    @property
    def model_ids(self) -> list[str]:
        """Served models."""
        return list(self._models)

    # -- inputs ---------------------------------------------------------------------------

    def report(self, report: ReplicaLoad | Mapping[str, Any]) -> None:
        """Record a replica's load report; reports of unknown models are ignored."""
        now = self._clock()
        load = report if isinstance(report, ReplicaLoad) else ReplicaLoad.from_report(report)
        state = self._models.get(load.model_id)
        if state is None:
            return
        seen = _Seen(load, now)
        if load.held_ids:
            self._forget_released(now)
            unknown = sum(1 for i in load.held_ids if i not in self._mine and i not in self._recent)
            seen = _Seen(load, now, unknown)
        previous = state.loads.get(load.replica_id)
        state.loads[load.replica_id] = seen
        if previous is None or _seats(previous.load, self.config) != _seats(load, self.config):
            self._notify()

    def acquire(
        self, model_id: str, level: Level, n: int = 1, *, task_id: str | None = None
    ) -> None:
        """Count ``n`` sequences taken for ``model_id``: ``n`` tasks, or, with ``task_id``,
        that one task's fan-out (its ``n``); ``release`` takes the same ``n`` back."""
        self._models[model_id].in_flight[level] += n
        if task_id is not None:
            self._mine.add(task_id)

    def release(
        self, model_id: str, level: Level, n: int = 1, *, task_id: str | None = None
    ) -> None:
        """Count ``n`` sequences answered (as many as ``acquire`` counted); wakes pollers
        waiting for capacity."""
        counts = self._models[model_id].in_flight
        counts[level] = max(0, counts[level] - n)
        if task_id is not None:
            self._mine.discard(task_id)
            now = self._clock()
            self._recent[task_id] = now
            self._recent.move_to_end(task_id)
            self._forget_released(now)
        self._notify()

    def _forget_released(self, now: float) -> None:
        horizon = now - 2 * self.config.load_stale_after_s
        while self._recent:
            _, at = next(iter(self._recent.items()))
            if at >= horizon and len(self._recent) <= _RECENT_MAX:
                break
            self._recent.popitem(last=False)

    def decline(self, model_id: str, n: int = 1) -> None:
        """Note that the poller wanted ``n`` more tasks than capacity allowed."""
        self._models[model_id].declined += n

    # -- outputs --------------------------------------------------------------------------

    def _fresh(self, model_id: str) -> list[_Seen]:
        """Reports of replicas that reported within ``load_stale_after_s``; drops stale ones."""
        state = self._models[model_id]
        horizon = self._clock() - self.config.load_stale_after_s
        stale = [rid for rid, seen in state.loads.items() if seen.received_at < horizon]
        for rid in stale:
            del state.loads[rid]
        return list(state.loads.values())

    @staticmethod
    def _counted(fresh: list[_Seen]) -> list[_Seen]:
        """Of ``fresh`` reports, those of the replicas whose seats count: a data-parallel group
        counts only while all its ranks report and none drains
        (``ray_worker.hop.counted_replicas``)."""
        if all(seen.load.gang_id is None for seen in fresh):
            return fresh
        counted = counted_replicas(seen.load for seen in fresh)
        return [seen for seen in fresh if seen.load.replica_id in counted]

    def replicas(self, model_id: str) -> int:
        """Replicas counted as running (fresh reports, not draining; DP groups whole)."""
        return sum(1 for seen in self._counted(self._fresh(model_id)) if not seen.load.draining)

    def task_fate(self, model_id: str, replica_id: str, task_id: str, *, since: float) -> str:
        """What ``replica_id`` of ``model_id`` says of ``task_id`` in reports received after
        ``since`` (this tracker's clock, ``now()``): ``"held"`` (it still runs it),
        ``"ended"`` (it reported since without it: it ended there), ``"unknown"`` (no report
        since yet, and it is not stale) or ``"gone"`` (its reports went stale: it died)."""
        seen = self._models[model_id].loads.get(replica_id)
        if seen is None or seen.received_at < self._clock() - self.config.load_stale_after_s:
            return "gone"
        if seen.received_at <= since:
            return "unknown"
        return "held" if task_id in seen.load.held_ids else "ended"

    def now(self) -> float:
        """This tracker's clock (what ``holder``'s ``reported_after`` is measured on)."""
        return self._clock()

    def target(self, model_id: str) -> int:
        """Tasks the model's running replicas should hold: enough to keep batches full, plus
        the online seats."""
        counted = self._counted(self._fresh(model_id))
        return sum(sum(_seats(seen.load, self.config)) for seen in counted)

    def max_num_seqs(self, model_id: str) -> int:
        """Sequences the running replicas can run at once."""
        return sum(seen.load.max_num_seqs for seen in self._counted(self._fresh(model_id)))

    def remaining(self, model_id: str, level: Level) -> int:
        """How many more tasks of ``level`` may be taken for ``model_id`` now."""
        offline_target = seats = width = 0
        fresh = self._fresh(model_id)
        for seen in self._counted(fresh):
            offline, online = _seats(seen.load, self.config)
            offline_target += offline
            seats += online
            width += 0 if seen.load.draining else seen.load.width
        unknown = sum(seen.held_unknown for seen in fresh)
        counts = self._models[model_id].in_flight
        online_held, offline_held = counts[Level.ONLINE], counts[Level.OFFLINE]
        if level is Level.OFFLINE:
            left = offline_target - offline_held - max(0, online_held - seats)
        else:
            left = offline_target + seats - online_held - min(offline_held, width)
        return max(0, left - unknown)

    def in_flight(self, model_id: str) -> int:
        """Tasks held for ``model_id``: counted here, plus those its replicas report running
        that this tracker did not count (after a poller restart)."""
        unknown = sum(seen.held_unknown for seen in self._fresh(model_id))
        return self._models[model_id].total_in_flight + unknown

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per model: replicas, target, in flight, remaining, engine load."""
        out: dict[str, dict[str, Any]] = {}
        for model_id, state in self._models.items():
            seens = self._fresh(model_id)
            counted = self._counted(seens)
            loads = [seen.load for seen in counted]
            out[model_id] = {
                "replicas": sum(1 for x in loads if not x.draining),
                "draining": sum(1 for seen in seens if seen.load.draining),
                "target": self.target(model_id),
                "max_num_seqs": sum(x.max_num_seqs for x in loads),
                "in_flight_online": state.in_flight[Level.ONLINE],
                "in_flight_offline": state.in_flight[Level.OFFLINE],
                "remaining_online": self.remaining(model_id, Level.ONLINE),
                "remaining_offline": self.remaining(model_id, Level.OFFLINE),
                "engine_running": sum(x.running for x in loads),
                "engine_waiting": sum(x.waiting for x in loads),
                "kv_cache_usage_max": max((x.kv_cache_usage for x in loads), default=0.0),
                "offline_width": sum(x.width for x in loads if not x.draining),
                "online_seats": sum(x.online_seats for x in loads if not x.draining),
                "online_seats_in_use": sum(x.seats_online_in_use for x in loads),
                "offline_seats_in_use": sum(x.seats_offline_in_use for x in loads),
                "preemptions": sum(x.preemptions for x in loads),
                "declined": state.declined,
                "held_unknown": sum(seen.held_unknown for seen in seens),
            }
        return out

    async def wait_changed(self, timeout_s: float) -> None:
        """Wait until capacity may have grown (a release or a new report), or the timeout."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


def _seats(load: ReplicaLoad, config: CapacityConfig) -> tuple[int, int]:
    """``(offline target, online seats)`` of one replica."""
    if load.draining:
        return 0, 0
    offline = math.ceil(load.width * config.target_ratio)
    if load.kv_cache_usage >= config.kv_cache_high_watermark:
        offline = min(offline, load.running + load.waiting)
    return offline, load.online_seats
