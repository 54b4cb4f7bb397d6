"""Capacity-aware pulling and backlog autoscaling: the whole worker under local Ray Serve.

The simulated engine (8 sequences a replica, about one second a task) stands in for vLLM and the
emulator for Bella-Queue. One module-scoped deployment (1 to 4 replicas) gets a burst of a few
hundred offline callback tasks while a sampler records ``status()`` every 0.2 s; the tests then
check, each on its own, that an online task put during the backlog is answered while hundreds
of offline tasks still wait, that Serve sizes the deployment up to ``max_replicas`` and the
extra replicas serve, that the worker never holds more than its replicas' targets, and that
the deployment shrinks back to ``min_replicas`` once idle. A second deployment allowed to scale
to zero is woken by a task, stays up while its answer waits for Bella-Queue (completes refused
for a while), and goes back to zero once it is delivered.

Bounds on time are generous multiples of the configured delays (two shared cores; a simulated
replica still imports ``ray.serve.llm`` and takes 10-30 s to start).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.serve_run import deployed_worker
from ray_worker.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

MODEL = "sim-autoscale"
ZERO_MODEL = "sim-zero"
MAX_NUM_SEQS = 8
TARGET_RATIO = 1.25
PER_REPLICA = math.ceil(MAX_NUM_SEQS * TARGET_RATIO)  # 10 tasks held per replica
MIN_REPLICAS, MAX_REPLICAS = 1, 4
UPSCALE_DELAY_S, DOWNSCALE_DELAY_S = 1.0, 4.0
LOOK_BACK_S, METRICS_INTERVAL_S = 2.0, 0.5
LOAD_STALE_AFTER_S = 5.0
BURST = 300
TASK_TOKENS = 20  # at 20 tokens/s: about one second a task, 8 tasks/s per replica
STARTUP_S = 150.0
"""A replica start (imports, placement) on a loaded 2-core machine: not part of the spec."""


def _llm_config(model: str, autoscaling: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_loading_config": {"model_id": model, "model_source": model},
        "accelerator_config": {"kind": "cpu"},
        "experimental_configs": {
            "bella_sim_engine": {
                "max_num_seqs": MAX_NUM_SEQS,
                "ttft_s": 0.05,
                "tokens_per_s": 20,
                "max_tokens": TASK_TOKENS,
            }
        },
        "deployment_config": {
            "ray_actor_options": {"num_cpus": 0.05},
            "autoscaling_config": {
                "look_back_period_s": LOOK_BACK_S,
                "metrics_interval_s": METRICS_INTERVAL_S,
                **autoscaling,
            },
        },
    }


def _app_args(queue_url: str, queue: str, llm_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0", f"{queue}:1"],
        "register_queues": True,
        "engine": "simulated",
        "capacity": {"target_ratio": TARGET_RATIO, "load_stale_after_s": LOAD_STALE_AFTER_S},
        "llm_configs": [llm_config],
    }


def _serve_replicas(app: str, deployment: str) -> dict[str, int]:
    """Serve's replica states of a deployment, e.g. ``{"RUNNING": 1, "STARTING": 3}``."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    states = status.deployments[deployment].replica_states
    return {str(getattr(k, "value", k)): int(v) for k, v in states.items()}


def _pool(status: dict[str, Any]) -> dict[str, Any]:
    pool: dict[str, Any] = status["pools"][0]
    return pool


def _chat(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"task {i}"}],
        "max_tokens": TASK_TOKENS,
    }


@dataclass
class Sample:
    """One ``status()`` reading."""

    at: float
    in_flight: int
    replicas: int
    target: int
    engine_running: int
    engine_waiting: int
    backlog: int


@dataclass
class Burst:
    """The shared scenario: a deployment, the offline tasks put, and what the sampler saw."""

    handle: Any
    app: str
    queue: str
    receiver: CallbackReceiver
    task_ids: set[str] = field(default_factory=set)
    samples: list[Sample] = field(default_factory=list)
    serve_counts: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def answered(self) -> set[str]:
        bodies = self.receiver.bodies()
        return {str(b.get("request_id")) for b in bodies if isinstance(b, dict)} & self.task_ids

    async def put_offline(self, client: QueueClient, n: int) -> None:
        requests = [
            PutRequest(
                endpoint="/v1/chat/completions",
                queue=self.queue,
                response_mode=ResponseMode.CALLBACK,
                level=1,
                callback_url=self.receiver.url,
                timeout=900,
                data=_chat(i),
            )
            for i in range(n)
        ]
        for chunk in range(0, n, 25):
            ids = await asyncio.gather(*(client.put(r) for r in requests[chunk : chunk + 25]))
            self.task_ids.update(ids)


async def _sample(burst: Burst) -> None:
    last_serve = 0.0
    while True:
        with contextlib.suppress(Exception):
            status = await burst.handle.status.remote()
            pool = _pool(status)
            cap = pool["capacity"]
            burst.samples.append(
                Sample(
                    at=time.monotonic(),
                    in_flight=int(status["in_flight"]),
                    replicas=int(cap["replicas"]),
                    target=int(cap["target"]),
                    engine_running=int(cap["engine_running"]),
                    engine_waiting=int(cap["engine_waiting"]),
                    backlog=int(pool["backlog"]),
                )
            )
            if time.monotonic() - last_serve >= 0.5:
                last_serve = time.monotonic()
                counts = _serve_replicas(burst.app, MODEL)
                burst.serve_counts.append((last_serve, counts))
        await asyncio.sleep(0.2)


async def _running(handle: Any, *, replicas: int) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        status: dict[str, Any] = await handle.status.remote()
        if status["state"] == "running" and _pool(status)["capacity"]["replicas"] >= replicas:
            return status
        return None

    return await wait_for(ready, timeout=STARTUP_S, interval=0.25, message="worker running")


@pytest.fixture(scope="module")
def receiver() -> Iterator[CallbackReceiver]:
    with CallbackReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def scaled_app(ray_serve: Any, emulator: EmulatorServer) -> Iterator[tuple[Any, str, str]]:
    queue = f"as-{uuid.uuid4().hex[:8]}"
    autoscaling = {
        "min_replicas": MIN_REPLICAS,
        "max_replicas": MAX_REPLICAS,
        "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": DOWNSCALE_DELAY_S,
    }
    args = _app_args(emulator.url, queue, _llm_config(MODEL, autoscaling))
    with deployed_worker(args, "autoscale-sim", EMULATOR_APIKEY) as handle:
        yield handle, "autoscale-sim", queue


@pytest.fixture(scope="module")
async def burst(
    scaled_app: tuple[Any, str, str], emulator: EmulatorServer, receiver: CallbackReceiver
) -> AsyncIterator[Burst]:
    handle, app, queue = scaled_app
    await _running(handle, replicas=MIN_REPLICAS)
    scenario = Burst(handle, app, queue, receiver)
    sampler = asyncio.create_task(_sample(scenario))
    try:
        async with QueueClient(emulator.url, EMULATOR_APIKEY) as client:
            await scenario.put_offline(client, BURST)
        yield scenario
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


async def _pending(client: QueueClient, full_queue: str) -> int:
    stats = await client.stats(full_queue)
    return int(stats.get("pending", 0))


async def test_online_task_is_answered_while_offline_tasks_wait(
    burst: Burst, client: QueueClient
) -> None:
    offline = f"{burst.queue}:1"
    if await _pending(client, offline) < 150:  # keep the test meaningful if it runs late
        await burst.put_offline(client, 200)
    put_at = time.monotonic()
    result = await client.put_blocking(
        PutRequest(
            endpoint="/v1/chat/completions",
            queue=burst.queue,
            response_mode=ResponseMode.BLOCKING,
            data={"model": MODEL, "messages": [{"role": "user", "content": "now"}]},
            timeout=120,
        )
    )
    answered_in = time.monotonic() - put_at
    waiting = await _pending(client, offline)
    assert result.status_code == 200
    assert waiting >= 100, "the online task should not have waited for the offline backlog"
    # Bounded by a slot freeing up (a one-second task) plus a take: generously, 30 s.
    assert answered_in < 30


async def test_replicas_grow_to_max_under_backlog(burst: Burst) -> None:
    def serve_target() -> int:
        counts = _serve_replicas(burst.app, MODEL)
        return counts.get("RUNNING", 0) + counts.get("STARTING", 0)

    # Serve decides within upscale_delay_s + look_back_period_s + metric/stat intervals
    # (about 6 s); 60 s is a generous multiple.
    await wait_for(
        lambda: serve_target() >= MAX_REPLICAS,
        timeout=60,
        interval=0.25,
        message="Serve sizing the deployment to max_replicas",
    )
    assert any(s.backlog > 0 for s in burst.samples), "the backlog reached the policy"
    # The new replicas start, report their load, and the worker takes more for them.
    await wait_for(
        lambda: any(s.replicas >= 2 and s.in_flight > PER_REPLICA for s in burst.samples),
        timeout=STARTUP_S,
        interval=0.5,
        message="the worker holding work for a second replica",
    )
    assert max(s.replicas for s in burst.samples) <= MAX_REPLICAS


async def test_in_flight_never_exceeds_the_replicas_targets(burst: Burst) -> None:
    await wait_for(
        lambda: burst.answered() == burst.task_ids,
        timeout=240,
        interval=0.5,
        message="every offline task answered",
    )
    samples = list(burst.samples)
    assert len(samples) > 20
    assert max(s.in_flight for s in samples) <= MAX_REPLICAS * PER_REPLICA
    for sample in samples:
        # A replica that stops reporting leaves the target at once but its tasks stay in
        # flight until they end: compare with the targets of the last load_stale_after_s.
        window = [
            s.target for s in samples if sample.at - LOAD_STALE_AFTER_S - 1 <= s.at <= sample.at
        ]
        assert sample.in_flight <= max(window), sample
    assert max(s.in_flight for s in samples) > PER_REPLICA  # more replicas, more taken


async def test_replicas_shrink_back_after_idle(burst: Burst) -> None:
    await wait_for(
        lambda: burst.answered() == burst.task_ids,
        timeout=240,
        interval=0.5,
        message="every offline task answered",
    )

    def shrunk() -> bool:
        counts = _serve_replicas(burst.app, MODEL)
        return counts == {"RUNNING": MIN_REPLICAS}

    # downscale_delay_s + look_back_period_s + a replica's graceful stop; generously 90 s.
    await wait_for(shrunk, timeout=90, interval=0.5, message="back to min_replicas")

    async def poller_sees_min() -> bool:
        status = await burst.handle.status.remote()
        return bool(_pool(status)["capacity"]["replicas"] == MIN_REPLICAS)

    await wait_for(poller_sees_min, timeout=LOAD_STALE_AFTER_S * 4, interval=0.25)


async def test_scale_to_zero_wakes_for_a_task_and_sleeps_again(
    ray_serve: Any, emulator: EmulatorServer, receiver: CallbackReceiver, client: QueueClient
) -> None:
    queue = f"zero-{uuid.uuid4().hex[:8]}"
    autoscaling = {
        "min_replicas": 0,
        "max_replicas": 1,
        "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": 2.0,
        "downscale_to_zero_delay_s": 2.0,
    }
    args = _app_args(emulator.url, queue, _llm_config(ZERO_MODEL, autoscaling))
    app = "autoscale-zero"
    with deployed_worker(args, app, EMULATOR_APIKEY) as handle:

        async def polling_at_zero() -> bool:
            status = await handle.status.remote()
            pool = _pool(status)
            return bool(
                status["state"] == "running"
                and pool["capacity"]["replicas"] == 0
                and sum(_serve_replicas(app, ZERO_MODEL).values()) == 0
            )

        await wait_for(polling_at_zero, timeout=STARTUP_S, interval=0.25)

        # A gateway in front of Bella-Queue refuses completes for now: the answer waits in the
        # woken replica's outbox, and the replica is kept while it holds it.
        emulator.fail_completes(503, "<html>maintenance</html>", {"Retry-After": "1"})
        task_id = await client.put(
            PutRequest(
                endpoint="/v1/chat/completions",
                queue=queue,
                response_mode=ResponseMode.CALLBACK,
                level=1,
                callback_url=receiver.url,
                timeout=600,
                data={
                    "model": ZERO_MODEL,
                    "messages": [{"role": "user", "content": "wake up"}],
                    "max_tokens": 3,
                },
            )
        )

        def answer() -> dict[str, Any] | None:
            for body in receiver.bodies():
                if isinstance(body, dict) and body.get("request_id") == task_id:
                    return body
            return None

        try:

            async def held() -> bool:
                status = await handle.status.remote()
                return bool(_pool(status)["outbox"].get("outbox_entries", 0) >= 1)

            await wait_for(held, timeout=STARTUP_S, interval=0.25, message="answer held")
            # Idle but holding an answer: past downscale_to_zero_delay_s + look_back_period_s,
            # the replica is still there (before, it went and handed the answer to the poller).
            hold_until = time.monotonic() + 2.0 + LOOK_BACK_S + 4.0
            while time.monotonic() < hold_until:
                assert _serve_replicas(app, ZERO_MODEL).get("RUNNING") == 1
                await asyncio.sleep(0.25)
            assert answer() is None
        finally:
            emulator.heal_completes()
        payload = await wait_for(answer, timeout=60, interval=0.25, message="answer")
        assert payload["status_code"] == 200

        # Idle again: downscale_to_zero_delay_s + look_back_period_s + a graceful stop.
        await wait_for(
            lambda: sum(_serve_replicas(app, ZERO_MODEL).values()) == 0,
            timeout=90,
            interval=0.5,
            message="scaled back to zero",
        )
        await wait_for(polling_at_zero, timeout=LOAD_STALE_AFTER_S * 4, interval=0.25)
