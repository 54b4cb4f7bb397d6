"""The event bus fails under running online tasks: every producer still gets one answer.

Real redis-server (this module's own: one test stops it, and it comes back empty), an
emulator on it, local Ray Serve and the simulated engine, one deployed worker for both
tests. Answers are read where producers see them (the SSE stream, the blocking answer)
and, for completions, in the Redis stream itself (the producer's view stops at the first).

- The node's publisher actor is SIGKILLed while streaming and blocking tasks generate: a
  stream that may have lost events (one in a batch the dead actor had not written yet)
  ends with an ``events_lost`` error chunk and a 503 completion, never ``[DONE]`` over a
  hole; one whose events were all written goes on through the new actor and ends
  ``[DONE]`` + 200. The streams are slow (4 tokens/s) and started apart, so at the kill
  most of them are between tokens with everything written, and a few are not.
- Redis stays down past ``publisher.outage_timeout_s``, so the tasks are given up whole,
  then comes back empty: every task still waiting is answered 503 ``events_lost``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import CompletionEvent, PutRequest, ResponseMode, decode_event
from ray_worker.emulator.server import EmulatorServer
from ray_worker.eventbus.shared import PUBLISHER_NAMESPACE
from ray_worker.testing.emulator import EMULATOR_APIKEY, emulator_server
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.serve_run import deployed_worker, worker_running
from ray_worker.testing.waiting import wait_for
from ray_worker.testing.worker_args import sim_worker_args

MODEL = "sim-model"
APP = "worker-publisher-faults"
OUTAGE_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server.start()


@pytest.fixture(scope="module")
def own_emulator(own_redis: RedisServer) -> Iterator[EmulatorServer]:
    with emulator_server(own_redis.url, "pubfaults") as server:
        yield server


@pytest.fixture(scope="module")
def worker(ray_serve: Any, own_emulator: EmulatorServer, queue: str) -> Iterator[Any]:
    args = sim_worker_args(
        own_emulator.url,
        queue,
        model=MODEL,
        sim={"max_num_seqs": 32, "ttft_s": 0.05, "tokens_per_s": 4, "max_model_len": 8192},
        publisher={"outage_timeout_s": OUTAGE_TIMEOUT_S, "backoff_max_s": 0.2},
    )
    with deployed_worker(args, APP, EMULATOR_APIKEY) as handle:
        yield handle


@pytest.fixture
async def client(own_emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(own_emulator.url, EMULATOR_APIKEY) as c:
        yield c


def _put(queue: str, mode: ResponseMode, max_tokens: int) -> PutRequest:
    return PutRequest(
        endpoint="/v1/chat/completions",
        queue=queue,
        response_mode=mode,
        data={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
        },
        timeout=120,
    )


async def _events(client: QueueClient, request: PutRequest) -> list[Any]:
    return [event async for event in client.put_streaming(request)]


async def _engine_running(handle: Any, at_least: int) -> None:
    async def running() -> bool:
        status = await handle.status.remote()
        return bool(status["pools"][0]["capacity"]["engine_running"] >= at_least)

    await wait_for(running, timeout=60, interval=0.05, message=f"{at_least} tasks generating")


def _publisher_pid() -> int:
    """The pid of this app's publisher actor (one node: one actor)."""
    import ray

    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == PUBLISHER_NAMESPACE and a["name"].startswith(f"event-publisher:{APP}:")
    ]
    handle = ray.get_actor(name, namespace=PUBLISHER_NAMESPACE)
    pid: Any = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=10)
    return int(pid)


async def _completions(url: str, stream: str, after: str) -> dict[str, list[int]]:
    """Per task: the status codes of its completion events after entry ``after``."""
    async with Redis.from_url(url) as redis:
        entries = cast("list[Any]", await redis.xrange(stream, min=f"({after}"))
    out: dict[str, list[int]] = {}
    for _, fields in entries:
        event = decode_event(fields)
        if isinstance(event, CompletionEvent):
            out.setdefault(event.task_id, []).append(int(event.result.get("status_code", 200)))
    return out


async def _last_id(url: str, stream: str) -> str:
    async with Redis.from_url(url) as redis:
        last = cast("list[Any]", await redis.xrevrange(stream, count=1))
    return last[0][0].decode() if last else "0-0"


def _ends_in_events_lost(events: list[Any]) -> bool:
    """The stream ends with the ``events_lost`` error chunk, whose id follows every other
    one, and never said ``[DONE]``."""
    ids = [int(e.id) for e in events]
    return (
        bool(events)
        and '"events_lost"' in events[-1].data
        and all(e.data != "[DONE]" for e in events)
        and ids[-1] > max(ids[:-1], default=-1)
    )


def _gapless(events: list[Any]) -> bool:
    return events[-1].data == "[DONE]" and [int(e.id) for e in events] == list(range(len(events)))


async def test_a_sigkilled_publisher_gives_each_task_one_answer_200_only_when_gapless(
    worker: Any,
    client: QueueClient,
    queue: str,
    own_emulator: EmulatorServer,
    own_redis: RedisServer,
) -> None:
    await worker_running(worker)
    stream = own_emulator.topic + own_emulator.instance_id
    start = await _last_id(own_redis.url, stream)
    # Short streams that finish before the kill: gapless, [DONE] + 200.
    done_before = await asyncio.gather(
        *(_events(client, _put(queue, ResponseMode.STREAMING, 2)) for _ in range(4))
    )
    # 16 tokens at 4/s: about 4 s of generation, so these run when the actor dies. Put
    # apart (the poller takes them one by one), their tokens come at different moments.
    streams = []
    for _ in range(12):
        streams.append(
            asyncio.create_task(_events(client, _put(queue, ResponseMode.STREAMING, 16)))
        )
        await asyncio.sleep(0.04)
    blocking = [
        asyncio.create_task(client.put_blocking(_put(queue, ResponseMode.BLOCKING, 16)))
        for _ in range(12)
    ]
    await _engine_running(worker, 24)
    await asyncio.sleep(0.6)  # the streams are past their first chunks
    os.kill(await asyncio.to_thread(_publisher_pid), signal.SIGKILL)

    results = await asyncio.wait_for(asyncio.gather(*streams, *blocking), 120)
    cut = results[:12]
    for events in done_before:
        assert _gapless(events), [e.data for e in events]
    # A stream whose events all reached Redis carries on through the new actor, gapless;
    # one that had an event the dead actor had not written ends with the error.
    kept = [events for events in cut if _gapless(events)]
    for events in cut:
        assert _gapless(events) or _ends_in_events_lost(events), [e.data for e in events]
    assert kept, "no stream carried on through the new publisher"
    for answer in results[12:]:
        # Blocking tasks answer at the end, to the new actor (or are resent to it).
        assert answer.status_code == 200, answer

    # One completion per task in the stream; 200 only for the gapless streams.
    completions = await _completions(own_redis.url, stream, start)
    assert len(completions) == 4 + 12 + 12, completions
    assert all(len(codes) == 1 for codes in completions.values()), completions
    statuses = sorted(codes[0] for codes in completions.values())
    assert statuses == [200] * (4 + len(kept) + 12) + [503] * (12 - len(kept))

    # The worker goes on with a fresh publisher.
    after = await client.put_blocking(_put(queue, ResponseMode.BLOCKING, 5))
    assert after.status_code == 200


async def test_a_redis_outage_past_the_give_up_limit_still_answers_every_task(
    worker: Any,
    client: QueueClient,
    queue: str,
    own_emulator: EmulatorServer,
    own_redis: RedisServer,
) -> None:
    """Runs last: the restarted Redis is empty (no persistence), the queues included."""
    await worker_running(worker)
    # 20 tokens at 4/s: about 5 s; Redis is down from ~0.5 s to ~7.5 s, so every task's
    # events, blocking completions included, wait past the give-up limit and are given up.
    streams = [
        asyncio.create_task(_events(client, _put(queue, ResponseMode.STREAMING, 20)))
        for _ in range(6)
    ]
    blocking = [
        asyncio.create_task(client.put_blocking(_put(queue, ResponseMode.BLOCKING, 20)))
        for _ in range(6)
    ]
    await _engine_running(worker, 12)
    await asyncio.sleep(0.5)
    own_redis.kill()

    await asyncio.sleep(7.0)
    await asyncio.to_thread(own_redis.start)  # empty: no persistence

    results = await asyncio.wait_for(asyncio.gather(*streams, *blocking), 90)
    for events in results[:6]:
        assert _ends_in_events_lost(events), [e.data for e in events]
    for answer in results[6:]:
        assert answer.status_code == 503, answer
        assert answer.body["error"]["code"] == "events_lost"

    # Nothing is wedged: with the queues registered again, tasks are answered 200.
    await client.register(queue, "/v1/chat/completions")
    after = await asyncio.wait_for(client.put_blocking(_put(queue, ResponseMode.BLOCKING, 5)), 60)
    assert after.status_code == 200
