"""StreamWriter's buffer bounds and written mark, on a fake Redis whose rounds the test
holds and releases (the wire itself is tested against a real redis-server in
tests/integration/test_publisher.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ray_worker.bella.protocol import (
    COMPLETION_EVENT,
    ONLINE_MAX_WAIT_S,
    PROGRESS_EVENT,
    CompletionEvent,
    ProgressEvent,
    completion_fields,
    decode_event,
    progress_fields,
)
from ray_worker.config import PublisherOptions
from ray_worker.eventbus.redis_writer import StreamWriter
from ray_worker.eventbus.shared import Entry
from tests.unit.fakes import settle, until


class FakeRedis:
    """Runs the writer's batch script by hand: each round waits for ``gate``, then every
    entry is written, except those whose seq is in ``reject`` (a WRONGTYPE answer). While
    ``down``, every call fails as a refused connection does."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False
        self.reject: set[int] = set()
        self.written: list[tuple[str, dict[str, str]]] = []
        self.rounds: list[int] = []

    def register_script(self, _lua: str) -> Callable[..., Any]:
        return self._script

    async def _script(self, keys: list[str], args: list[Any]) -> list[Any]:
        await self.gate.wait()
        if self.down:
            raise ConnectionRefusedError("Redis is down")
        first, pos, out = int(args[0]), 4, []
        for n, key in enumerate(keys[1:]):
            count = int(args[pos])
            pairs = args[pos + 1 : pos + 1 + 2 * count]
            pos += 1 + 2 * count
            if not count:
                continue
            if first + n in self.reject:
                out += [first + n, "WRONGTYPE not a stream"]
            else:
                self.written.append((key, dict(zip(pairs[::2], pairs[1::2], strict=True))))
        self.rounds.append(len(keys) - 1)
        return [first + len(keys) - 2, "", *out]

    async def ping(self) -> bool:
        if self.down:
            raise ConnectionRefusedError("Redis is down")
        return True

    async def aclose(self) -> None:
        pass


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
async def make(redis: FakeRedis) -> AsyncIterator[Callable[..., StreamWriter]]:
    made: list[StreamWriter] = []

    def make(**options: Any) -> StreamWriter:
        publisher = StreamWriter("redis://fake", PublisherOptions(**options), client=redis)  # type: ignore[arg-type]
        made.append(publisher)
        return publisher

    yield make
    redis.gate.set()
    for publisher in made:
        await publisher.aclose(1.0)


def chunk(task: str, n: int, size: int = 100) -> Entry:
    """A progress entry of about ``size`` characters of data."""
    return ("s", progress_fields(task, str(n), "message", "x" * size), task, str(n))


def size_of(entry: Entry) -> int:
    key, fields, _, _ = entry
    return len(key) + sum(len(k) + len(v) for k, v in fields.items())


async def test_publish_waits_while_the_buffer_is_over_its_byte_bound(
    redis: FakeRedis, make: Callable[..., StreamWriter]
) -> None:
    entries = [chunk("T", n) for n in range(4)]
    size = size_of(entries[0])
    pub = make(max_buffered_bytes=3 * size)
    redis.gate.clear()  # Redis is slow: nothing is acknowledged
    await pub.publish(entries[:3])
    assert pub.stats()["buffered_bytes"] == 3 * size
    blocked = asyncio.create_task(pub.publish(entries[3:]))
    await settle()
    assert not blocked.done(), "a fourth entry would exceed the byte bound"
    assert pub.stats()["buffered"] == 3, "well under the entry bound"
    redis.gate.set()
    await asyncio.wait_for(blocked, 5)
    assert await pub.flush(5)
    assert redis.written == [e[:2] for e in entries], "in order, none lost"
    assert pub.stats()["buffered_bytes"] == 0


async def test_an_entry_larger_than_the_byte_bound_goes_alone_once_the_buffer_is_empty(
    redis: FakeRedis, make: Callable[..., StreamWriter]
) -> None:
    small, huge, after = chunk("E", 0), chunk("E", 1, size=10_000), chunk("E", 2)
    pub = make(max_buffered_bytes=2 * size_of(small))
    redis.gate.clear()
    await pub.publish([small])
    blocked = asyncio.create_task(pub.publish([huge]))
    await settle()
    assert not blocked.done(), "waits while anything else is buffered"
    follower = asyncio.create_task(pub.publish([after]))
    await settle()
    assert not follower.done(), "FIFO: no overtaking of a waiting publisher"
    redis.gate.set()
    await asyncio.wait_for(asyncio.gather(blocked, follower), 5)
    assert await pub.flush(5)
    assert redis.written == [e[:2] for e in (small, huge, after)]
    assert redis.rounds == [1, 1, 1], "the large entry was buffered alone"
    # Into an empty buffer it goes at once, without waiting.
    redis.gate.clear()
    await asyncio.wait_for(pub.publish([huge]), 1)
    assert pub.stats()["buffered_bytes"] == size_of(huge)


async def test_the_written_mark_counts_only_entries_redis_acknowledged(
    redis: FakeRedis, make: Callable[..., StreamWriter]
) -> None:
    pub = make()
    redis.gate.clear()
    last = await pub.publish([chunk("W", 0), chunk("W", 1)])
    assert (last, pub.written_upto()) == (2, 0), "buffered is not written"
    redis.gate.set()
    assert await pub.flush(5)
    assert pub.written_upto() == 2
    # An entry Redis rejects is not written: the mark stops below it for good.
    redis.reject.add(3)
    await pub.publish([("s", completion_fields("R", {"status_code": 200}), "R", "")])
    assert await pub.flush(5)
    assert await pub.publish([chunk("W", 2)]) == 4
    assert await pub.flush(5)
    assert pub.written_upto() == 2
    assert pub.lost_writes


OUTAGE = {"outage_timeout_s": 0.01, "backoff_initial_s": 0.001, "backoff_max_s": 0.002}
"""An outage is given up at once, and Redis is probed often."""


async def test_the_writer_gives_tasks_up_by_the_ids_their_entries_carry(
    redis: FakeRedis, make: Callable[..., StreamWriter]
) -> None:
    """The writer reads no payload: each entry names its task and event beside its fields."""
    pub = make(**OUTAGE)
    redis.down = True
    opaque = "not the JSON a payload holds"
    await pub.publish(
        [
            ("s", {"name": PROGRESS_EVENT, "payload": opaque}, "T", "7"),
            ("s", {"name": COMPLETION_EVENT, "payload": opaque}, "T", ""),
        ]
    )
    await until(lambda: pub.stats()["dropped_tasks"] == 1)
    assert await pub.delivery(["T"], 0) == {"T": False}, "its completion was given up"
    redis.down = False
    await until(lambda: pub.stats()["owed_answers_sent"] == 1)
    assert await pub.flush(5)
    chunk_event, done = (decode_event(fields) for _, fields in redis.written)
    assert isinstance(chunk_event, ProgressEvent)
    assert isinstance(done, CompletionEvent)
    assert (chunk_event.task_id, chunk_event.event_id) == ("T", "8"), "after its last event"
    assert (done.task_id, done.result["status_code"]) == ("T", 503)


async def test_answers_are_owed_only_while_an_online_producer_may_still_wait(
    redis: FakeRedis, make: Callable[..., StreamWriter]
) -> None:
    """Past ``ONLINE_MAX_WAIT_S`` the server has answered a task 408 itself: no answer then."""
    pub = make(**OUTAGE)
    redis.down = True
    await pub.publish([chunk("OLD", 0), chunk("NEW", 0)])
    await until(lambda: pub.stats()["dropped_tasks"] == 2)
    # OLD was given up longer ago than its producer waits (well within the stream's window).
    pub._owed["OLD"].since -= ONLINE_MAX_WAIT_S + 1
    redis.down = False
    await until(lambda: pub.stats()["owed_answers_sent"] > 0)
    assert await pub.flush(5)
    answered = {event.task_id for _, f in redis.written if (event := decode_event(f))}
    assert answered == {"NEW"}
    assert pub.stats()["owed_answers_sent"] == 1
