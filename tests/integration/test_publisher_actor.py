"""RedisPublisher as a Ray actor, on the session's Ray and Redis.

Covers the poller's owned actor fed by ``EventBatcher`` and the per-node named actor fed
by ``EventBusClient``: sharing by name, leases and self-exit, exactly-once across transient
Ray errors, and re-creation after the actor is SIGKILLed. Each test uses its own topic and
app name and never flushes the shared Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from ray_worker.bella.protocol import (
    CompletionEvent,
    ProgressEvent,
    completion_fields,
    decode_event,
    progress_fields,
)
from ray_worker.config import PublisherOptions
from ray_worker.eventbus.batching import EventBatcher
from ray_worker.eventbus.client import EventBusClient, node_publisher
from ray_worker.eventbus.publisher_actor import RedisPublisher
from ray_worker.eventbus.shared import PUBLISHER_NAMESPACE, publisher_name
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.waiting import wait_for

DONE = {"status_code": 200, "request_id": "r"}


def by_task(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, fields in entries:
        event = decode_event(fields)
        assert event is not None
        label = event.event_id if isinstance(event, ProgressEvent) else "done"
        out.setdefault(event.task_id, []).append(label or "")
    return out


async def read_stream(url: str, key: str) -> dict[str, list[str]]:
    async with Redis.from_url(url) as reader:
        return by_task(cast(Any, await reader.xrange(key)))


def new_topic() -> str:
    return f"redis-mesh:private-stream:actor-{uuid.uuid4().hex[:8]}:"


def actor_name(app: str) -> str:
    import ray

    return publisher_name(app, ray.get_runtime_context().get_node_id())


def live_actor(app: str) -> Any | None:
    """The named publisher of ``app`` on this node, or None when there is none."""
    import ray

    try:
        return ray.get_actor(actor_name(app), namespace=PUBLISHER_NAMESPACE)
    except ValueError:
        return None


@pytest.fixture
def app(ray_serve: Any) -> Iterator[str]:
    """A fresh app name; its publisher actor (detached) is killed if a test leaves it."""
    import ray

    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    handle = live_actor(name)
    if handle is not None:
        ray.kill(handle)


async def precreate(app: str, url: str, topic: str, *, exit_grace_s: float = 0.5) -> Any:
    """Create the node's publisher first, with a short exit grace for the test."""
    return await asyncio.to_thread(
        node_publisher, app, url, topic, PublisherOptions(), exit_grace_s=exit_grace_s
    )


async def stream_tasks(
    client: EventBusClient, prefix: str, tasks: int, events: range, *, complete: bool
) -> None:
    async def one(t: int) -> None:
        for i in events:
            await client.progress("inst:1", f"{prefix}-{t}", str(i), "message", {"i": i})
        if complete:
            await client.completion("inst:1", f"{prefix}-{t}", DONE)

    await asyncio.gather(*(one(t) for t in range(tasks)))


async def test_actor_publishes_in_order_and_drains_on_close(
    ray_serve: Any, redis_server: RedisServer
) -> None:
    import ray

    topic = new_topic()
    actor_cls: Any = ray.remote(num_cpus=0, max_concurrency=1000)(RedisPublisher)
    actor = actor_cls.remote(redis_server.url, topic, PublisherOptions(max_buffered=5000))
    try:
        assert await actor.topic.remote() == topic
        client = EventBatcher(
            send_seq=lambda seq, batch: actor.publish.remote("test", seq, batch), topic=topic
        )
        tasks, events = 8, 25

        async def stream(t: int) -> None:
            for i in range(events):
                await client.progress("inst:1", f"TASK-{t}", str(i), "message", {"i": i})
            await client.completion("inst:1", f"TASK-{t}", DONE)

        await asyncio.gather(*(stream(t) for t in range(tasks)))
        await client.flush()
        assert await actor.flush.remote(10.0)
        expected = [str(i) for i in range(events)] + ["done"]
        got = await read_stream(redis_server.url, topic + "inst:1")
        assert got == {f"TASK-{t}": expected for t in range(tasks)}
        stats = await actor.stats.remote()
        assert stats["configured"] is True
        assert stats["published"] == tasks * (events + 1)
        assert client.stats()["sent_batches"] < tasks * (events + 1), "the client coalesced"
        await actor.check_health.remote()

        # Events handed over just before close are drained by aclose().
        await client.completion("inst:1", "TASK-LAST", DONE)
        await actor.aclose.remote()
        async with Redis.from_url(redis_server.url) as reader:
            last = cast(Any, await reader.xrange(topic + "inst:1"))[-1][1]
        done = decode_event(last)
        assert isinstance(done, CompletionEvent)
        assert done.task_id == "TASK-LAST"
    finally:
        ray.kill(actor)


async def test_the_actor_takes_tagged_batches_and_the_bare_ones_of_a_previous_client(
    ray_serve: Any, redis_server: RedisServer
) -> None:
    """Current clients tag each entry with its task and event ids; a client of the previous
    version (during a redeploy) still sends bare ``(key, fields)`` pairs."""
    import ray

    topic = new_topic()
    key = topic + "inst:1"
    actor_cls: Any = ray.remote(num_cpus=0, max_concurrency=1000)(RedisPublisher)
    actor = actor_cls.remote(redis_server.url, topic, PublisherOptions())
    try:
        assert (await actor.target.remote())["tagged_entries"] is True
        tagged = [
            (key, progress_fields("NEW", "0", "message", {}), "NEW", "0"),
            (key, completion_fields("NEW", DONE), "NEW", ""),
        ]
        bare = [
            (key, progress_fields("OLD", "0", "message", {})),
            (key, completion_fields("OLD", DONE)),
        ]
        assert (await actor.publish.remote("new", 1, tagged))[0] == "ok"
        assert (await actor.publish.remote("old", 1, bare))[0] == "ok"
        # Each completion's fate is known by its task id, whichever form it came in.
        fates: dict[str, bool] = {}
        async with asyncio.timeout(20):
            while len(fates) < 2:
                fates.update(await actor.delivery.remote(["NEW", "OLD"], 1.0))
        assert fates == {"NEW": True, "OLD": True}
        assert await read_stream(redis_server.url, key) == {
            "NEW": ["0", "done"],
            "OLD": ["0", "done"],
        }
    finally:
        ray.kill(actor)


async def test_two_clients_share_the_node_actor_which_exits_after_the_last_release(
    app: str, redis_server: RedisServer
) -> None:
    topic = new_topic()
    first = await precreate(app, redis_server.url, topic, exit_grace_s=0.5)
    a = EventBusClient(app, "replica-a")
    b = EventBusClient(app, "replica-b")
    await a.start(redis_server.url, topic)
    await b.start(redis_server.url, topic)
    assert a.actor._actor_id == b.actor._actor_id == first._actor_id, "one actor per node"
    assert (await a.actor.stats.remote())["leases"] == 2

    await asyncio.gather(
        stream_tasks(a, "A", 3, range(20), complete=True),
        stream_tasks(b, "B", 3, range(20), complete=True),
    )
    await a.aclose()
    # Still leased by b: it keeps running past the grace.
    await asyncio.sleep(1.0)
    assert live_actor(app) is not None
    await b.aclose()
    await wait_for(lambda: live_actor(app) is None, 15.0, message="the actor exited")

    expected = [str(i) for i in range(20)] + ["done"]
    got = await read_stream(redis_server.url, topic + "inst:1")
    assert got == {f"{p}-{t}": expected for p in "AB" for t in range(3)}


async def test_actor_exits_when_its_only_lease_expires(app: str, redis_server: RedisServer) -> None:
    handle = await precreate(app, redis_server.url, new_topic(), exit_grace_s=0.2)
    assert await handle.lease.remote("gone-without-release", 0.5)
    assert live_actor(app) is not None
    await wait_for(lambda: live_actor(app) is None, 15.0, message="the actor exited")


class FlakyPublish:
    """``publish.remote`` failing transiently: every 3rd call before the actor sees it,
    every 3rd+1 call AFTER the actor applied it (the reply is lost). ``timeout`` mode hangs
    past the client's call timeout instead of raising ActorUnavailableError."""

    def __init__(self, real: Any, mode: str) -> None:
        self._real = real
        self._mode = mode
        self.calls = 0
        self.injected = 0

    def remote(self, *args: Any) -> Any:
        return self._call(*args)

    async def _call(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls % 3 == 0:
            self.injected += 1
            await self._fail("before")
        result = await self._real.remote(*args)
        if self.calls % 3 == 1:
            self.injected += 1
            await self._fail("after")
        return result

    async def _fail(self, when: str) -> None:
        from ray.exceptions import ActorUnavailableError

        if self._mode == "timeout":
            await asyncio.sleep(3600)
        raise ActorUnavailableError(f"injected {when} the call", None)


class FlakyHandle:
    def __init__(self, real: Any, mode: str) -> None:
        self._real = real
        self.publish = FlakyPublish(real.publish, mode)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize("mode", ["unavailable", "timeout"])
async def test_transient_errors_are_retried_on_the_same_actor_exactly_once(
    app: str, redis_server: RedisServer, mode: str
) -> None:
    topic = new_topic()
    await precreate(app, redis_server.url, topic)
    client = EventBusClient(app, "replica-flaky", call_timeout_s=0.5 if mode == "timeout" else 5)
    await client.start(redis_server.url, topic)
    real = client.actor
    flaky = FlakyHandle(real, mode)
    client._actor = flaky  # inject at the Ray hop; the client keeps using this handle

    tasks, events = 6, 40
    for start in range(0, events, 4):  # flushed rounds: many batches, so many injections
        await stream_tasks(client, "T", tasks, range(start, start + 4), complete=False)
        await client.flush()
    await stream_tasks(client, "T", tasks, range(0), complete=True)
    await client.flush()
    assert await real.flush.remote(10.0)

    assert flaky.publish.injected >= 6
    stats = client.stats()
    assert stats["transient_retries"] == flaky.publish.injected
    assert stats["reattached"] == 0
    assert stats["duplicates_acked"] >= 1, "a batch applied before its lost reply was resent"
    assert client.actor is flaky, "never re-resolved on a transient error"
    assert live_actor(app)._actor_id == real._actor_id, "no second actor"
    assert (await real.stats.remote())["duplicates"] == stats["duplicates_acked"]

    expected = [str(i) for i in range(events)] + ["done"]
    got = await read_stream(redis_server.url, topic + "inst:1")
    assert got == {f"T-{t}": expected for t in range(tasks)}, "no duplicate, no reorder"
    await client.aclose()


async def actor_pid(handle: Any) -> int:
    return cast(int, await handle.__ray_call__.remote(lambda _self: os.getpid()))


async def test_sigkilled_actor_is_recreated_and_the_stream_goes_on(
    app: str, redis_server: RedisServer
) -> None:
    topic = new_topic()
    await precreate(app, redis_server.url, topic)
    # Short leases: the renewals (every 0.2 s) bring the written mark while streams idle.
    client = EventBusClient(app, "replica-k", call_timeout_s=5.0, lease_ttl_s=0.6)
    await client.start(redis_server.url, topic)
    old = client.actor
    tasks = 4

    # Phase 1, acknowledged: accepted by the actor AND written to Redis, and the client
    # has heard so (the written mark covers every batch it sent).
    await stream_tasks(client, "K", tasks, range(10), complete=False)
    await client.flush()
    assert await old.flush.remote(10.0)
    await wait_for(
        lambda: client.stats()["written_mark"] == client.stats()["sent_batches"] > 0,
        15.0,
        message="the written mark came with a lease renewal",
    )
    # Phase 1b: buffered by the actor, never written (its Redis rounds hang from now on).
    await old.__ray_call__.remote(
        lambda p: setattr(p._publisher, "_write_round", asyncio.Event().wait)
    )
    await stream_tasks(client, "L", tasks, range(10), complete=False)
    await client.flush()

    # Mid-stream (no task completed yet), the actor process dies hard.
    os.kill(await actor_pid(old), signal.SIGKILL)
    await wait_for(lambda: live_actor(app) is None, 15.0, message="the old actor is gone")
    await client.check_health()  # notices the death and re-attaches

    # Phase 2: the client re-created the node's actor by name and carries on. Streams
    # whose events are all known written go on gapless and end [DONE] + 200; those that
    # may have lost events end with an error chunk and a 503 completion, never [DONE] +
    # 200 over a possible hole.
    await stream_tasks(client, "K", tasks, range(10, 20), complete=True)
    await stream_tasks(client, "L", tasks, range(10, 20), complete=True)
    await stream_tasks(client, "N", 1, range(5), complete=True)  # starts on the new actor
    await client.flush()
    new = live_actor(app)
    assert new is not None
    assert new._actor_id != old._actor_id
    assert client.actor._actor_id == new._actor_id
    stats = client.stats()
    assert stats["reattached"] == 1
    assert (stats["streams_kept"], stats["events_lost"]) == (tasks, tasks)
    assert await new.flush.remote(10.0)

    got = await read_stream(redis_server.url, topic + "inst:1")
    assert set(got) == {f"{p}-{t}" for p in "KL" for t in range(tasks)} | {"N-0"}
    for t in range(tasks):
        assert got[f"K-{t}"] == [str(i) for i in range(20)] + ["done"]
        assert got[f"L-{t}"] == ["10", "done"], "phase 1b was lost: an error chunk, a 503"
    assert got["N-0"] == ["0", "1", "2", "3", "4", "done"]
    await client.aclose()


async def test_sigkill_while_streaming_keeps_order(app: str, redis_server: RedisServer) -> None:
    """Kill while batches are in flight: what may go wrong is bounded and visible.

    Lost: entries the dead actor had buffered but not yet written to Redis (its publish
    had returned, so the client never resends them); so every stream it fed ends with an
    error chunk (after its last eventId) and one 503 completion. Never: reordering within a
    task, a second completion, or a missing one.
    """
    topic = new_topic()
    await precreate(app, redis_server.url, topic)
    client = EventBusClient(app, "replica-m", call_timeout_s=5.0)
    await client.start(redis_server.url, topic)
    old = client.actor
    pid = await actor_pid(old)
    tasks, events = 4, 300

    async def paced(t: int) -> None:
        for i in range(events):
            await client.progress("inst:1", f"M-{t}", str(i), "message", {"i": i})
            await asyncio.sleep(0.002)  # a token stream, so many batches are sent
        await client.completion("inst:1", f"M-{t}", DONE)

    async def killer() -> None:
        await wait_for(lambda: client.stats()["sent_batches"] >= 5, 15.0)
        os.kill(pid, signal.SIGKILL)

    await asyncio.gather(*(paced(t) for t in range(tasks)), killer())
    assert client.stats()["reattached"] == 1
    await client.flush()
    new = live_actor(app)
    assert new is not None
    assert new._actor_id != old._actor_id
    assert await new.flush.remote(10.0)

    got = await read_stream(redis_server.url, topic + "inst:1")
    assert set(got) == {f"M-{t}" for t in range(tasks)}
    for labels in got.values():
        assert labels[-1] == "done"
        assert labels.count("done") == 1
        first_seen = list(dict.fromkeys(labels[:-1]))
        assert first_seen == sorted(first_seen, key=int), "order kept within a task"
    # A stream with an event in a batch not known written ends with the error; one whose
    # events were all known written (a pause between tokens) goes on gapless.
    lost = client.stats()["events_lost"]
    assert 1 <= lost <= tasks
    whole = [str(i) for i in range(events)] + ["done"]
    assert sum(labels == whole for labels in got.values()) == tasks - lost
    await client.aclose()


async def test_a_dead_writer_loop_takes_its_actor_down(app: str, redis_server: RedisServer) -> None:
    """A broken actor must not linger: the next client gets a fresh one by name."""
    topic = new_topic()
    old = await precreate(app, redis_server.url, topic)
    # A bug in the writer's round (a lambda: pickled by value into the actor).
    await old.__ray_call__.remote(lambda p: setattr(p._publisher, "_write_round", None))
    client = EventBusClient(app, "replica-w", call_timeout_s=5.0)
    await client.start(redis_server.url, topic)
    await client.completion("inst:1", "W-1", DONE)  # kills the writer, then goes to a new one
    new = live_actor(app)
    assert new is not None
    assert new._actor_id != old._actor_id
    assert client.stats()["reattached"] == 1
    assert (await read_stream(redis_server.url, topic + "inst:1"))["W-1"] == ["done"]
    await client.aclose()


async def test_completion_returns_only_once_redis_acknowledged_it(app: str) -> None:
    """An answer counts as delivered when Redis has it: while Redis is down ``completion``
    waits (the task holds its slot); a completion given up after the outage limit raises."""
    from ray_worker.errors import EventsGivenUpError

    topic = new_topic()
    with RedisServer() as own:
        options = PublisherOptions(outage_timeout_s=3.0)
        await asyncio.to_thread(node_publisher, app, own.url, topic, options, exit_grace_s=0.5)
        client = EventBusClient(app, "replica-ack", options, call_timeout_s=5.0)
        await client.start(own.url, topic)

        await client.completion("inst:1", "ACK-1", DONE)
        assert await read_stream(own.url, topic + "inst:1") == {"ACK-1": ["done"]}

        own.kill()
        pending = asyncio.create_task(client.completion("inst:1", "ACK-2", DONE))
        await asyncio.sleep(1.0)
        assert not pending.done(), "buffered in the actor is not delivered"
        await asyncio.to_thread(own.start)
        await asyncio.wait_for(pending, 30)
        assert (await read_stream(own.url, topic + "inst:1"))["ACK-2"] == ["done"]

        own.kill()
        with pytest.raises(EventsGivenUpError):
            await asyncio.wait_for(client.completion("inst:1", "ACK-3", DONE), 60)
        stats = await client.actor.stats.remote()
        assert stats["dropped_completions"] == 1
        assert client.stats()["unconfirmed"] == 0
        await asyncio.to_thread(own.start)
        await client.aclose()
