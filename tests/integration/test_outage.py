"""Bella-Queue goes away while callback tasks run: every answer still arrives, exactly once.

Real redis-server, an emulator of this module's own (stopped and started again on the same
port and instance id; its queue state lives in Redis and survives), local Ray Serve and the
simulated engine. Answers are counted where they land: the emulator POSTs a task's callback
when it receives the task's complete, and only for the first complete (a repeated complete is
a no-op on the server, §1.5), so one body per task at the callback receiver means one
complete took effect and none was lost.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY, emulator_server
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.serve_run import deployed_worker, worker_running
from ray_worker.testing.waiting import wait_for
from ray_worker.testing.worker_args import sim_worker_args

MODEL = "sim-model"
TASKS_PER_LEVEL = 4


def _app_args(queue_url: str, queue: str, backoff_max_s: float) -> dict[str, Any]:
    return sim_worker_args(
        queue_url,
        queue,
        model=MODEL,
        sim={"max_num_seqs": 16, "ttft_s": 0.05, "tokens_per_s": 40, "max_model_len": 8192},
        poller={"error_backoff_max_s": 1.0},
        dispatcher={
            "complete_backoff_initial_s": min(0.2, backoff_max_s),
            "complete_backoff_max_s": backoff_max_s,
        },
    )


@pytest.fixture(scope="module")
def own_emulator(redis_server: RedisServer) -> Iterator[EmulatorServer]:
    """An emulator only this module stops (the session's one serves the other modules)."""
    with emulator_server(redis_server.url, "outage") as server:
        yield server


@pytest.fixture
async def client(own_emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(own_emulator.url, EMULATOR_APIKEY) as c:
        yield c


async def _status(handle: Any) -> dict[str, Any]:
    status: dict[str, Any] = await handle.status.remote()
    return status


async def _outage_run(
    handle: Any,
    emulator: EmulatorServer,
    client: QueueClient,
    receiver: CallbackReceiver,
    queue: str,
    down_s: float,
) -> dict[str, Any]:
    """Put callback tasks of both levels, stop Bella-Queue while they generate, keep it down
    ``down_s``, start it again; assert one callback per task. Returns figures seen."""
    await worker_running(handle)
    ids = []
    for level in (0, 1):
        for _ in range(TASKS_PER_LEVEL):
            request = PutRequest(
                endpoint="/v1/chat/completions",
                queue=queue,
                level=level,
                response_mode=ResponseMode.CALLBACK,
                callback_url=receiver.url,
                # About 2 s of generation: the tasks are running when the server goes.
                data={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 80,
                },
                timeout=600,
            )
            ids.append(await client.put(request))

    async def generating() -> bool:
        status = await _status(handle)
        return bool(status["pools"][0]["capacity"]["engine_running"] >= 2)

    await wait_for(generating, timeout=60, interval=0.05, message="tasks generating")
    await asyncio.to_thread(emulator.stop)
    stopped_at = time.monotonic()

    async def held_in_outbox() -> dict[str, Any] | None:
        outbox = (await _status(handle))["pools"][0]["outbox"]
        return outbox if outbox.get("outbox_entries", 0) >= 1 else None

    during = await wait_for(held_in_outbox, timeout=30, interval=0.2, message="answers held")
    await asyncio.sleep(max(0.0, down_s - (time.monotonic() - stopped_at)))
    await asyncio.to_thread(emulator.start)

    async def all_called_back() -> bool:
        got = {b.get("request_id") for b in receiver.bodies() if isinstance(b, dict)}
        return set(ids) <= got

    await wait_for(all_called_back, timeout=90, interval=0.2, message="every callback")
    await asyncio.sleep(2.0)  # a duplicate would show up meanwhile
    bodies = [b for b in receiver.bodies() if isinstance(b, dict)]
    counts = Counter(b.get("request_id") for b in bodies)
    assert {i: counts[i] for i in ids} == dict.fromkeys(ids, 1)
    assert all(b.get("status_code") == 200 for b in bodies if b.get("request_id") in ids)

    async def drained() -> dict[str, Any] | None:
        outbox = (await _status(handle))["pools"][0]["outbox"]
        return outbox if outbox.get("outbox_entries") == 0 else None

    after = await wait_for(drained, timeout=10, interval=0.2, message="outbox empty")
    assert after["complete_given_up"] == 0
    assert after["complete_retries"] > 0
    return {"during": during, "after": after}


async def test_a_30_s_outage_loses_no_callback_answer(
    ray_serve: Any,
    own_emulator: EmulatorServer,
    client: QueueClient,
    receiver: CallbackReceiver,
) -> None:
    """Down for 30 s in real time, twice the old ~15 s retry budget, with a 1 s backoff cap:
    as many retry rounds per answer as the 60 s at a 2 s cap this test ran before (the
    compressed test below goes through hundreds)."""
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    args = _app_args(own_emulator.url, queue, backoff_max_s=1.0)
    with deployed_worker(args, "worker-outage-30s", EMULATOR_APIKEY) as handle:
        figures = await _outage_run(handle, own_emulator, client, receiver, queue, down_s=30)
    # 8 answers retried for half a minute at <= 1 s apart: many retries each.
    assert figures["after"]["complete_retries"] >= 8 * 10, figures


async def test_a_compressed_10_minute_outage_loses_no_callback_answer(
    ray_serve: Any,
    own_emulator: EmulatorServer,
    client: QueueClient,
    receiver: CallbackReceiver,
) -> None:
    """A 10-minute outage, compressed in time: what matters for the outbox is how many retry
    rounds an answer goes through (and that it is never given up while its task is alive),
    not the wall-clock length. At the default 10 s backoff cap a 10-minute outage is about
    60 rounds per answer; with the cap at 0.05 s, 20 s of outage is about 400 rounds, so
    every answer goes through more rounds than in the real 10 minutes. The tasks' own
    lifetimes (timeout=600) are not compressed: expiry is tested in the unit tests."""
    queue = f"outage10-{uuid.uuid4().hex[:8]}"
    args = _app_args(own_emulator.url, queue, backoff_max_s=0.05)
    with deployed_worker(args, "worker-outage-10min", EMULATOR_APIKEY) as handle:
        figures = await _outage_run(handle, own_emulator, client, receiver, queue, down_s=20)
    assert figures["after"]["complete_retries"] >= 8 * 60, figures
