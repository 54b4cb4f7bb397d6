"""StatusCache: one refresh per max_age_s however many callers, shared by concurrent callers,
bounded waiting (the others get the last value, or None before there is one)."""

from __future__ import annotations

import asyncio

import pytest

from ray_worker.worker.status_cache import StatusCache


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A refresh that counts its calls (the fan-outs) and finishes when the test lets it."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self) -> str:
        self.calls += 1
        call = self.calls
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return f"status {call}"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_callers_make_one_refresh_and_excess_callers_do_not_wait() -> None:
    source, clock = Source(), Clock()
    cache = StatusCache(source, max_age_s=1.0, max_waiting=8, clock=clock)

    callers = [asyncio.create_task(cache.get()) for _ in range(50)]
    await settle()
    assert source.calls == 1
    # Beyond the 8 waiting, callers are answered at once: nothing is cached yet, so None (503).
    done = [c for c in callers if c.done()]
    assert len(done) == 42
    assert {c.result() for c in done} == {None}

    source.release.set()
    results = await asyncio.gather(*callers)
    assert results.count("status 1") == 8
    assert source.calls == 1
    assert cache.refreshes == 1
    assert cache.shed == 42


async def test_at_most_one_refresh_per_max_age_and_stale_copy_for_the_excess() -> None:
    source, clock = Source(), Clock()
    source.release.set()
    cache = StatusCache(source, max_age_s=1.0, max_waiting=2, clock=clock)
    assert await cache.get() == "status 1"

    clock.now += 0.999
    assert await asyncio.gather(*(cache.get() for _ in range(100))) == ["status 1"] * 100
    assert source.calls == 1

    clock.now += 0.001
    source.release.clear()
    callers = [asyncio.create_task(cache.get()) for _ in range(10)]
    await settle()
    assert source.calls == 2
    assert sorted(c.result() for c in callers if c.done()) == ["status 1"] * 8  # stale copy
    source.release.set()
    assert sorted(await asyncio.gather(*callers)) == ["status 1"] * 8 + ["status 2"] * 2


async def test_a_slow_refresh_is_never_overlapped_nor_restarted_early() -> None:
    source, clock = Source(), Clock()
    cache = StatusCache(source, max_age_s=1.0, max_waiting=None, clock=clock)

    first = asyncio.create_task(cache.get())
    await settle()
    clock.now += 5.0  # the refresh takes longer than max_age_s
    second = asyncio.create_task(cache.get())
    await settle()
    assert source.calls == 1
    source.release.set()
    assert await first == await second == "status 1"
    # It started 5 s ago: the next caller refreshes, once.
    assert await asyncio.gather(cache.get(), cache.get()) == ["status 2", "status 2"]
    assert source.calls == 2


async def test_a_cancelled_caller_leaves_the_refresh_to_the_others() -> None:
    source, clock = Source(), Clock()
    cache = StatusCache(source, clock=clock)
    leaving, staying = asyncio.create_task(cache.get()), asyncio.create_task(cache.get())
    await settle()

    leaving.cancel()
    await settle()
    source.release.set()

    assert await staying == "status 1"
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert source.calls == 1


async def test_a_failed_refresh_keeps_the_last_value_and_is_not_retried_early() -> None:
    source, clock = Source(), Clock()
    source.release.set()
    cache = StatusCache(source, max_age_s=1.0, clock=clock)
    assert await cache.get() == "status 1"

    clock.now += 1.0
    source.fail = RuntimeError("publisher gone")
    with pytest.raises(RuntimeError, match="publisher gone"):
        await cache.get()
    assert await cache.get() == "status 1"  # within max_age_s of the failed start
    assert source.calls == 2

    clock.now += 1.0
    source.fail = None
    assert await cache.get() == "status 3"


async def test_a_first_refresh_that_failed_answers_its_error_until_the_next_may_start() -> None:
    source, clock = Source(), Clock()
    source.release.set()
    source.fail = RuntimeError("boom")
    cache = StatusCache(source, max_age_s=1.0, clock=clock)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="boom"):
            await cache.get()
    assert source.calls == 1
