"""RedisPublisher as a Ray actor, fed by PublisherClient, on the session's Ray and Redis.

The test uses its own topic and never flushes the shared Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from ray_worker.bella.protocol import CompletionEvent, ProgressEvent, decode_event
from ray_worker.eventbus.publisher import PublisherClient, PublisherOptions, start_publisher_actor
from ray_worker.testing.redis_server import RedisServer

pytestmark = pytest.mark.integration


def by_task(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, fields in entries:
        event = decode_event(fields)
        assert event is not None
        label = event.event_id if isinstance(event, ProgressEvent) else "done"
        out.setdefault(event.task_id, []).append(label or "")
    return out


async def test_actor_publishes_in_order_and_drains_on_close(
    ray_serve: Any, redis_server: RedisServer
) -> None:
    import ray

    topic = f"redis-mesh:private-stream:actor-{uuid.uuid4().hex[:8]}:"
    actor = start_publisher_actor(redis_server.url, topic, PublisherOptions(max_buffered=5000))
    try:
        assert await actor.topic.remote() == topic
        client = PublisherClient(lambda batch: actor.publish.remote(batch), topic=topic)
        tasks, events = 8, 25

        async def stream(t: int) -> None:
            for i in range(events):
                await client.progress("inst:1", f"TASK-{t}", str(i), "message", {"i": i})
            await client.completion("inst:1", f"TASK-{t}", {"status_code": 200, "request_id": "r"})

        await asyncio.gather(*(stream(t) for t in range(tasks)))
        await client.flush()
        assert await actor.flush.remote(10.0)
        async with Redis.from_url(redis_server.url) as reader:
            entries = cast(Any, await reader.xrange(topic + "inst:1"))
        expected = [str(i) for i in range(events)] + ["done"]
        assert by_task(entries) == {f"TASK-{t}": expected for t in range(tasks)}
        stats = await actor.stats.remote()
        assert stats["configured"] is True
        assert stats["published"] == tasks * (events + 1)
        assert client.stats()["sent_batches"] < tasks * (events + 1), "the client coalesced"
        await actor.check_health.remote()

        # Events handed over just before close are drained by aclose().
        await client.completion("inst:1", "TASK-LAST", {"status_code": 200})
        await actor.aclose.remote()
        async with Redis.from_url(redis_server.url) as reader:
            last = cast(Any, await reader.xrange(topic + "inst:1"))[-1][1]
        done = decode_event(last)
        assert isinstance(done, CompletionEvent)
        assert done.task_id == "TASK-LAST"
    finally:
        ray.kill(actor)
