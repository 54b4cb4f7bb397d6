"""Benchmark of the whole worker (Ray Serve + poller + dispatcher + engine) against baselines.

Run ``python -m bench.bench_worker [--quick]``. It starts a throwaway redis-server, the
Bella-Queue emulator and a local Ray head on loopback, and measures side by side in one run:

- ``idle_pickup``: the worker with the simulated engine (``ttft_s: 0``), idle, gets single
  streaming tasks at random intervals; latency is put → first SSE chunk (an upper bound on
  pickup: it also includes dispatch, the engine, the event bus and the SSE hop). Beside it a
  *Java-SDK-like* loop in this process (take size 1, fifo, fixed 100 ms sleep after an empty
  take, answers each task at once with a completion event) on its own queue; its latency is
  put → take, and put → blocking answer for an end-to-end comparison. Idle take rates (takes
  per second with no backlog) of both, measured over the same window.
- ``tiny_model`` (skipped with ``--quick``): N concurrent streaming chat completions with fixed
  length (``ignore_eos``) on the tiny random-weight Llama, (a) directly on vLLM ``AsyncLLM`` in
  a child process (shut down before (b) starts), (b) through the worker with ``engine: vllm``
  and the same engine arguments; tokens/s and time to first token of both, and their ratios.
  Each side runs ``--rounds`` bursts 0.5 s apart (so every burst meets an idle worker):
  tokens/s is the median burst's, time to first token is taken over every request. Then
  ``--singles`` requests one at a time, 0.5 s apart: time to first token with nothing else
  running, the floor of the path (for the worker: the idle take, the Serve call, the
  replica's request handling, one prefill and the event bus).
  Both engines run the model in their engine process (``distributed_executor_backend: uni``)
  on one OpenMP thread (``ENGINE_ENV``): on 2 cores, vLLM's default CPU layout (a model
  process beside an engine process that spin-waits on it) leaves no core for the worker's
  replica, publisher and Redis, so the engine, not the worker, would set the figure.
- ``publisher``: a reduced run of :mod:`bench.bench_publisher` (its full run is
  ``python -m bench.bench_publisher``).

Counts are fixed and the run is bounded by ``--max-seconds``; every process it starts is
stopped on the way out. It prints one JSON object and writes it to
``bench/results/worker.json``. This module must not be imported by the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis

from bench.harness import (
    RESULTS_DIR,
    StreamTiming,
    emit,
    local_stack,
    ratio,
    summary_ms,
    timed_stream,
    wait_ready,
)
from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import (
    PutRequest,
    ResponseMode,
    TakeRequest,
    TakeStrategy,
    completion_fields,
    event_minid,
    result_body,
    stream_key,
)
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.serve_run import deployed_worker

APIKEY = "bench-key"
SIM_MODEL = "sim-model"
TINY_MODEL = "tiny-llama"
CHAT = "/v1/chat/completions"
ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 512,
    "max_num_seqs": 8,
    "enforce_eager": True,
    # The model runs in the engine process: no model process for the engine to spin-wait on.
    "distributed_executor_backend": "uni",
}
ENGINE_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # One core computes (the stand-in for the GPU); the other is left to whatever serves
    # the tokens: the direct run's own loop, or the worker's replica, publisher and Redis.
    "OMP_NUM_THREADS": "1",
}
JAVA_EMPTY_DELAY_S = 0.1
ROUND_PAUSE_S = 0.5
"""Pause before each tiny-model burst, on both sides: each burst meets an idle worker."""


def chat(content: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sim_args(queue_url: str, queue: str) -> dict[str, Any]:
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0", f"{queue}:1"],
        "register_queues": True,
        "engine": "simulated",
        "llm_configs": [
            {
                "model_loading_config": {"model_id": SIM_MODEL, "model_source": SIM_MODEL},
                "accelerator_config": {"kind": "cpu"},
                "experimental_configs": {
                    "bella_sim_engine": {"max_num_seqs": 8, "ttft_s": 0.0, "tokens_per_s": 1000}
                },
                "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
            }
        ],
    }


def vllm_args(queue_url: str, queue: str, model_dir: Path) -> dict[str, Any]:
    """``configs/local.yaml``'s application args, on ``queue`` and an absolute model path."""
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0", f"{queue}:1"],
        "register_queues": True,
        "engine": "vllm",
        "poller": {"strategy": "active_passive", "max_take_size": 16},
        "llm_configs": [
            {
                "model_loading_config": {"model_id": TINY_MODEL, "model_source": str(model_dir)},
                "accelerator_config": {"kind": "cpu"},
                "engine_kwargs": dict(ENGINE_KWARGS),
                "deployment_config": {"num_replicas": 1, "max_ongoing_requests": 64},
                "runtime_env": {"env_vars": dict(ENGINE_ENV)},
            }
        ],
    }


class JavaLikeLoop:
    """The Java SDK's shape: take size 1 (fifo), sleep 100 ms after an empty take, answer at once.

    Each task is answered with a completion event (XADD to ``topic + instance_id``), so a
    blocking put returns as soon as the task is taken. ``taken_at`` maps a task's ``nonce``
    (from its data) to the ``perf_counter`` of the take that returned it.
    """

    def __init__(self, client: QueueClient, redis_url: str, topic: str, queue: str) -> None:
        self.client = client
        self.redis = Redis.from_url(redis_url, protocol=2)
        self.topic = topic
        self.queue = queue
        self.takes = 0
        self.taken_at: dict[str, float] = {}
        self._stop = asyncio.Event()

    async def run(self) -> None:
        request = TakeRequest(queues=[f"{self.queue}:0"], size=1, strategy=TakeStrategy.FIFO)
        while not self._stop.is_set():
            response = await self.client.take(request)
            self.takes += 1
            tasks = response.all_tasks()
            if not tasks:
                await asyncio.sleep(JAVA_EMPTY_DELAY_S)
                continue
            now = time.perf_counter()
            for task in tasks:
                self.taken_at[str(task.data.get("nonce"))] = now
                body = {"object": "chat.completion", "choices": []}
                fields = completion_fields(task.task_id, result_body(200, task.task_id, body))
                await self.redis.xadd(
                    stream_key(self.topic, task.instance_id or ""),
                    cast("dict[Any, Any]", fields),
                    minid=event_minid(),
                    approximate=True,
                )

    async def aclose(self) -> None:
        self._stop.set()
        await self.redis.aclose()


async def idle_pickup(
    handle: Any, emulator: EmulatorServer, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Part 1: idle take rates over one window, then paced single tasks to both consumers."""
    ours_queue = args.sim_queue
    java_queue = f"java-{uuid.uuid4().hex[:6]}"
    rng = random.Random(args.seed)
    async with QueueClient(emulator.url, APIKEY) as client:
        await client.register(java_queue, CHAT)
        java = JavaLikeLoop(client, redis_url, emulator.topic, java_queue)
        java_task = asyncio.create_task(java.run())
        try:
            # Warm both paths (first HTTP connections, first engine request).
            warm = PutRequest(
                endpoint=CHAT, queue=ours_queue, data=chat("warm", SIM_MODEL, max_tokens=1)
            )
            for _ in range(3):
                await timed_stream(client, warm.model_copy())
                await client.put_blocking(
                    PutRequest(endpoint=CHAT, queue=java_queue, data={"nonce": "warm"}, timeout=30)
                )
            await asyncio.sleep(1.0)

            before = (await handle.status.remote())["pools"][0]["takes"]
            java_before, start = java.takes, time.perf_counter()
            await asyncio.sleep(args.idle_window_s)
            after = (await handle.status.remote())["pools"][0]["takes"]
            java_after, window = java.takes, time.perf_counter() - start
            ours_rate = (after - before) / window
            java_rate = (java_after - java_before) / window

            ours_first: list[float] = []
            java_take: list[float] = []
            java_answer: list[float] = []

            async def one_ours(i: int) -> None:
                request = PutRequest(
                    endpoint=CHAT,
                    queue=ours_queue,
                    response_mode=ResponseMode.STREAMING,
                    data=chat(f"task {i}", SIM_MODEL, max_tokens=1),
                    timeout=60,
                )
                timing = await timed_stream(client, request)
                assert timing.first_s is not None, "no SSE chunk"
                ours_first.append(timing.first_s)

            async def one_java(i: int) -> None:
                nonce = f"n{i}"
                start = time.perf_counter()
                result = await client.put_blocking(
                    PutRequest(endpoint=CHAT, queue=java_queue, data={"nonce": nonce}, timeout=60)
                )
                java_answer.append(time.perf_counter() - start)
                assert result.status_code == 200, result
                java_take.append(java.taken_at[nonce] - start)

            pending: list[asyncio.Task[None]] = []
            for i in range(args.pickup_tasks):
                await asyncio.sleep(rng.uniform(args.min_gap_s, args.max_gap_s))
                pending.append(asyncio.create_task(one_ours(i)))
                pending.append(asyncio.create_task(one_java(i)))
            await asyncio.gather(*pending)
        finally:
            await java.aclose()
            java_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await java_task
    ours = summary_ms(ours_first)
    java_s = summary_ms(java_take)
    return {
        "tasks": args.pickup_tasks,
        "gap_s": [args.min_gap_s, args.max_gap_s],
        "idle_window_s": args.idle_window_s,
        "ours_put_to_first_sse_ms": ours,
        "ours_idle_takes_per_s": round(ours_rate, 2),
        "java_like_put_to_take_ms": java_s,
        "java_like_put_to_answer_ms": summary_ms(java_answer),
        "java_like_idle_takes_per_s": round(java_rate, 2),
        "ratio_p50_ours_first_sse_vs_java_take": ratio(ours["p50"], java_s["p50"]),
        "ratio_p50_ours_first_sse_vs_java_answer": ratio(
            ours["p50"], summary_ms(java_answer)["p50"]
        ),
        "ratio_idle_take_rate_ours_vs_java": ratio(ours_rate, java_rate),
    }


# ---------------------------------------------------------------------------------------
# Part 2 (a): vLLM directly, in a child process so its memory and engine process go away.
# ---------------------------------------------------------------------------------------


async def direct_vllm(
    model_dir: str, n: int, max_tokens: int, rounds: int, singles: int
) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    # What the worker's engine runs with beyond ENGINE_KWARGS: stats on (vLLM's default; the
    # worker reads KV-cache use from them, and they cost the engine ~13% here) and its
    # online-first ``priority`` scheduling (``serve.llm_config.with_worker_defaults``).
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model_dir,
            disable_log_stats=False,
            scheduling_policy="priority",
            **ENGINE_KWARGS,
        )
    )
    try:
        params = SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )

        async def one(i: int) -> tuple[float, float, int]:
            messages = [{"role": "user", "content": f"request {i}: tell me a story"}]
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            start = time.perf_counter()
            first: float | None = None
            tokens = 0
            async for out in engine.generate(prompt, params, request_id=f"r{i}-{uuid.uuid4()}"):
                got = len(out.outputs[0].token_ids)
                if got and first is None:
                    first = time.perf_counter() - start
                tokens += got
            return first or 0.0, time.perf_counter() - start, tokens

        await asyncio.gather(*(one(-1 - i) for i in range(2)))  # warm-up
        bursts: list[tuple[float, list[tuple[float, float, int]]]] = []
        for _ in range(rounds):
            await asyncio.sleep(ROUND_PAUSE_S)
            start = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(n)))
            bursts.append((time.perf_counter() - start, results))
        alone: list[float] = []
        for i in range(singles):
            await asyncio.sleep(ROUND_PAUSE_S)
            alone.append((await one(n + i))[0])
    finally:
        engine.shutdown()
    per_round = [sum(r[2] for r in results) / elapsed for elapsed, results in bursts]
    every = [r for _, results in bursts for r in results]
    return {
        "requests": n,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "tokens": sum(r[2] for r in every),
        "seconds": round(sum(elapsed for elapsed, _ in bursts), 3),
        "tokens_per_s": round(statistics.median(per_round), 1),
        "tokens_per_s_rounds": [round(x, 1) for x in per_round],
        "ttft_ms": summary_ms([r[0] for r in every]),
        "first_token_to_last_ms": summary_ms([r[1] - r[0] for r in every]),
        "ttft_single_ms": summary_ms(alone) if alone else None,
    }


def run_direct_child(
    model_dir: Path, n: int, max_tokens: int, rounds: int, singles: int, timeout_s: float
) -> dict[str, Any]:
    out = RESULTS_DIR / f".direct-{os.getpid()}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_worker",
        "--direct-child",
        str(model_dir),
        "--requests",
        str(n),
        "--max-tokens",
        str(max_tokens),
        "--rounds",
        str(rounds),
        "--singles",
        str(singles),
        "--direct-out",
        str(out),
    ]
    env = {**os.environ, **ENGINE_ENV, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
        raise
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
    if proc.returncode != 0 or not out.exists():
        tail = err.decode(errors="replace")[-3000:]
        raise RuntimeError(f"direct vLLM run failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


async def through_worker(
    emulator: EmulatorServer, model_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Part 2 (b): the same N streaming completions put through the emulator to the worker."""
    queue = f"tiny-{uuid.uuid4().hex[:6]}"
    with deployed_worker(vllm_args(emulator.url, queue, model_dir), "bench-vllm", APIKEY) as handle:
        await wait_ready(handle, args.ready_timeout_s)
        async with QueueClient(emulator.url, APIKEY) as client:

            def request(i: int) -> PutRequest:
                data = chat(
                    f"request {i}: tell me a story",
                    TINY_MODEL,
                    max_tokens=args.max_tokens,
                    ignore_eos=True,
                )
                return PutRequest(
                    endpoint=CHAT,
                    queue=queue,
                    response_mode=ResponseMode.STREAMING,
                    data=data,
                    timeout=280,
                )

            await asyncio.gather(*(timed_stream(client, request(-1 - i)) for i in range(2)))
            bursts: list[tuple[float, list[StreamTiming]]] = []
            for _ in range(args.rounds):
                await asyncio.sleep(ROUND_PAUSE_S)  # the poller goes idle between bursts
                start = time.perf_counter()
                burst = await asyncio.gather(
                    *(timed_stream(client, request(i)) for i in range(args.requests))
                )
                bursts.append((time.perf_counter() - start, burst))
            alone: list[float] = []
            for i in range(args.singles):
                await asyncio.sleep(ROUND_PAUSE_S)
                single = await timed_stream(client, request(args.requests + i))
                if single.first_content_s is not None:
                    alone.append(single.first_content_s)
            status = await handle.status.remote()

    def tokens_of(timings: list[StreamTiming]) -> int:
        usage = [t.usage_tokens for t in timings]
        if all(u is not None for u in usage):
            return sum(u for u in usage if u is not None)
        return sum(t.content_chunks for t in timings)  # no usage: count chunks

    timings = [t for _, burst in bursts for t in burst]
    elapsed = sum(seconds for seconds, _ in bursts)
    chunks = sum(t.content_chunks for t in timings)
    per_round = [tokens_of(burst) / seconds for seconds, burst in bursts]
    ttft = [t.first_content_s for t in timings if t.first_content_s is not None]
    return {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "content_chunks": chunks,
        "usage_completion_tokens": tokens_of(timings),
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(statistics.median(per_round), 1),
        "tokens_per_s_rounds": [round(x, 1) for x in per_round],
        "content_chunks_per_s": round(chunks / elapsed, 1),
        "ttft_ms": summary_ms(ttft) if ttft else None,
        "ttft_single_ms": summary_ms(alone) if alone else None,
        "ttft_first_sse_ms": summary_ms([t.first_s or 0.0 for t in timings]),
        "put_to_last_sse_ms": summary_ms([t.end_s for t in timings]),
        # Small next to the direct run's decode time means chunks reached the client in a burst.
        "first_content_to_last_sse_ms": summary_ms(
            [t.end_s - (t.first_content_s or 0.0) for t in timings]
        ),
        # Where a task's time goes, measured inside the worker (means over every task run,
        # warm-up included): take latency; put to run start in the replica; run start to
        # first event; run start to the answer.
        "worker_latency_mean_s": status.get("latency_mean_s"),
    }


async def publisher_figures() -> dict[str, Any]:
    """A reduced run of the publisher benchmark (the full one: python -m bench.bench_publisher)."""
    from bench import bench_publisher

    reduced = argparse.Namespace(
        tasks=100,
        events=50,
        rounds=1,
        batch=1000,
        paced_tasks=50,
        paced_interval_s=0.02,
        client_calls=5000,
    )
    full = await bench_publisher.main_async(reduced)
    keys = (
        "events_per_round",
        "event_publisher_events_per_s",
        "raw_pipelined_xadd_events_per_s",
        "publisher_vs_raw_ratio",
        "client_progress_call_us",
    )
    return {
        "note": "reduced: 100 tasks x 50 events, 1 round; full: python -m bench.bench_publisher",
        **{k: full[k] for k in keys},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "worker",
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "note": "2 shared cores, one run: figures are noisy",
    }
    result["publisher"] = await publisher_figures()
    model_dir: Path | None = None
    if not args.quick:
        from ray_worker.dev.tiny_model import ensure_tiny_model

        model_dir = await asyncio.to_thread(ensure_tiny_model)
        # (a) first and alone: no Ray, no worker running beside it.
        direct = await asyncio.to_thread(
            run_direct_child,
            model_dir,
            args.requests,
            args.max_tokens,
            args.rounds,
            args.singles,
            args.ready_timeout_s,
        )
        result["tiny_model"] = {"direct_vllm": direct}

    async with local_stack(APIKEY) as stack:
        emulator = stack.emulator
        args.sim_queue = f"sim-{uuid.uuid4().hex[:6]}"
        with deployed_worker(sim_args(emulator.url, args.sim_queue), "bench-sim", APIKEY) as handle:
            await wait_ready(handle, args.ready_timeout_s)
            result["idle_pickup"] = await idle_pickup(handle, emulator, stack.redis.url, args)
        if model_dir is not None:
            worker = await through_worker(emulator, model_dir, args)
            direct = result["tiny_model"]["direct_vllm"]
            result["tiny_model"]["through_worker"] = worker
            result["tiny_model"]["ratio_tokens_per_s_worker_vs_direct"] = ratio(
                worker["tokens_per_s"], direct["tokens_per_s"]
            )
            if worker["ttft_ms"] is not None:
                result["tiny_model"]["ratio_ttft_p50_worker_vs_direct"] = ratio(
                    worker["ttft_ms"]["p50"], direct["ttft_ms"]["p50"]
                )
                result["tiny_model"]["ratio_ttft_mean_worker_vs_direct"] = ratio(
                    worker["ttft_ms"]["mean"], direct["ttft_ms"]["mean"]
                )
            if worker["ttft_single_ms"] and direct.get("ttft_single_ms"):
                result["tiny_model"]["ratio_ttft_single_p50_worker_vs_direct"] = ratio(
                    worker["ttft_single_ms"]["p50"], direct["ttft_single_ms"]["p50"]
                )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="skip the tiny-model part")
    parser.add_argument("--pickup-tasks", type=int, default=40)
    parser.add_argument("--min-gap-s", type=float, default=0.2)
    parser.add_argument("--max-gap-s", type=float, default=0.6)
    parser.add_argument("--idle-window-s", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=8, help="concurrent tiny-model requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=5, help="tiny-model bursts; tokens/s is their median"
    )
    parser.add_argument(
        "--singles", type=int, default=5, help="tiny-model requests run one at a time, after"
    )
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "worker.json")
    parser.add_argument("--direct-child", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--direct-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per take otherwise
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    if args.direct_child:
        figures = asyncio.run(
            direct_vllm(
                args.direct_child, args.requests, args.max_tokens, args.rounds, args.singles
            )
        )
        args.direct_out.write_text(json.dumps(figures))
        return

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.max_seconds):
            return await main_async(args)

    emit(asyncio.run(bounded()), args.out)


if __name__ == "__main__":
    main()
