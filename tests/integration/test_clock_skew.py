"""A Bella-Queue whose clock is 5 minutes off the worker's: deadlines still hold.

The emulator runs with ``clock_offset_s`` ±300: its task timestamps (``start_time``,
``expire_time``), its redelivery timers and its ``Date`` header all show its own clock. The
worker (local Ray Serve, simulated engine, real Redis) measures the offset from the ``Date``
headers and compares deadlines on the server's clock. Without that, a server 5 minutes
behind would have every online task refused 408 at once, and one 5 minutes ahead would let
expired work run on.
"""

from __future__ import annotations

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
SKEW_S = 300


@pytest.fixture(params=[SKEW_S, -SKEW_S], ids=["server-ahead", "server-behind"])
def skewed_emulator(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> Iterator[EmulatorServer]:
    profile = f"skew{request.param_index}"
    with emulator_server(redis_server.url, profile, clock_offset_s=request.param) as server:
        yield server


@pytest.fixture
async def client(skewed_emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(skewed_emulator.url, EMULATOR_APIKEY) as c:
        yield c


def _chat(max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }


async def test_online_tasks_are_served_and_expired_work_is_stopped_under_clock_skew(
    skewed_emulator: EmulatorServer, client: QueueClient, unique_queue: str
) -> None:
    skew_s = skewed_emulator.config.clock_offset_s
    queue = unique_queue
    args = sim_worker_args(
        skewed_emulator.url,
        queue,
        model=MODEL,
        sim={"max_num_seqs": 8, "ttft_s": 0.05, "tokens_per_s": 20, "max_model_len": 8192},
    )
    name = f"skew-{'ahead' if skew_s > 0 else 'behind'}"
    with CallbackReceiver() as receiver, deployed_worker(args, name, EMULATOR_APIKEY) as handle:
        status = await worker_running(handle)
        # The poller measured the server's clock (Date headers have one-second resolution).
        assert abs(status["clock_offset_ms"] - skew_s * 1000) <= 2000, status["clock_offset_ms"]

        # Online tasks with a 60 s lifetime on the server's clock: answered, not 408.
        blocking = await client.put_blocking(
            PutRequest(
                endpoint="/v1/chat/completions",
                queue=queue,
                response_mode=ResponseMode.BLOCKING,
                data=_chat(8),
                timeout=60,
            )
        )
        assert blocking.status_code == 200, blocking
        assert blocking.body["choices"][0]["message"]["content"]

        events = [
            event
            async for event in client.put_streaming(
                PutRequest(
                    endpoint="/v1/chat/completions",
                    queue=queue,
                    response_mode=ResponseMode.STREAMING,
                    data={**_chat(8), "stream": True},
                    timeout=60,
                )
            )
        ]
        assert [e.data for e in events][-1:] == ["[DONE]"], events[-3:]
        assert not any('"error"' in e.data for e in events), events

        # A callback task that outlives its 4 s lifetime (~200 tokens at 20/s take 10 s):
        # stopped at its expire_time on the server's clock (a complete after that is ignored
        # by the server, §1.5). On the worker's own clock it would have 5 more minutes
        # (server ahead): it would run to the end and answer 200.
        def callback(max_tokens: int, lifetime_s: int) -> PutRequest:
            return PutRequest(
                endpoint="/v1/chat/completions",
                queue=queue,
                level=0,
                response_mode=ResponseMode.CALLBACK,
                callback_url=receiver.url,
                data=_chat(max_tokens),
                timeout=lifetime_s,
            )

        expiring = await client.put(callback(200, 4))
        # One with time enough is answered 200 (server behind: not refused at once).
        lasting = await client.put(callback(4, 120))

        def called_back() -> dict[str, int] | None:
            found = {b.get("request_id"): b for b in receiver.bodies() if isinstance(b, dict)}
            return (
                {t: int(b["status_code"]) for t, b in found.items()} if lasting in found else None
            )

        assert await wait_for(called_back, timeout=60, interval=0.2) == {lasting: 200}

        async def cut_short() -> dict[str, Any] | None:
            status: dict[str, Any] = await handle.status.remote()
            idle = status["pools"][0]["capacity"]["engine_running"] == 0
            return status if idle and sum(status["answered"].values()) == 4 else None

        status = await wait_for(cut_short, timeout=60, interval=0.2)
        # Stopped by its deadline (408), not run to the end (200).
        assert status["answered"] == {"2xx": 3, "4xx": 1, "5xx": 0}, status["answered"]
        # The measured offset is good to about a second (Date headers), so the 408 may
        # reach the server just before its own expiry: then it is the callback's answer.
        late = [b for b in receiver.bodies() if b.get("request_id") == expiring]
        assert [b["status_code"] for b in late] in ([], [408]), late
