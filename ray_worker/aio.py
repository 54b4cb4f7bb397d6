"""Small asyncio helpers shared by the control plane and the task runner (no Ray, no I/O):
the stop helpers and the one jittered backoff."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

__all__ = ["BELOW", "SPREAD", "Backoff", "cut_short", "jittered", "to_the_end"]

_T = TypeVar("_T")


async def to_the_end(work: Awaitable[_T]) -> _T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile (then re-raise):
    an answer half sent is worse than a stop that waits for it."""
    job = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await job
        raise


async def cut_short(jobs: Collection[asyncio.Task[Any]], timeout_s: float) -> int:
    """Wait up to ``timeout_s`` for ``jobs``; cancel those still running and give them up to
    10 s to handle it (each answers or hands back its task). Returns how many were cut."""
    pending: set[asyncio.Task[Any]] = set()
    if jobs:
        _, pending = await asyncio.wait(jobs, timeout=timeout_s)
    for job in pending:
        job.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
    return len(pending)


BELOW = (0.5, 1.0)
"""Jitter that waits between half and all of the step: never longer than the step."""
SPREAD = (0.75, 1.25)
"""Jitter of a quarter either side of the step."""


def jittered(
    step_s: float, jitter: tuple[float, float] = BELOW, rng: random.Random | None = None
) -> float:
    """``step_s`` times a random factor within ``jitter``: waits of many callers that failed
    together do not retry in lock step."""
    low, high = jitter
    return step_s * (rng or random).uniform(low, high)


class Backoff:
    """Capped exponential backoff with jitter: ``next_s`` gives the wait to make now (the
    step times a random factor within ``jitter``) and doubles the step, up to ``max_s``;
    ``reset`` starts again from ``initial_s``."""

    __slots__ = ("_rng", "initial_s", "jitter", "max_s", "step_s")

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        jitter: tuple[float, float] = BELOW,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self.step_s = initial_s
        """The step the next wait is drawn around."""
        self._rng = rng

    def next_s(self) -> float:
        """The wait to make now; the step after it doubles (capped at ``max_s``)."""
        wait_s = jittered(self.step_s, self.jitter, self._rng)
        self.step_s = min(self.step_s * 2, self.max_s)
        return wait_s

    def reset(self) -> None:
        """Start again from ``initial_s`` (the thing waited for worked)."""
        self.step_s = self.initial_s

    async def sleep(self) -> float:
        """Sleep ``next_s``; returns how long."""
        wait_s = self.next_s()
        await asyncio.sleep(wait_s)
        return wait_s
