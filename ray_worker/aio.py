"""Small asyncio helpers shared by the control plane and the task runner (no Ray, no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

__all__ = ["cut_short", "to_the_end"]

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
