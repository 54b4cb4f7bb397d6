"""StreamWriter against a real redis-server: wire fields, order, trimming, outages, drain.

The module starts its own redis-server because several tests kill and restart it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ray_worker.bella.protocol import (
    COMPLETION_EVENT,
    PROGRESS_EVENT,
    CompletionEvent,
    ProgressEvent,
    completion_fields,
    decode_event,
    now_ms,
    progress_fields,
    stream_key,
)
from ray_worker.config import PublisherOptions
from ray_worker.errors import EventBusUnavailableError
from ray_worker.eventbus.redis_writer import MARKER_PREFIX, StreamWriter
from ray_worker.eventbus.shared import Entry
from ray_worker.testing.redis_server import RedisServer

TOPIC = "redis-mesh:private-stream:test:"
FAST = PublisherOptions(backoff_initial_s=0.01, backoff_max_s=0.1, connect_timeout_s=0.5)


async def wait_for(condition: Callable[[], bool], within_s: float = 20.0) -> None:
    """Poll ``condition`` until true (fails the test after ``within_s``)."""
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - polling a plain predicate
            await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[Redis]:
    server.start()  # a previous test may have left it down
    client = Redis.from_url(server.url)
    await client.flushall()
    yield client
    await client.aclose()
    server.start()


StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


async def xrange(client: Redis, key: str) -> StreamEntries:
    """XRANGE typed for tests (redis-py's stubs cover every response mode)."""
    return cast(StreamEntries, await client.xrange(key))


async def read_stream(server: RedisServer, key: str) -> StreamEntries:
    """XRANGE through a fresh connection (a pooled one may be stale after a restart)."""
    async with Redis.from_url(server.url) as client:
        return await xrange(client, key)


def progress(instance: str, task: str, i: int, data: Any = None) -> Entry:
    return (
        stream_key(TOPIC, instance),
        progress_fields(task, str(i), "message", {"i": i} if data is None else data),
        task,
        str(i),
    )


def completion(instance: str, task: str) -> Entry:
    return (
        stream_key(TOPIC, instance),
        completion_fields(task, {"status_code": 200, "request_id": task, "body": {}}),
        task,
        "",
    )


def labels(entries: StreamEntries) -> dict[str, list[str]]:
    """Per task: the event ids in stream order, ``done`` for the completion."""
    out: dict[str, list[str]] = {}
    for _, fields in entries:
        event = decode_event(fields)
        assert event is not None
        label = event.event_id if isinstance(event, ProgressEvent) else "done"
        out.setdefault(event.task_id, []).append(label or "")
    return out


async def test_exact_fields_on_the_wire(server: RedisServer, redis: Redis) -> None:
    pub = StreamWriter(server.url, FAST)
    before = now_ms()
    await pub.publish([progress("10.0.0.5:8080", "TASK-1", 0, {"choices": [{"delta": "hé"}]})])
    await pub.publish([completion("10.0.0.5:8080", "TASK-1")])
    assert await pub.flush(5)
    entries = await xrange(redis, TOPIC + "10.0.0.5:8080")
    assert len(entries) == 2
    for _, fields in entries:
        assert list(fields) == [b"name", b"from", b"payload", b"context", b"timestamp"]
        assert fields[b"from"] == b""
        assert fields[b"context"] == b""
        assert before <= int(fields[b"timestamp"]) <= now_ms()
    assert entries[0][1][b"name"] == PROGRESS_EVENT.encode()
    assert entries[1][1][b"name"] == COMPLETION_EVENT.encode()
    first, second = (decode_event(fields) for _, fields in entries)
    assert isinstance(first, ProgressEvent)
    assert (first.task_id, first.event_id, first.event_name) == ("TASK-1", "0", "message")
    assert first.event_data == {"choices": [{"delta": "hé"}]}
    assert isinstance(second, CompletionEvent)
    assert second.result == {"status_code": 200, "request_id": "TASK-1", "body": {}}
    stats = pub.stats()
    assert stats["published"] == 2
    assert stats["buffered"] == 0
    assert stats["latency"]["count"] == 2
    await pub.aclose()
    assert not pub.healthy()


async def test_per_task_order_under_concurrency(server: RedisServer, redis: Redis) -> None:
    pub = StreamWriter(server.url, FAST)
    tasks, events, instances = 60, 40, 3

    async def stream(t: int) -> None:
        instance = f"10.0.0.{t % instances}:8080"
        for i in range(events):
            await pub.publish([progress(instance, f"task-{t}", i)])
            if random.random() < 0.2:
                await asyncio.sleep(0)
        await pub.publish([completion(instance, f"task-{t}")])

    await asyncio.gather(*(stream(t) for t in range(tasks)))
    assert await pub.flush(10)
    seen: dict[str, list[str]] = {}
    for n in range(instances):
        seen.update(labels(await xrange(redis, f"{TOPIC}10.0.0.{n}:8080")))
    expected = [str(i) for i in range(events)] + ["done"]
    assert seen == {f"task-{t}": expected for t in range(tasks)}
    stats = pub.stats()
    assert stats["published"] == tasks * (events + 1)
    assert stats["batches"] < tasks * (events + 1), "writes were coalesced into batches"
    await pub.aclose()


@pytest.mark.parametrize("approximate", [True, False])
async def test_minid_trims_entries_older_than_30_minutes(
    server: RedisServer, redis: Redis, approximate: bool
) -> None:
    key = TOPIC + "trim"
    old_ms = now_ms() - 40 * 60 * 1000
    recent_ms = now_ms() - 10 * 60 * 1000
    for i in range(250):
        await redis.xadd(key, {"n": str(i)}, id=f"{old_ms + i}-0")
    await redis.xadd(key, {"n": "recent"}, id=f"{recent_ms}-0")
    pub = StreamWriter(server.url, PublisherOptions(approximate_trim=approximate))
    await pub.publish([progress("trim", "TASK-1", 0)])
    assert await pub.flush(5)
    entries = await xrange(redis, key)
    old_left = [e for e in entries if int(e[0].split(b"-")[0]) < recent_ms]
    if approximate:
        # Whole radix nodes (100 entries each by default) go; the last partial one may stay.
        assert len(old_left) <= 100
    else:
        assert old_left == []
    assert entries[-2][1] == {b"n": b"recent"}
    assert isinstance(decode_event(entries[-1][1]), ProgressEvent)
    await pub.aclose()


async def consume(url: str, keys: list[str], sink: StreamEntries, stop: asyncio.Event) -> None:
    """Read streams like the server does (XREAD from the last id), riding out outages."""
    client = Redis.from_url(url, socket_connect_timeout=0.5)
    last: dict[Any, Any] = dict.fromkeys(keys, "0-0")
    try:
        while not stop.is_set():
            try:
                reply = cast(
                    "list[tuple[bytes, StreamEntries]]",
                    await client.xread(last, block=50),
                )
            except (RedisError, OSError):
                await asyncio.sleep(0.02)
                continue
            for name, entries in reply or []:
                for entry_id, fields in entries:
                    last[name.decode()] = entry_id.decode()
                    sink.append((entry_id, fields))
    finally:
        await client.aclose()


async def test_redis_restart_mid_stream_keeps_every_completion_in_order(
    server: RedisServer, redis: Redis
) -> None:
    pub = StreamWriter(server.url, FAST)
    tasks, events = 20, 40
    keys = [TOPIC + f"inst-{n}" for n in range(2)]
    received: StreamEntries = []
    stop = asyncio.Event()
    consumer = asyncio.create_task(consume(server.url, keys, received, stop))
    killed = asyncio.Event()
    first_after_kill: dict[str, int] = {}

    async def stream(t: int) -> None:
        task = f"task-{t}"
        for i in range(events):
            if killed.is_set():
                first_after_kill.setdefault(task, i)
            await pub.publish([progress(f"inst-{t % 2}", task, i)])
            await asyncio.sleep(0.003)
        await killed.wait()  # the completion goes out while Redis is down or just back
        await pub.publish([completion(f"inst-{t % 2}", task)])

    streams = asyncio.gather(*(stream(t) for t in range(tasks)))
    await wait_for(lambda: len(received) >= tasks * events // 3)
    server.kill()  # synchronous inside the loop: nothing is acknowledged after this point
    killed.set()
    await wait_for(lambda: pub.counters.retries >= 3)
    await asyncio.to_thread(server.start)
    await streams
    assert await pub.flush(20)
    await wait_for(
        lambda: sum(f[b"name"] == COMPLETION_EVENT.encode() for _, f in received) >= tasks
    )
    stop.set()
    await consumer

    seen = labels(received)
    assert set(seen) == {f"task-{t}" for t in range(tasks)}
    for task, got in seen.items():
        assert got[-1] == "done", task
        assert got.count("done") == 1, task
        ids = [int(x) for x in got[:-1]]
        assert ids == sorted(set(ids)), f"{task}: order kept, no duplicates"
        # Everything enqueued after the kill was buffered and must all have arrived.
        tail_from = first_after_kill.get(task, events)
        assert set(range(tail_from, events)) <= set(ids), task
    stats = pub.stats()
    assert stats["dropped_completions"] == 0
    assert stats["dropped_progress"] == 0
    assert stats["reconnects"] >= 1
    assert any(first_after_kill.get(f"task-{t}", events) < events for t in range(tasks)), (
        "the outage happened mid-stream"
    )
    await pub.aclose()


async def test_buffer_backpressure_while_down(server: RedisServer, redis: Redis) -> None:
    pub = StreamWriter(server.url, FAST.model_copy(update={"max_buffered": 20}))
    await pub.publish([progress("bp", "TASK-1", 0)])
    assert await pub.flush(5)
    server.kill()
    await pub.publish([progress("bp", "TASK-1", i) for i in range(1, 21)])  # fills the buffer
    await wait_for(lambda: pub.counters.retries >= 2)
    blocked = asyncio.create_task(pub.publish([completion("bp", "TASK-1")]))
    await wait_for(lambda: pub.counters.retries >= 4)
    assert not blocked.done(), "publish waits while the buffer is full"
    assert pub.counters.buffered == 20
    await asyncio.to_thread(server.start)
    await asyncio.wait_for(blocked, 10)
    assert await pub.flush(10)
    # Redis restarted empty: the first (acknowledged) entry is gone; everything after it came.
    assert labels(await read_stream(server, TOPIC + "bp")) == {
        "TASK-1": [str(i) for i in range(1, 21)] + ["done"]
    }
    assert pub.stats()["dropped_progress"] == 0
    await pub.aclose()


async def test_give_up_after_outage_counts_dropped_completions(
    server: RedisServer, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    pub = StreamWriter(server.url, FAST.model_copy(update={"outage_timeout_s": 0.3}))
    server.kill()
    caplog.set_level(logging.WARNING, logger="ray_worker.eventbus.redis_writer")
    await pub.publish([progress("gu", "TASK-P", i) for i in range(5)])
    await pub.publish([completion("gu", f"TASK-C{n}") for n in range(3)])
    await wait_for(lambda: pub.counters.dropped_completions == 3)
    stats = pub.stats()
    assert stats["dropped_progress"] == 5
    assert stats["buffered"] == 0
    assert stats["last_error"]
    assert await pub.flush(1), "given-up entries count as done for flush"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for n in range(3):
        assert any(f"TASK-C{n}" in message for message in errors)
    # Still healthy: once Redis is back, new events flow.
    assert pub.healthy()
    await asyncio.to_thread(server.start)
    await pub.publish([completion("gu", "TASK-LATE")])
    assert await pub.flush(10)
    # Every task given up is answered 503 once Redis is back (its producer still waits).
    assert labels(await read_stream(server, TOPIC + "gu")) == {
        "TASK-P": ["5", "done"],
        **{f"TASK-C{n}": ["0", "done"] for n in range(3)},
        "TASK-LATE": ["done"],
    }
    await pub.aclose()


async def test_a_task_is_given_up_whole_never_with_a_gap(server: RedisServer) -> None:
    pub = StreamWriter(server.url, FAST.model_copy(update={"outage_timeout_s": 0.3}))
    server.kill()
    # A's head is buffered when Redis goes away and is given up after the outage limit.
    await pub.publish([progress("gw", "TASK-A", i) for i in range(3)])
    await wait_for(lambda: pub.stats()["dropped_tasks"] == 1)
    # A's later events arrive after its head was given up: dropped too, completion included.
    await pub.publish([progress("gw", "TASK-A", i) for i in range(3, 6)])
    await pub.publish([completion("gw", "TASK-A")])
    await asyncio.to_thread(server.start)
    # B starts after the outage and is delivered whole.
    await pub.publish([progress("gw", "TASK-B", i) for i in range(4)])
    await pub.publish([completion("gw", "TASK-B")])
    assert await pub.flush(10)
    await wait_for(lambda: pub.stats()["owed_answers_sent"] == 1)
    assert await pub.flush(10)
    got = labels(await read_stream(server, TOPIC + "gw"))
    # A ends with the error chunk after the last event it had (5), then a 503 completion.
    assert got["TASK-A"] == ["6", "done"], "A must not end as a success"
    assert got["TASK-B"] == ["0", "1", "2", "3", "done"]
    stats = pub.stats()
    assert (stats["dropped_tasks"], stats["dropped_progress"]) == (1, 6)
    assert stats["dropped_completions"] == 1
    # A later task that reuses nothing of A is not affected.
    await pub.publish([progress("gw", "TASK-C", 0), completion("gw", "TASK-C")])
    assert await pub.flush(10)
    assert labels(await read_stream(server, TOPIC + "gw"))["TASK-C"] == ["0", "done"]
    await pub.aclose()


async def test_events_of_a_given_up_task_are_dropped_wherever_they_wait(
    server: RedisServer,
) -> None:
    pub = StreamWriter(server.url, FAST.model_copy(update={"outage_timeout_s": 0.3}))
    server.kill()
    await pub.publish([progress("gm", "TASK-OLD", 0)])
    await asyncio.sleep(0.35)  # OLD's event is past the outage limit; the next ones are not
    await pub.publish(
        [
            progress("gm", "TASK-NEW", 0),
            progress("gm", "TASK-OLD", 1),
            progress("gm", "TASK-NEW", 1),
            completion("gm", "TASK-OLD"),
            completion("gm", "TASK-NEW"),
        ]
    )
    await wait_for(lambda: pub.stats()["dropped_tasks"] == 1)
    await asyncio.to_thread(server.start)
    assert await pub.flush(10)
    got = labels(await read_stream(server, TOPIC + "gm"))
    assert got == {"TASK-NEW": ["0", "1", "done"], "TASK-OLD": ["2", "done"]}
    await pub.aclose()


async def test_rejected_entry_is_counted_and_the_rest_applied(
    server: RedisServer, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await redis.set(TOPIC + "not-a-stream", "x")
    pub = StreamWriter(server.url, FAST)
    caplog.set_level(logging.WARNING, logger="ray_worker.eventbus.redis_writer")
    await pub.publish(
        [
            progress("ok", "TASK-1", 0),
            completion("not-a-stream", "TASK-2"),
            completion("ok", "TASK-1"),
        ]
    )
    assert await pub.flush(5)
    assert labels(await xrange(redis, TOPIC + "ok")) == {"TASK-1": ["0", "done"]}
    stats = pub.stats()
    assert (stats["published"], stats["rejected"], stats["dropped_completions"]) == (2, 1, 1)
    assert "WRONGTYPE" in (stats["last_error"] or "")
    assert any("TASK-2" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    await pub.aclose()


@pytest.mark.parametrize("mark", [True, False])
async def test_lost_reply_is_retried_without_duplicates(
    server: RedisServer, redis: Redis, mark: bool
) -> None:
    options = FAST if mark else FAST.model_copy(update={"idempotency_ttl_s": 0})
    pub = StreamWriter(server.url, options)
    real_script = pub._script
    gate = asyncio.Event()
    calls = {"n": 0}

    async def apply_then_lose_reply(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        result = await real_script(*args, **kwargs)
        if calls["n"] == 1:
            await gate.wait()  # more entries are published meanwhile
            raise ConnectionError("reply lost after the batch was applied")
        return result

    pub._script = apply_then_lose_reply  # type: ignore[assignment]
    await pub.publish([progress("dup", "TASK-1", i) for i in range(10)])
    await wait_for(lambda: calls["n"] == 1)
    await pub.publish([progress("dup", "TASK-1", i) for i in range(10, 15)])
    gate.set()
    assert await pub.flush(5)
    got = labels(await xrange(redis, TOPIC + "dup"))["TASK-1"]
    assert pub.counters.retries == 1
    if mark:
        # The retried batch (entries 0-14) skipped the 10 already applied.
        assert got == [str(i) for i in range(15)]
        assert pub.counters.published == 15
        (marker,) = await redis.keys(MARKER_PREFIX + "*")
        assert await redis.get(marker) == b"15"
        assert await redis.ttl(marker) > 0
    else:
        # Without the mark, delivery is at-least-once: the lost batch is written again.
        assert got == [str(i) for i in range(10)] + [str(i) for i in range(15)]
        assert await redis.keys(MARKER_PREFIX + "*") == []
    await pub.aclose()


async def test_transient_refusal_is_retried_not_dropped(server: RedisServer, redis: Redis) -> None:
    pub = StreamWriter(server.url, FAST)
    await pub.publish([progress("oom", "TASK-1", 0)])
    assert await pub.flush(5)
    await redis.config_set("maxmemory", "1")  # every write now fails with OOM
    try:
        await pub.publish([progress("oom", "TASK-1", i) for i in range(1, 6)])
        await pub.publish([completion("oom", "TASK-1")])
        await wait_for(lambda: pub.counters.retries >= 2)
        assert "OOM" in (pub.counters.last_error or "")
    finally:
        await redis.config_set("maxmemory", "0")
    assert await pub.flush(10)
    assert labels(await xrange(redis, TOPIC + "oom")) == {
        "TASK-1": [str(i) for i in range(6)] + ["done"]
    }
    stats = pub.stats()
    assert (stats["dropped_progress"], stats["dropped_completions"], stats["rejected"]) == (0, 0, 0)
    await pub.aclose()


async def test_dead_writer_fails_publish_and_health(server: RedisServer, redis: Redis) -> None:
    pub = StreamWriter(server.url, FAST)

    async def broken() -> None:
        raise RuntimeError("bug in the writer")

    pub._write_round = broken  # type: ignore[method-assign]
    await pub.publish([progress("dead", "TASK-1", 0)])
    await wait_for(lambda: not pub.healthy())
    with pytest.raises(EventBusUnavailableError, match="bug in the writer"):
        await pub.publish([progress("dead", "TASK-1", 1)])
    with pytest.raises(EventBusUnavailableError):
        await pub.flush(1)
    with pytest.raises(EventBusUnavailableError):
        pub.check_health()
    await pub.aclose(drain_timeout_s=0.1)
    assert pub.stats()["dropped_progress"] == 1


async def test_aclose_drains_then_refuses(server: RedisServer, redis: Redis) -> None:
    pub = StreamWriter(server.url, FAST)
    for t in range(50):
        await pub.publish([progress("drain", f"TASK-{t}", i) for i in range(20)])
        await pub.publish([completion("drain", f"TASK-{t}")])
    await pub.aclose(drain_timeout_s=10)
    assert await redis.xlen(TOPIC + "drain") == 50 * 21
    assert pub.stats()["published"] == 50 * 21
    with pytest.raises(EventBusUnavailableError, match="closed"):
        await pub.publish([progress("drain", "TASK-X", 0)])


async def test_malformed_entry_is_refused_whole(server: RedisServer, redis: Redis) -> None:
    pub = StreamWriter(server.url, FAST)
    with pytest.raises(TypeError):
        await pub.publish([progress("bad", "TASK-1", 0), ("k", cast(Any, {"n": 1}))])
    assert pub.counters.buffered == 0
    await pub.aclose()


async def test_delivery_settles_each_completion_once_redis_acknowledged_it(
    server: RedisServer, redis: Redis
) -> None:
    pub = StreamWriter(server.url, FAST.model_copy(update={"outage_timeout_s": 30}))
    await pub.publish([progress("dl", "TASK-OK", 0), completion("dl", "TASK-OK")])
    assert await pub.delivery(["TASK-OK"], 10) == {"TASK-OK": True}
    assert labels(await xrange(redis, TOPIC + "dl")) == {"TASK-OK": ["0", "done"]}
    assert await pub.delivery(["TASK-OK"], 0) == {}, "an outcome is answered once"
    # While Redis is down a buffered completion is not delivered: asking waits, then
    # answers nothing; once Redis is back it is acknowledged.
    server.kill()
    await pub.publish([completion("dl", "TASK-DOWN")])
    assert await pub.delivery(["TASK-DOWN"], 0.3) == {}
    waiter = asyncio.create_task(pub.delivery(["TASK-DOWN", "TASK-UNKNOWN"], 20))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await asyncio.to_thread(server.start)
    assert await waiter == {"TASK-DOWN": True}
    await pub.aclose()


async def test_delivery_reports_a_completion_given_up_after_an_outage(
    server: RedisServer, redis: Redis
) -> None:
    pub = StreamWriter(server.url, FAST.model_copy(update={"outage_timeout_s": 0.3}))
    server.kill()
    await pub.publish([progress("dg", "TASK-G", 0), completion("dg", "TASK-G")])
    assert await pub.delivery(["TASK-G"], 20) == {"TASK-G": False}
    assert pub.stats()["dropped_completions"] == 1
    await asyncio.to_thread(server.start)
    await pub.aclose()


def answers(entries: StreamEntries) -> dict[str, list[Any]]:
    """Per task: the decoded events in stream order."""
    out: dict[str, list[Any]] = {}
    for _, fields in entries:
        event = decode_event(fields)
        assert event is not None
        out.setdefault(event.task_id, []).append(event)
    return out


async def test_tasks_given_up_in_an_outage_are_answered_503_once_redis_is_back_empty(
    server: RedisServer,
) -> None:
    """Nothing else is published after the outage: the writer finds Redis back by itself.
    The restarted server is empty (no persistence): the idempotency mark is gone too."""
    pub = StreamWriter(server.url, FAST.model_copy(update={"outage_timeout_s": 0.3}))
    await pub.publish([progress("ow", "TASK-S", 0)])
    assert await pub.flush(5)
    server.kill()
    await pub.publish([progress("ow", "TASK-S", i) for i in (1, 2)])
    await pub.publish([completion("ow", "TASK-B")])  # a blocking task's answer
    await wait_for(lambda: pub.stats()["dropped_tasks"] == 2)
    # The stream goes on producing while Redis is still down: dropped, ids remembered.
    await pub.publish([progress("ow", "TASK-S", 3)])
    await asyncio.sleep(0.3)
    await asyncio.to_thread(server.start)
    await wait_for(lambda: pub.stats()["owed_answers_sent"] == 2)
    assert await pub.flush(10)
    # The stream's later events and its own completion stay dropped.
    await pub.publish([progress("ow", "TASK-S", 4), completion("ow", "TASK-S")])
    assert await pub.flush(10)
    got = answers(await read_stream(server, TOPIC + "ow"))
    # The restarted Redis is empty: event 0 (written before the outage) is gone with it.
    (chunk, done) = got["TASK-S"]
    assert isinstance(chunk, ProgressEvent)
    assert chunk.event_id == "4"
    assert chunk.event_data["error"]["code"] == "events_lost"
    assert isinstance(done, CompletionEvent)
    assert done.result["status_code"] == 503
    assert done.result["body"]["error"]["code"] == "events_lost"
    (_, blocking) = got["TASK-B"]
    assert isinstance(blocking, CompletionEvent)
    assert blocking.result["status_code"] == 503
    assert pub.stats()["reconnects"] >= 1
    await pub.aclose()


async def test_minid_trims_by_the_servers_clock(server: RedisServer, redis: Redis) -> None:
    """The server's clock is 15 min ahead of ours: entries 20 min old by ours are past its
    30-minute window and go; by the local clock they would stay."""
    key = TOPIC + "skew"
    old_ms = now_ms() - 20 * 60 * 1000
    for i in range(10):
        await redis.xadd(key, {"n": str(i)}, id=f"{old_ms + i}-0")
    ahead_ms = 15 * 60 * 1000
    pub = StreamWriter(
        server.url,
        PublisherOptions(approximate_trim=False),
        clock_ms=lambda: now_ms() + ahead_ms,
    )
    await pub.publish([progress("skew", "TASK-1", 0)])
    assert await pub.flush(5)
    entries = await xrange(redis, key)
    assert len(entries) == 1
    assert isinstance(decode_event(entries[0][1]), ProgressEvent)
    await pub.aclose()


async def test_a_round_is_bounded_in_bytes(server: RedisServer, redis: Redis) -> None:
    # Four 300 KB answers (embeddings, say) with a 500 KB round bound: four rounds, each with
    # one of them, all written in order; small events share a round as usual.
    options = FAST.model_copy(update={"max_batch_bytes": 500_000})
    pub = StreamWriter(server.url, options)
    big = {"data": [{"embedding": "x" * 300_000}]}
    await pub.publish([progress("i", f"BIG-{n}", 0, big) for n in range(4)])
    assert await pub.flush(10)
    assert pub.stats()["batches"] == 4
    await pub.publish([progress("i", "SMALL", n) for n in range(50)])
    assert await pub.flush(10)
    assert pub.stats()["batches"] == 5
    entries = await xrange(redis, TOPIC + "i")
    assert list(labels(entries)) == ["BIG-0", "BIG-1", "BIG-2", "BIG-3", "SMALL"]
    await pub.aclose()
