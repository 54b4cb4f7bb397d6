"""``python -m bench.bench_take``: what an idle worker's takes cost the poller, through httpx and
through the take's kept HTTP/1.1 connections (``ray_worker.bella.http11``), side by side in one
run.

A real ``redis-server`` and the Bella-Queue emulator in a process of its own (so this process's
CPU is the client's alone), two registered queues with nothing in them:

1. **per take**: ``--takes`` empty takes through ``QueueClient.take`` per round, ``--rounds``
   rounds alternating between the two paths; CPU (``time.process_time``) and wall time per take,
   the median round of each;
2. **the idle poller**: the real ``Poller`` (``ray_worker.worker.poller``) on those queues with
   the shipped configs' idle backoff (``idle_backoff_max_s`` 0.05 s), a capacity report every
   second as the replicas send them, for ``--idle-s`` seconds with each path: its CPU rate in
   percent of a core, takes per second, and the put-to-take pickup latency of ``--pickups``
   single tasks put at random moments (p50/p99), which the faster path must not lengthen.

Prints one JSON object and writes ``bench/results/take.json``. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
import time
from typing import Any, cast

import httpx

from bench.harness import RESULTS_DIR, emit, summary_ms
from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode, TakeRequest
from ray_worker.config import CapacityConfig, PollerConfig, QueueSpec
from ray_worker.errors import QueueUnavailableError
from ray_worker.metrics import WorkerMetrics
from ray_worker.testing.redis_server import RedisServer, free_port
from ray_worker.testing.waiting import wait_for
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher
from ray_worker.worker.poller import Poller, make_pools

APIKEY = "bench-take-key"
MODEL = "m"
QUEUES = ("bench-take:0", "bench-take:1")
PATHS = ("httpx", "kept")


def _client(url: str, path: str) -> QueueClient:
    # An explicit httpx transport keeps takes on httpx (the kept path is for the default one).
    transport = httpx.AsyncHTTPTransport() if path == "httpx" else None
    client = QueueClient(url, APIKEY, transport=transport)
    assert (client._take_http is None) == (path == "httpx")
    return client


async def per_take(url: str, takes: int, rounds: int) -> dict[str, Any]:
    request = TakeRequest(queues=list(QUEUES), size=8)
    cpu: dict[str, list[float]] = {p: [] for p in PATHS}
    wall: dict[str, list[float]] = {p: [] for p in PATHS}
    clients = {p: _client(url, p) for p in PATHS}
    try:
        for client in clients.values():
            for _ in range(50):  # connections open, code warm
                await client.take(request)
        for _ in range(rounds):
            for path, client in clients.items():
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(takes):
                    await client.take(request)
                cpu[path].append((time.process_time() - c0) / takes * 1e6)
                wall[path].append((time.perf_counter() - w0) / takes * 1e6)
    finally:
        for client in clients.values():
            await client.aclose()
    out: dict[str, Any] = {
        p: {
            "cpu_us_per_take": round(statistics.median(cpu[p]), 1),
            "wall_us_per_take": round(statistics.median(wall[p]), 1),
        }
        for p in PATHS
    }
    out["cpu_ratio_kept_to_httpx"] = round(
        out["kept"]["cpu_us_per_take"] / out["httpx"]["cpu_us_per_take"], 3
    )
    return out


class _Refusing:
    """The dispatcher's place: what the poller takes (the pickup samples only) is refused, so
    its capacity is released at once and nothing runs."""

    in_flight = 0

    def fan_out(self, task: Any) -> int:
        return 1

    def submit(self, task: Any, model_id: str, n: int) -> bool:
        return False

    def reject(self, raw: Any, reason: str) -> None:
        pass


async def idle_poller(url: str, path: str, idle_s: float, pickups: int) -> dict[str, Any]:
    specs = [QueueSpec(name=q) for q in QUEUES]
    capacity = CapacityTracker(CapacityConfig(), [MODEL])
    client = _client(url, path)
    # Redelivery off: a refused pickup sample must not come back into a later window.
    config = PollerConfig(idle_backoff_max_s=0.05, process_timeout_s=0)
    poller = Poller(
        taker=client,
        dispatcher=cast(Dispatcher, _Refusing()),
        capacity=capacity,
        pools=make_pools(specs, dict.fromkeys(QUEUES, MODEL)),
        config=config,
        metrics=WorkerMetrics(use_ray=False),
    )

    async def reports() -> None:
        while True:
            capacity.report(
                {"replica_id": "r0", "model_id": MODEL, "max_num_seqs": 8, "offline_width": 7}
            )
            await asyncio.sleep(1.0)

    reporter = asyncio.create_task(reports())
    await asyncio.sleep(0.1)
    poller.start()
    try:
        await asyncio.sleep(1.0)  # connections open, loops running
        pool = poller.pools[0]
        takes0 = pool.takes
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(idle_s)
        cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
        takes = pool.takes - takes0
        latencies = await _pickups(url, poller, pickups)
    finally:
        reporter.cancel()
        await poller.stop()
        await client.aclose()
    return {
        "cpu_pct_of_a_core": round(100 * cpu_s / wall_s, 2),
        "takes_per_s": round(takes / wall_s, 1),
        "cpu_us_per_take": round(cpu_s / max(takes, 1) * 1e6, 1),
        "pickup_ms": summary_ms(latencies),
    }


async def _pickups(url: str, poller: Poller, n: int) -> list[float]:
    """Put one offline task at a random moment, ``n`` times; seconds from put to take (the
    pool's ``tasks_taken`` counting it)."""
    pool = poller.pools[0]
    latencies: list[float] = []
    async with QueueClient(url, APIKEY) as producer:
        for _ in range(n):
            await asyncio.sleep(random.uniform(0.05, 0.2))
            before = pool.tasks_taken
            data = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            put = PutRequest(
                endpoint="/v1/chat/completions",
                queue=QUEUES[1].split(":")[0],
                level=1,
                response_mode=ResponseMode.CALLBACK,
                callback_url="http://127.0.0.1:9/unused",
                data=data,
            )
            sent = time.perf_counter()
            await producer.put(put)

            def taken(before: int = before) -> bool:
                return pool.tasks_taken > before

            await wait_for(taken, timeout=10, interval=0.001)
            latencies.append(time.perf_counter() - sent)
    return latencies


async def run(args: argparse.Namespace) -> dict[str, Any]:
    redis = RedisServer().start()
    port = free_port()
    options = ["--redis-url", redis.url, "--apikey", APIKEY, "--log-level", "warning"]
    emulator = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "ray_worker.emulator", "--port", str(port), *options],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with QueueClient(url, APIKEY) as admin:

            async def up() -> bool:
                with contextlib.suppress(QueueUnavailableError):
                    await admin.register(QUEUES[0].split(":")[0], "/v1/chat/completions")
                    return True
                return False

            await wait_for(up, timeout=30, interval=0.2)
        result: dict[str, Any] = {"takes_per_round": args.takes, "rounds": args.rounds}
        result["per_take"] = await per_take(url, args.takes, args.rounds)
        result["idle_poller"] = {
            p: await idle_poller(url, p, args.idle_s, args.pickups) for p in PATHS
        }
        idle = result["idle_poller"]
        result["idle_cpu_ratio_kept_to_httpx"] = round(
            idle["kept"]["cpu_pct_of_a_core"] / idle["httpx"]["cpu_pct_of_a_core"], 3
        )
        return result
    finally:
        emulator.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            emulator.wait(10)
        if emulator.poll() is None:
            emulator.kill()
        redis.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_take", description=__doc__)
    parser.add_argument("--takes", type=int, default=1000, help="takes per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path")
    parser.add_argument("--idle-s", type=float, default=20.0, help="idle window per path")
    parser.add_argument("--pickups", type=int, default=40, help="put-to-take samples per path")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    emit(result, RESULTS_DIR / "take.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
