"""What several benchmarks share: the throwaway stack on loopback, stream reading, figures.

``local_stack`` starts a redis-server, the Bella-Queue emulator (on that Redis) and a local Ray
head with Serve, connects this process to Ray, and on the way out stops them in the one safe
order: the emulator (it logs from its own thread) before Ray. Once this driver is disconnected,
Ray's log filter ends the process (status 1) at the next log record, and the Ray head would be
left running. ``wait_ready`` waits for the deployed worker; ``timed_stream`` reads one
streaming put; ``pct``, ``summary_ms`` and ``ratio`` shape figures; ``emit`` prints a result
and writes it under ``bench/results``. This module must not be imported by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_worker.bella.producer import ProducerClient
from ray_worker.bella.protocol import PutRequest
from ray_worker.emulator.server import EmulatorConfig, EmulatorServer
from ray_worker.testing.ray_cluster import LocalRayCluster
from ray_worker.testing.redis_server import RedisServer, free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Stack:
    """The running pieces: Redis, the emulator and the Ray head this process is connected to."""

    redis: RedisServer
    emulator: EmulatorServer
    cluster: LocalRayCluster


@contextlib.asynccontextmanager
async def local_stack(
    apikey: str, *, num_cpus: float = 16, **emulator_options: Any
) -> AsyncIterator[Stack]:
    """Redis, the emulator (``EmulatorConfig(**emulator_options)``), Ray and Serve on loopback."""
    from ray import serve

    redis = RedisServer().start()
    emulator: EmulatorServer | None = None
    cluster = LocalRayCluster(num_cpus=num_cpus)
    try:
        emulator = EmulatorServer(
            EmulatorConfig(
                redis_url=redis.url,
                apikeys=(apikey,),
                port=0,
                profile="bench",
                **emulator_options,
            )
        ).start()
        await asyncio.to_thread(cluster.start)
        cluster.connect()
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield Stack(redis, emulator, cluster)
    finally:
        if emulator is not None:
            emulator.stop()
        redis.close()
        await asyncio.to_thread(cluster.stop)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50": round(pct(ms, 0.5), 2),
        "p99": round(pct(ms, 0.99), 2),
        "mean": round(statistics.mean(ms), 2),
        "max": round(max(ms), 2),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


async def wait_ready(handle: Any, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = await handle.status.remote()
        if status["state"] == "running" and status["pools"][0]["capacity"].get("replicas", 0) > 0:
            return status
        if status.get("startup_error"):
            raise RuntimeError(f"worker start-up failed: {status['startup_error']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not running after {timeout_s} s: {status['state']}")
        await asyncio.sleep(0.5)


def has_content(data: str) -> bool:
    try:
        chunk = json.loads(data)
    except ValueError:
        return False
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


def usage_tokens(data: str) -> int | None:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        usage = json.loads(data).get("usage")
        if usage:
            return int(usage["completion_tokens"])
    return None


class StreamTiming:
    """put → first SSE chunk, put → first chunk with content, content chunks, usage tokens."""

    def __init__(self) -> None:
        self.first_s: float | None = None
        self.first_content_s: float | None = None
        self.end_s = 0.0
        self.content_chunks = 0
        self.usage_tokens: int | None = None
        self.last_data = ""


async def timed_stream(client: ProducerClient, request: PutRequest) -> StreamTiming:
    timing = StreamTiming()
    start = time.perf_counter()
    async for event in client.put_streaming(request):
        now = time.perf_counter() - start
        if timing.first_s is None:
            timing.first_s = now
        if has_content(event.data):
            timing.content_chunks += 1
            if timing.first_content_s is None:
                timing.first_content_s = now
        tokens = usage_tokens(event.data)
        if tokens is not None:
            timing.usage_tokens = tokens
        timing.last_data = event.data
    timing.end_s = time.perf_counter() - start
    return timing


def emit(result: dict[str, Any], out: Path) -> None:
    """Print the figures and write them to ``out``."""
    text = json.dumps(result, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text, flush=True)
