"""Benchmark of capacity-aware pulling: busy engine slots, tasks held back, online start times.

Run ``python -m bench.bench_capacity [--quick]``. It starts a throwaway redis-server, the
Bella-Queue emulator and a local Ray head on loopback, deploys the worker with the simulated
engine in GPU-like shapes (2 fixed replicas of 64 sequences, 0.2 s to the first token, 40
tokens/s per sequence, answers of 100 to 300 tokens: about 5 s a task on average), puts a
backlog of offline callback tasks that outlasts the measuring window, and samples the
poller's ``status()`` every 0.25 s while the backlog lasts. ``--fixed-lengths`` makes every
answer 200 tokens: tasks started together then end together, in waves of a whole batch (a
worst case for refilling the engines). Figures, from one run:

- ``slot_utilisation``: busy engine slots over available slots, per sample
  ``engine_running / max_num_seqs`` summed over the replicas' load reports (target >= 0.95);
- ``held_not_running_per_replica``: tasks the worker has taken and that are not running in an
  engine (waiting in an engine's queue, queued in Serve on the way to a replica, or being
  answered), per replica: ``(in_flight - engine_running) / replicas`` per sample (target: at
  most one replica's ``max_num_seqs``). ``engine_waiting_per_replica`` is the part of it
  waiting inside the engines. ``in_flight`` is live while the engine counts are the replicas'
  last reports (every 0.5 s), so single samples are off by what changed since;
- ``online_put_to_start_ms``: for streaming level-0 tasks put one by one during the backlog,
  put -> first SSE event (the first token) minus the engine's fixed ``ttft_s``: the time the
  task took to be taken, dispatched and admitted to a running batch. The raw put -> first
  event is ``online_put_to_first_event_ms``.

It prints one JSON object and writes it to ``bench/results/capacity.json``; every process it
starts is stopped on the way out. This module must not be imported by the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import RESULTS_DIR, emit, local_stack, pct, summary_ms, timed_stream, wait_ready
from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.serve_run import deployed_worker

APIKEY = "bench-key"
MODEL = "sim-gpu-like"
CHAT = "/v1/chat/completions"
REPLICAS = 2
MAX_NUM_SEQS = 64
TTFT_S = 0.2
TOKENS_PER_S = 40.0
MAX_TOKENS = 200
VARIED_TOKENS = (100, 300)
TARGET_RATIO = 1.25
ONLINE_RESERVE_RATIO = 0.1
SAMPLE_INTERVAL_S = 0.25


def worker_args(queue_url: str, queue: str) -> dict[str, Any]:
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0", f"{queue}:1"],
        "register_queues": True,
        "engine": "simulated",
        "capacity": {"target_ratio": TARGET_RATIO, "online_reserve_ratio": ONLINE_RESERVE_RATIO},
        "llm_configs": [
            {
                "model_loading_config": {"model_id": MODEL, "model_source": MODEL},
                "accelerator_config": {"kind": "cpu"},
                "experimental_configs": {
                    "bella_sim_engine": {
                        "max_num_seqs": MAX_NUM_SEQS,
                        "ttft_s": TTFT_S,
                        "tokens_per_s": TOKENS_PER_S,
                        "max_tokens": MAX_TOKENS,
                    }
                },
                "deployment_config": {
                    "num_replicas": REPLICAS,
                    "ray_actor_options": {"num_cpus": 0.1},
                },
            }
        ],
    }


@dataclass(frozen=True)
class Sample:
    """One ``status()`` reading of the pool."""

    at: float
    replicas: int
    max_num_seqs: int
    in_flight: int
    engine_running: int
    engine_waiting: int


def _sample_of(status: dict[str, Any]) -> Sample:
    cap = status["pools"][0]["capacity"]
    return Sample(
        at=time.monotonic(),
        replicas=int(cap["replicas"]),
        max_num_seqs=int(cap["max_num_seqs"]),
        in_flight=int(status["in_flight"]),
        engine_running=int(cap["engine_running"]),
        engine_waiting=int(cap["engine_waiting"]),
    )


def _stats(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": round(statistics.mean(values), digits),
        "p50": round(pct(values, 0.5), digits),
        "p5": round(pct(values, 0.05), digits),
        "p99": round(pct(values, 0.99), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


async def _put_offline(
    client: QueueClient, queue: str, callback_url: str, n: int, lengths: random.Random | None
) -> None:
    def request(i: int) -> PutRequest:
        tokens = MAX_TOKENS if lengths is None else lengths.randint(*VARIED_TOKENS)
        return PutRequest(
            endpoint=CHAT,
            queue=queue,
            response_mode=ResponseMode.CALLBACK,
            level=1,
            callback_url=callback_url,
            timeout=3600,
            data={
                "model": MODEL,
                "messages": [{"role": "user", "content": f"offline {i}"}],
                "max_tokens": tokens,
            },
        )

    for start in range(0, n, 50):
        await asyncio.gather(*(client.put(request(i)) for i in range(start, min(n, start + 50))))


async def measure(
    handle: Any, emulator: EmulatorServer, args: argparse.Namespace
) -> dict[str, Any]:
    queue = args.queue
    per_replica_target = math.ceil(MAX_NUM_SEQS * TARGET_RATIO)
    offline_limit = REPLICAS * per_replica_target - math.ceil(
        REPLICAS * per_replica_target * ONLINE_RESERVE_RATIO
    )
    samples: list[Sample] = []
    with CallbackReceiver() as receiver:
        async with QueueClient(emulator.url, APIKEY, timeout_s=60) as client:
            put_started = time.monotonic()
            lengths = None if args.fixed_lengths else random.Random(args.seed)
            await _put_offline(client, queue, receiver.url, args.offline_tasks, lengths)
            put_s = time.monotonic() - put_started

            # Warm-up: once the worker holds its offline share, give the engines warmup_s.
            deadline = time.monotonic() + 120
            while _sample_of(await handle.status.remote()).in_flight < offline_limit:
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker never took its offline share")
                await asyncio.sleep(SAMPLE_INTERVAL_S)
            await asyncio.sleep(args.warmup_s)

            answered_before = len(receiver.bodies())
            window_start = time.monotonic()
            gap_s = args.window_s / (args.online_tasks + 1)

            async def online(i: int) -> float:
                await asyncio.sleep(gap_s * (i + 1))
                request = PutRequest(
                    endpoint=CHAT,
                    queue=queue,
                    response_mode=ResponseMode.STREAMING,
                    data={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"online {i}"}],
                        "stream": True,
                        "max_tokens": 4,
                    },
                    timeout=120,
                )
                timing = await timed_stream(client, request)
                if timing.first_s is None:
                    raise RuntimeError(f"online task {i} got no event")
                return timing.first_s

            online_tasks = [asyncio.create_task(online(i)) for i in range(args.online_tasks)]
            while time.monotonic() - window_start < args.window_s:
                samples.append(_sample_of(await handle.status.remote()))
                await asyncio.sleep(SAMPLE_INTERVAL_S)
            window_s = time.monotonic() - window_start
            answered_in_window = len(receiver.bodies()) - answered_before
            firsts = await asyncio.gather(*online_tasks)
            pending = (await client.stats(f"{queue}:1")).get("pending")

    if not isinstance(pending, int) or pending <= 0:
        raise RuntimeError("the offline backlog ran out inside the window: raise --offline-tasks")
    utilisation = [s.engine_running / s.max_num_seqs for s in samples if s.max_num_seqs]
    held = [(s.in_flight - s.engine_running) / s.replicas for s in samples if s.replicas]
    waiting = [s.engine_waiting / s.replicas for s in samples if s.replicas]
    in_flight = [s.in_flight / s.replicas for s in samples if s.replicas]
    put_to_start = [max(0.0, f - TTFT_S) for f in firsts]
    util = _stats(utilisation)
    held_stats = _stats(held, 2)
    return {
        "window_s": round(window_s, 1),
        "samples": len(samples),
        "offline_put": args.offline_tasks,
        "offline_put_s": round(put_s, 2),
        "offline_pending_after_window": pending,
        "offline_answered_in_window": answered_in_window,
        "offline_tasks_per_s": round(answered_in_window / window_s, 1),
        "ideal_tasks_per_s": round(
            REPLICAS * MAX_NUM_SEQS / (TTFT_S + MAX_TOKENS / TOKENS_PER_S), 1
        ),
        "slot_utilisation": {**util, "target_min": 0.95, "meets_target": util["mean"] >= 0.95},
        "held_not_running_per_replica": {
            **held_stats,
            "target_max": MAX_NUM_SEQS,
            "meets_target": held_stats["max"] <= MAX_NUM_SEQS,
        },
        "engine_waiting_per_replica": _stats(waiting, 2),
        "in_flight_per_replica": {**_stats(in_flight, 2), "target": per_replica_target},
        "online_put_to_start_ms": summary_ms(put_to_start),
        "online_put_to_first_event_ms": summary_ms(firsts),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "capacity",
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "note": "2 shared cores, one run: figures are noisy",
        "config": {
            "replicas": REPLICAS,
            "max_num_seqs": MAX_NUM_SEQS,
            "ttft_s": TTFT_S,
            "tokens_per_s": TOKENS_PER_S,
            "offline_max_tokens": (
                MAX_TOKENS
                if args.fixed_lengths
                else f"uniform {VARIED_TOKENS[0]}..{VARIED_TOKENS[1]}"
            ),
            "target_ratio": TARGET_RATIO,
            "online_reserve_ratio": ONLINE_RESERVE_RATIO,
            "online_tasks": args.online_tasks,
        },
    }
    async with local_stack(APIKEY, callback_retry_delays_s=(0.2, 0.5, 1.0)) as stack:
        args.queue = f"cap-{uuid.uuid4().hex[:6]}"
        with deployed_worker(
            worker_args(stack.emulator.url, args.queue), "bench-capacity", APIKEY
        ) as handle:
            ready = await wait_ready(handle, args.ready_timeout_s)
            # Both replicas must report before the backlog arrives, or the first takes are
            # sized for one.
            deadline = time.monotonic() + args.ready_timeout_s
            while ready["pools"][0]["capacity"]["replicas"] < REPLICAS:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{REPLICAS} replicas not reporting")
                await asyncio.sleep(0.5)
                ready = await handle.status.remote()
            result.update(await measure(handle, stack.emulator, args))
        emit(result, args.out)  # before tear-down, whatever happens there
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a 15 s window, 10 online tasks")
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--online-tasks", type=int, default=20)
    parser.add_argument("--offline-tasks", type=int, default=None)
    parser.add_argument(
        "--fixed-lengths",
        action="store_true",
        help=f"every offline task {MAX_TOKENS} tokens (completions come in synchronized waves)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "capacity.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.window_s, args.online_tasks = 15.0, 10
    if args.offline_tasks is None:
        # Enough for the window at the ideal rate, the warm-up, and a margin.
        rate = REPLICAS * MAX_NUM_SEQS / (TTFT_S + MAX_TOKENS / TOKENS_PER_S)
        args.offline_tasks = int(rate * (args.window_s + args.warmup_s + 20)) + 400
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per take otherwise

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.max_seconds):
            return await main_async(args)

    asyncio.run(bounded())


if __name__ == "__main__":
    main()
