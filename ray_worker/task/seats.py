"""Engine seats of one LLM replica: online work never waits behind offline work.

vLLM's priority scheduler orders only its *waiting* queue: once ``max_num_seqs`` sequences run,
a waiting online request waits until one of them ends, which for long offline answers takes
minutes. This module owns the replica's admission to its engine instead:

- **seats**: the engine runs ``width + online`` sequences (``serve.llm_config.with_online_seats``
  raises its ``max_num_seqs``); offline work (level 1, callback or batch: nothing of it has
  left the replica) never holds more than ``width`` of them, so ``online`` seats stay free for
  online work (level 0, or a producer waiting: blocking, streaming) while the offline share
  keeps the configured width busy. Offline tasks beyond the width wait here, first come first
  served, and take a seat the moment one frees (no round trip to the poller).
- **preemption**: an online task that finds every seat taken (more online work than the
  reserve) ends the offline run that started last (the least progress) and takes its seat;
  the preempted task waits at the head of the offline line and runs again from the start
  (its answer leaves only at the end, so nobody saw the aborted run; prefix caching keeps its
  prompt). A task is preempted at most ``max_preemptions`` times, then runs to its end.
  Online work is never preempted.

Seats are handed over, not raced for: a released seat goes to the first online waiter, else
to the first offline waiter that fits. A task of ``n`` sequences holds ``n`` seats.

It must not import Ray or do I/O (the runner asks it for seats; the replica reports ``stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Seat", "Seats"]


@dataclass(eq=False)
class Seat:
    """Seats held by one engine run."""

    task_id: str
    weight: int
    online: bool
    preemptible: bool
    started: float = field(default_factory=time.monotonic)
    preempted: bool = False
    """This run was preempted (its ``on_preempt`` was called)."""
    on_preempt: Callable[[], Any] | None = None
    """Ends the run (set by the holder once its engine call started)."""


@dataclass(eq=False)
class _Waiter:
    seat: Seat
    future: asyncio.Future[None]


class Seats:
    """The seats of one replica's engine (see the module docstring)."""

    def __init__(self, width: int, online: int, *, max_preemptions: int = 2) -> None:
        if width < 1 or online < 0 or max_preemptions < 0:
            raise ValueError(f"bad seats: width={width} online={online} cap={max_preemptions}")
        self.width = width
        """Seats offline work may hold (the configured ``max_num_seqs``)."""
        self.online_seats = online
        """Seats above the width, kept for online work."""
        self.max_preemptions = max_preemptions
        self.total = width + online
        self.preemptions = 0
        """Offline runs preempted since the start."""
        self._in_use = {True: 0, False: 0}
        """Seats held, online (True) and offline (False)."""
        self._holders: set[Seat] = set()
        self._online_line: deque[_Waiter] = deque()
        self._offline_line: deque[_Waiter] = deque()

    # -- the holders' side ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(
        self,
        task_id: str,
        *,
        online: bool,
        weight: int = 1,
        preemptible: bool = False,
        first: bool = False,
    ) -> AsyncIterator[Seat]:
        """Hold seats for one engine run of ``task_id``; waits until they are free.

        ``preemptible`` (offline only): an online task may end this run (``Seat.preempted``
        then says so). ``first``: wait at the head of the line (a preempted task's re-run).
        """
        cap = self.total if online else self.width
        seat = Seat(task_id, max(1, min(weight, cap)), online, preemptible and not online)
        await self._acquire(seat, first=first)
        try:
            yield seat
        finally:
            self._release(seat)

    async def _acquire(self, seat: Seat, *, first: bool) -> None:
        line = self._online_line if seat.online else self._offline_line
        if not line and self._fits(seat):
            self._take(seat)
            return
        waiter = _Waiter(seat, asyncio.get_running_loop().create_future())
        if first:
            line.appendleft(waiter)
        else:
            line.append(waiter)
        if seat.online:
            self._preempt_for_online()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(seat)  # handed over just as the wait was cancelled
            else:
                with contextlib.suppress(ValueError):
                    line.remove(waiter)
                self._hand_over()
            raise

    def _fits(self, seat: Seat) -> bool:
        free = self.total - self._in_use[True] - self._in_use[False]
        if seat.weight > free:
            return False
        return seat.online or self._in_use[False] + seat.weight <= self.width

    def _take(self, seat: Seat) -> None:
        self._in_use[seat.online] += seat.weight
        seat.started = time.monotonic()
        self._holders.add(seat)

    def _release(self, seat: Seat) -> None:
        if seat not in self._holders:
            return
        self._holders.discard(seat)
        self._in_use[seat.online] -= seat.weight
        self._hand_over()

    def _hand_over(self) -> None:
        """Give free seats to the waiters: online first, then offline in line order."""
        for line in (self._online_line, self._offline_line):
            while line:
                waiter = line[0]
                if waiter.future.done():
                    line.popleft()
                    continue
                if not self._fits(waiter.seat):
                    break
                line.popleft()
                self._take(waiter.seat)
                waiter.future.set_result(None)
        if self._online_line:
            self._preempt_for_online()

    def _preempt_for_online(self) -> None:
        """End offline runs (the last started first) until the online waiters' seats are
        on their way, as far as the preemption cap allows."""
        needed = sum(w.seat.weight for w in self._online_line if not w.future.done())
        free = self.total - self._in_use[True] - self._in_use[False]
        coming = sum(s.weight for s in self._holders if s.preempted)
        while needed > free + coming:
            victims = [
                s
                for s in self._holders
                if s.preemptible and not s.preempted and s.on_preempt is not None
            ]
            if not victims:
                return
            victim = max(victims, key=lambda s: s.started)
            victim.preempted = True
            self.preemptions += 1
            coming += victim.weight
            assert victim.on_preempt is not None
            victim.on_preempt()

    # -- figures ----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Part of the replica's load report (``ray_worker.hop.ReplicaLoad``)."""
        return {
            "offline_width": self.width,
            "online_seats": self.online_seats,
            "seats_online_in_use": self._in_use[True],
            "seats_offline_in_use": self._in_use[False],
            "seats_waiting_online": len(self._online_line),
            "seats_waiting_offline": len(self._offline_line),
            "preemptions": self.preemptions,
        }
