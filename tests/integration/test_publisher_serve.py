"""RedisPublisher as a Ray Serve deployment, fed by PublisherClient through a handle.

Uses the session ``ray_cluster`` fixture when tests/conftest.py provides one, otherwise starts a
``LocalRayCluster`` for this module. The event-bus Redis is the session ``redis_server``; the
test uses its own topic and never flushes it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from ray_worker.protocol import CompletionEvent, ProgressEvent, decode_event
from ray_worker.publisher import PublisherClient, RedisPublisher
from ray_worker.testing.redis_server import RedisServer

pytestmark = pytest.mark.integration

ray_cluster_module = pytest.importorskip("ray_worker.testing.ray_cluster")


async def wait_for(condition: Callable[[], bool], within_s: float = 30.0) -> None:
    """Poll ``condition`` until true (fails the test after ``within_s``)."""
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - polling a plain predicate
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def serve_ready(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Ray driver connected to a local cluster, with Serve started without HTTP proxies."""
    own = None
    try:
        request.getfixturevalue("ray_cluster")
    except pytest.FixtureLookupError:
        own = ray_cluster_module.LocalRayCluster(num_cpus=2).start()
        own.connect()
    from ray import serve

    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        if own is not None:
            own.stop()


def by_task(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, fields in entries:
        event = decode_event(fields)
        assert event is not None
        label = event.event_id if isinstance(event, ProgressEvent) else "done"
        out.setdefault(event.task_id, []).append(label or "")
    return out


async def test_deployment_publishes_in_order_and_drains_on_delete(
    serve_ready: None, redis_server: RedisServer
) -> None:
    from ray import serve

    topic = f"redis-mesh:private-stream:serve-{uuid.uuid4().hex[:8]}:"
    app_name = f"publisher-{uuid.uuid4().hex[:8]}"
    # Serve's decorator hides .bind from the type checker.
    app = cast(Any, RedisPublisher).bind(redis_server.url, topic, {"max_buffered": 5000})
    handle = await asyncio.to_thread(serve.run, app, name=app_name, route_prefix=None)

    assert await handle.topic.remote() == topic
    client = PublisherClient(lambda batch: handle.publish.remote(batch), topic=topic)
    tasks, events = 8, 25

    async def stream(t: int) -> None:
        for i in range(events):
            await client.progress("inst:1", f"TASK-{t}", str(i), "message", {"i": i})
        await client.completion("inst:1", f"TASK-{t}", {"status_code": 200, "request_id": "r"})

    await asyncio.gather(*(stream(t) for t in range(tasks)))
    await client.flush()
    assert await handle.flush.remote(10.0)
    async with Redis.from_url(redis_server.url) as reader:
        entries = cast(Any, await reader.xrange(topic + "inst:1"))
    expected = [str(i) for i in range(events)] + ["done"]
    assert by_task(entries) == {f"TASK-{t}": expected for t in range(tasks)}
    stats = await handle.stats.remote()
    assert stats["configured"] is True
    assert stats["published"] == tasks * (events + 1)
    assert client.stats()["sent_batches"] < tasks * (events + 1), "the client coalesced"
    await handle.check_health.remote()

    # Events handed over just before the app is deleted are drained by __del__.
    await client.completion("inst:1", "TASK-LAST", {"status_code": 200})
    await asyncio.to_thread(serve.delete, app_name)
    async with Redis.from_url(redis_server.url) as reader:
        last = cast(Any, await reader.xrange(topic + "inst:1"))[-1][1]
    done = decode_event(last)
    assert isinstance(done, CompletionEvent)
    assert done.task_id == "TASK-LAST"
