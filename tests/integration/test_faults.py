"""Faults that kill a process of the worker while tasks run: nothing lost, nothing doubled.

Real redis-server, the emulator, local Ray Serve and the simulated engine. Each answer is
counted where it lands: completion events are read back from the Redis stream itself (the
producer's view stops at the first), HTTP completes at the callback receiver.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.event_stream import completions_after, last_entry_id
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.serve_run import deployed_worker, worker_running
from ray_worker.testing.waiting import wait_for
from ray_worker.testing.worker_args import sim_worker_args

MODEL = "sim-model"
APP = "worker-faults"


def _app_args(queue_url: str, queue: str) -> dict[str, Any]:
    return sim_worker_args(
        queue_url,
        queue,
        model=MODEL,
        sim={"max_num_seqs": 16, "ttft_s": 0.05, "tokens_per_s": 40, "max_model_len": 8192},
        poller={"process_timeout_s": 60, "process_max_retries": 1},
    )


@pytest.fixture(scope="module")
def worker(ray_serve: Any, emulator: EmulatorServer, queue: str) -> Iterator[Any]:
    with deployed_worker(_app_args(emulator.url, queue), APP, EMULATOR_APIKEY) as handle:
        yield handle


def _pids(deployment: str) -> list[int]:
    """Pids of the live replicas of ``deployment`` (Serve names its replica actors
    ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    pids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if not actor["name"].startswith(prefix):
            continue
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        try:
            pids.append(int(ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=10)))
        except Exception:  # dying: not live
            continue
    return pids


def _chat(max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }


def _put(queue: str, mode: ResponseMode, max_tokens: int, **kw: Any) -> PutRequest:
    return PutRequest(
        endpoint="/v1/chat/completions",
        queue=queue,
        response_mode=mode,
        data=_chat(max_tokens),
        timeout=120,
        **kw,
    )


async def _engine_running(handle: Any, at_least: int) -> None:
    async def running() -> bool:
        status = await handle.status.remote()
        return bool(status["pools"][0]["capacity"]["engine_running"] >= at_least)

    await wait_for(running, timeout=60, interval=0.05, message=f"{at_least} tasks generating")


async def _mixed_burst(
    client: QueueClient, queue: str, receiver: CallbackReceiver, max_tokens: int
) -> tuple[list[asyncio.Task[Any]], list[asyncio.Task[Any]], list[str]]:
    streams = [
        asyncio.create_task(_events(client, _put(queue, ResponseMode.STREAMING, max_tokens)))
        for _ in range(3)
    ]
    blocking = [
        asyncio.create_task(client.put_blocking(_put(queue, ResponseMode.BLOCKING, max_tokens)))
        for _ in range(3)
    ]
    callbacks = [
        await client.put(
            _put(queue, ResponseMode.CALLBACK, max_tokens, level=i % 2, callback_url=receiver.url)
        )
        for i in range(3)
    ]
    return streams, blocking, callbacks


async def _events(client: QueueClient, request: PutRequest) -> list[Any]:
    return [event async for event in client.put_streaming(request)]


async def test_poller_sigkill_loses_and_doubles_nothing(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    await worker_running(worker)
    stream = emulator.topic + emulator.instance_id
    start = await last_entry_id(redis_server.url, stream)
    (poller,) = _pids("QueuePoller")
    # 120 tokens at 40/s: about 3 s of generation, so every task runs when the poller dies.
    streams, blocking, callbacks = await _mixed_burst(client, queue, receiver, 120)
    await _engine_running(worker, 9)
    os.kill(poller, signal.SIGKILL)

    results = await asyncio.wait_for(asyncio.gather(*streams, *blocking), 120)
    for events in results[:3]:
        assert events[-1].data == "[DONE]"
        assert [int(e.id) for e in events[:-1]] == list(range(len(events) - 1))
    for answer in results[3:]:
        assert answer.status_code == 200
    for task_id in callbacks:
        answers = await wait_for(lambda t=task_id: receiver.answers(t), timeout=60, interval=0.1)
        assert [a["status_code"] for a in answers] == [200]

    # A new poller replica took over, and takes and answers new tasks.
    await worker_running(worker)
    assert _pids("QueuePoller") != [poller]
    after = await client.put_blocking(_put(queue, ResponseMode.BLOCKING, 5))
    assert after.status_code == 200

    # Exactly once: one completion per online task in the stream, one complete per callback.
    completions = await completions_after(redis_server.url, stream, start)
    assert len(completions) == 7, completions  # 3 streaming, 3 blocking, 1 after the restart
    assert set(completions.values()) == {1}, completions
    await asyncio.sleep(1.0)  # a late duplicate complete would have arrived by now
    for task_id in callbacks:
        assert len(receiver.answers(task_id)) == 1


async def test_llm_replica_sigkill_gives_each_task_one_answer(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    await worker_running(worker)
    stream = emulator.topic + emulator.instance_id
    start = await last_entry_id(redis_server.url, stream)
    (replica,) = _pids(MODEL)
    streams, blocking, callbacks = await _mixed_burst(client, queue, receiver, 200)
    await _engine_running(worker, 9)
    await asyncio.sleep(0.5)  # the streams are past their first chunks
    os.kill(replica, signal.SIGKILL)

    results = await asyncio.wait_for(asyncio.gather(*streams, *blocking), 150)
    for events in results[:3]:
        # Cut mid-way: the chunks that got out, then the poller's error chunk; never [DONE].
        assert events, "a stream got no event at all"
        assert events[-1].data != "[DONE]"
        assert '"replica_failed"' in events[-1].data
    for answer in results[3:]:
        # Blocking tasks had sent nothing: they ran again on the new replica.
        assert answer.status_code == 200
    for task_id in callbacks:
        answers = await wait_for(lambda t=task_id: receiver.answers(t), timeout=90, interval=0.1)
        assert [a["status_code"] for a in answers] == [200]

    # The deployment serves again.
    await worker_running(worker)
    assert _pids(MODEL) != [replica]
    after = await client.put_blocking(_put(queue, ResponseMode.BLOCKING, 5))
    assert after.status_code == 200
    completions = await completions_after(redis_server.url, stream, start)
    assert len(completions) == 7, completions
    assert set(completions.values()) == {1}, completions
    await asyncio.sleep(1.0)
    for task_id in callbacks:
        assert len(receiver.answers(task_id)) == 1
