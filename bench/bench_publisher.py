"""Benchmark of the event-bus publisher against raw pipelined redis-py XADD.

Run ``python -m bench.bench_publisher``. It starts a throwaway redis-server, then measures,
side by side in one run:

- ``event_publisher``: events/s through ``StreamWriter`` with many concurrent tasks, each
  publishing ~220-byte progress events one call per event (as the dispatcher does);
- ``raw_pipelined``: events/s of the same pre-encoded entries written by plain redis-py
  pipelines of XADD (no transaction, same MINID trimming) on the same Redis;
- ``client_progress_us``: caller-side cost of one ``EventBatcher.progress`` call
  (encode + enqueue) with a send that does nothing, plus the encoder alone for reference;
- ``paced``: enqueue → acknowledged latency when tasks emit below saturation;
- ``client_to_publisher``: events/s of ``EventBatcher`` feeding an in-process
  ``StreamWriter`` (no Ray hop), to show the coalescing path end to end.

Counts are fixed and the whole run is bounded by ``--max-seconds``; it prints one JSON
object. This module must not be imported by the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from typing import Any, cast

from redis.asyncio import Redis

from ray_worker.bella.protocol import event_minid, progress_fields, stream_key
from ray_worker.config import PublisherOptions
from ray_worker.eventbus.batching import EventBatcher
from ray_worker.eventbus.redis_writer import StreamWriter
from ray_worker.testing.redis_server import RedisServer

TOPIC = "redis-mesh:private-stream:bench:"
INSTANCES = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:8080"]

Entries = list[tuple[str, dict[str, str]]]


def chunk(task: int, i: int) -> dict[str, Any]:
    """A trimmed chat.completion.chunk: the whole stream entry comes to ~220 bytes."""
    return {"id": f"c{task:06d}", "choices": [{"delta": {"content": f" tok{i % 97}"}}]}


def make_entries(tasks: int, events: int) -> list[Entries]:
    """Per task, its pre-encoded progress entries in order."""
    return [
        [
            (
                stream_key(TOPIC, INSTANCES[t % len(INSTANCES)]),
                progress_fields(
                    f"TASK-1-0-S-260101000000-0001-{t:06d}", str(i), "message", chunk(t, i)
                ),
            )
            for i in range(events)
        ]
        for t in range(tasks)
    ]


def entry_bytes(entry: tuple[str, dict[str, str]]) -> int:
    return sum(len(k) + len(v.encode()) for k, v in entry[1].items())


async def run_publisher(url: str, per_task: list[Entries]) -> tuple[float, dict[str, Any]]:
    publisher = StreamWriter(url, PublisherOptions(max_buffered=50_000))

    async def stream(entries: Entries) -> None:
        for entry in entries:
            await publisher.publish([entry])
            await asyncio.sleep(0)  # a real task yields between tokens

    start = time.perf_counter()
    await asyncio.gather(*(stream(entries) for entries in per_task))
    await publisher.flush()
    elapsed = time.perf_counter() - start
    stats = publisher.stats()
    await publisher.aclose()
    assert stats["published"] == sum(map(len, per_task)), stats
    return elapsed, stats


async def run_paced(url: str, per_task: list[Entries], interval_s: float) -> dict[str, Any]:
    """Tasks emit one event per ``interval_s`` (below saturation): latency when not backlogged."""
    publisher = StreamWriter(url)

    async def stream(entries: Entries) -> None:
        for entry in entries:
            await publisher.publish([entry])
            await asyncio.sleep(interval_s)

    start = time.perf_counter()
    await asyncio.gather(*(stream(entries) for entries in per_task))
    await publisher.flush()
    elapsed = time.perf_counter() - start
    stats = publisher.stats()
    await publisher.aclose()
    return {
        "offered_events_per_s": round(len(per_task) / interval_s),
        "achieved_events_per_s": round(stats["published"] / elapsed),
        "mean_batch": round(stats["published"] / max(1, stats["batches"]), 1),
        "latency_ms": {k: round(v, 3) for k, v in stats["latency"].items()},
    }


async def run_raw(url: str, per_task: list[Entries], batch: int) -> float:
    # Interleave tasks as the publisher sees them, then write in pipelines of ``batch``.
    flat = [e for group in itertools.zip_longest(*per_task) for e in group if e is not None]
    # Same client settings as StreamWriter (RESP2) so the ratio compares like with like.
    client = Redis.from_url(url, protocol=2)
    start = time.perf_counter()
    for offset in range(0, len(flat), batch):
        pipe = client.pipeline(transaction=False)
        minid = event_minid()
        for key, fields in flat[offset : offset + batch]:
            pipe.xadd(key, cast("dict[Any, Any]", fields), minid=minid, approximate=True)
        await pipe.execute()
    elapsed = time.perf_counter() - start
    await client.aclose()
    return elapsed


async def run_client_to_publisher(url: str, per_task: list[Entries]) -> float:
    publisher = StreamWriter(url, PublisherOptions(max_buffered=50_000))
    client = EventBatcher(publisher.publish, max_pending=5000)

    async def stream(entries: Entries) -> None:
        for key, fields in entries:
            await client.emit(key, fields)
            await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.gather(*(stream(entries) for entries in per_task))
    await client.flush()
    await publisher.flush()
    elapsed = time.perf_counter() - start
    await publisher.aclose()
    return elapsed


async def client_progress_cost(calls: int, burst: int = 50) -> dict[str, float]:
    """Per-call cost of ``EventBatcher.progress`` (encode + enqueue), in µs.

    Calls are timed in bursts of ``burst``; between bursts the loop runs (untimed) so the
    no-op sender drains the pending batch, as it does between a real task's tokens.
    """
    task_id = "TASK-1-0-S-260101000000-0001-000001"
    sent = 0

    async def send(batch: Entries) -> None:
        nonlocal sent
        sent += len(batch)

    client = EventBatcher(send, topic=TOPIC)
    data = chunk(1, 1)
    timed = 0.0
    for first in range(0, calls, burst):
        start = time.perf_counter()
        for i in range(first, first + burst):
            await client.progress(INSTANCES[0], task_id, str(i), "message", data)
        timed += time.perf_counter() - start
        await client.flush()
    assert sent == calls // burst * burst
    start = time.perf_counter()
    for i in range(calls):
        progress_fields(task_id, str(i), "message", data)
    encode_only = (time.perf_counter() - start) / calls
    return {
        "progress_call_us": timed / (calls // burst * burst) * 1e6,
        "encode_only_us": encode_only * 1e6,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    per_task = make_entries(args.tasks, args.events)
    total = args.tasks * args.events
    sizes = [entry_bytes(e) for e in per_task[0][:20]]
    pub_s: list[float] = []
    raw_s: list[float] = []
    e2e_s: list[float] = []
    last: dict[str, Any] = {}
    with RedisServer() as server:
        admin = Redis.from_url(server.url)
        await admin.config_set("save", "")
        await run_raw(server.url, make_entries(10, 50), args.batch)  # warm-up
        for _ in range(args.rounds):
            await admin.flushall()
            raw_s.append(await run_raw(server.url, per_task, args.batch))
            await admin.flushall()
            elapsed, last = await run_publisher(server.url, per_task)
            pub_s.append(elapsed)
            await admin.flushall()
            e2e_s.append(await run_client_to_publisher(server.url, per_task))
        await admin.flushall()
        paced = await run_paced(server.url, per_task[: args.paced_tasks], args.paced_interval_s)
        await admin.aclose()
    cost = await client_progress_cost(args.client_calls)
    pub_rate = total / statistics.median(pub_s)
    raw_rate = total / statistics.median(raw_s)
    return {
        "benchmark": "event-bus publisher",
        "events_per_round": total,
        "concurrent_tasks": args.tasks,
        "streams": len(INSTANCES),
        "entry_bytes_mean": statistics.mean(sizes),
        "rounds": args.rounds,
        "event_publisher_events_per_s": round(pub_rate),
        "raw_pipelined_xadd_events_per_s": round(raw_rate),
        "publisher_vs_raw_ratio": round(pub_rate / raw_rate, 3),
        "raw_pipeline_batch": args.batch,
        "client_to_publisher_events_per_s": round(total / statistics.median(e2e_s)),
        "publisher_last_round": {
            "batches": last["batches"],
            "mean_batch": round(last["published"] / max(1, last["batches"]), 1),
            "latency_ms_saturated": {k: round(v, 3) for k, v in last["latency"].items()},
        },
        "paced": paced,
        "client_progress_call_us": round(cost["progress_call_us"], 2),
        "progress_fields_encode_only_us": round(cost["encode_only_us"], 2),
        "seconds": {
            "publisher": [round(s, 3) for s in pub_s],
            "raw": [round(s, 3) for s in raw_s],
            "client_to_publisher": [round(s, 3) for s in e2e_s],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=200, help="concurrent streaming tasks")
    parser.add_argument("--events", type=int, default=100, help="progress events per task")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--batch", type=int, default=1000, help="raw pipeline size")
    parser.add_argument("--paced-tasks", type=int, default=100)
    parser.add_argument("--paced-interval-s", type=float, default=0.02)
    parser.add_argument("--client-calls", type=int, default=50_000)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.max_seconds):
            return await main_async(args)

    print(json.dumps(asyncio.run(bounded()), indent=2))


if __name__ == "__main__":
    main()
