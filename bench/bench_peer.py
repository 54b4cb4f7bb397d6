"""Peer benchmark: the worker against vLLM's own OpenAI server, same model, same engine settings.

Run ``python -m bench.bench_peer [--bursts 3] [--streams 8] [--tokens 300]``. One run starts,
one side after the other (2 shared cores: never both at once):

- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` on the tiny model with the worker's
  ``engine_kwargs`` as command-line flags (the serving layer the replicas call, behind HTTP SSE);
- ``worker``: a throwaway redis-server, the Bella-Queue emulator (a thread of this process) and
  a local Ray head, then ``serve run`` of ``configs/local.yaml`` joined to that Ray, on a free
  HTTP port, with the same model and ``engine_kwargs`` (``--max-model-len``,
  ``--max-num-seqs``; ``--set`` and ``--replica-env`` change the app's args and the LLM
  replica's environment, ``--peer-env`` and ``--peer-arg`` vLLM's server, to try fixes).

Each side gets the same load (chat requests, ``ignore_eos``, ``stream_options.include_usage``;
the worker's as a producer puts them: streaming puts to the emulator, SSE read to the end): a
warm-up; an idle window (each process's idle CPU rate); ``--bursts`` bursts of ``--streams``
concurrent streams x ``--tokens`` tokens; a second idle window (``--metrics-delay-s``, long
enough for Ray's metrics agent to export the engine's counters: the worker's poller idle rate
after load is read there); ``--singles`` single requests one after the other (``--single-tokens``
each); a sustained rate (``--rate`` requests/s for ``--rate-s`` seconds, ``--rate-tokens`` each).

Per phase and side it reads each process's CPU (user + sys, ``/proc/<pid>/stat``) before and
after, subtracts the idle rate times the window (``net_*``), and prints per process role
(``api_server``; ``llm``, ``publisher``, ``poller``, ``ray`` (every other process of the Ray
session: GCS, raylet, Serve's controller and proxy, agents), ``serve_run``; ``engine_core`` and
``engine_worker`` (``VLLM::EngineCore``/``VLLM::Worker``, a child of the api_server or of the LLM
replica)) the CPU microseconds per generated token, and the groups ``host`` (vLLM: the
api_server; worker: llm + publisher + poller) and ``engine`` (core + worker processes). Also
tokens/s, TTFT (request to first content chunk) p50/p99 of singles, bursts and the sustained
rate, and the engine's steps (``vllm:iteration_tokens_total``: vLLM's ``/metrics``, the worker's
through Ray's metrics agent) with generated tokens per step, the mean batch. ``ratios`` are
worker over vLLM; ``goals`` the issue's targets. The engine processes' threads, CPU affinity and
``OMP_NUM_THREADS`` are listed per side (vLLM's server always runs an ``mp`` executor on CPU: a
``uni`` in ``engine_kwargs`` becomes ``mp`` there). Both sides bind the model to cores the same
way: vLLM binds its ``VLLM::Worker``, the worker its ``uni`` engine process
(``ray_worker.serve.engine_cpus``); ``--replica-env VLLM_CPU_OMP_THREADS_BIND=nobind`` leaves
the worker's unbound.

One JSON object goes to stdout and ``bench/results/peer.json`` (written after each side); the
per-phase lines go to stderr. Every process it starts (vLLM's server and its engine, ``serve
run``, Ray, redis-server, the emulator) is stopped on the way out, on errors and Ctrl-C too,
and any leftover of their process sessions is killed. This module must not be imported by the
worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.bench_cpu import cpu_s
from bench.harness import RESULTS_DIR, emit, has_content, pct, ratio, usage_tokens
from ray_worker.testing.e2e import ray_session_of, serve_worker, session_processes
from ray_worker.testing.ray_cluster import DEFAULT_RAY_ENV, LocalRayCluster
from ray_worker.testing.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "local.yaml"
APIKEY = "bench-peer-key"
APP = "bench-peer"
CHAT = "/v1/chat/completions"
SETTLE_S = 0.5
PUT_ATTEMPTS = 4
HOST_ROLES = {"vllm": ("api_server",), "worker": ("llm", "publisher", "poller")}
ENGINE_ROLES = ("engine_core", "engine_worker")
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")
GOALS = {
    "host_cpu_per_token_max": 0.5,
    "engine_cpu_per_token_max": 1.05,
    "poller_cpu_s_per_s_max": 0.01,
    "tokens_per_s_min": 0.9,
    "single_ttft_p50_max": 1.3,
}


# ---------------------------------------------------------------------------------------
# Pure helpers (unit-tested)
# ---------------------------------------------------------------------------------------


def engine_cli_args(engine_kwargs: Mapping[str, Any]) -> list[str]:
    """``engine_kwargs`` as vLLM command-line flags: ``True`` a bare flag, ``None``/``False``
    left out, mappings and lists as JSON, anything else as text."""
    flags: list[str] = []
    for key, value in engine_kwargs.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (Mapping, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts and lists (an integer part indexes a list); ``None``
    deletes the key. Missing mappings on the way are created."""
    parts = dotted.split(".")
    node: Any = target
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON where it parses (``null``, numbers, objects),
    else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'[{,]\s*le="([^"]+)"')


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text samples summed over label sets, by name (``ray_`` prefix dropped, ``:``
    as ``_``); a histogram bucket is kept per bound, as ``<name>{le=<float>}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        name = name.replace(":", "_").removeprefix("ray_")
        if name.endswith("_bucket"):
            le = _LE.search(labels or "")
            try:
                bound = float(le.group(1)) if le else None
            except ValueError:
                bound = None
            if bound is None:
                continue
            name = f"{name}{{le={bound}}}"
        out[name] = out.get(name, 0.0) + value
    return out


def engine_counters(metrics: Mapping[str, float]) -> dict[str, float] | None:
    """The engine's cumulative step counters from ``parse_prometheus`` output, or None when
    the engine's metrics are not there."""
    steps = metrics.get("vllm_iteration_tokens_total_count")
    if steps is None:
        return None
    generation = metrics.get("vllm_generation_tokens_total", metrics.get("vllm_generation_tokens"))
    prompt = metrics.get("vllm_prompt_tokens_total", metrics.get("vllm_prompt_tokens"))
    return {
        "steps": steps,
        "steps_of_1_token": metrics.get("vllm_iteration_tokens_total_bucket{le=1.0}", 0.0),
        "generation_tokens": generation or 0.0,
        "prompt_tokens": prompt or 0.0,
        "preemptions": metrics.get(
            "vllm_num_preemptions_total", metrics.get("vllm_num_preemptions", 0.0)
        ),
    }


def step_figures(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> Any:
    """Engine steps between two ``engine_counters`` readings and the mean batch."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = delta["steps"]
    return {
        **{k: round(v, 1) for k, v in delta.items()},
        "generation_tokens_per_step": round(delta["generation_tokens"] / steps, 3)
        if steps
        else None,
        "share_of_steps_with_1_token": round(delta["steps_of_1_token"] / steps, 3)
        if steps
        else None,
    }


def worker_role(args: str) -> str:
    """The role of a process of the worker's Ray session (or of ``serve run``'s), from its
    command line (``ps args``: Ray workers carry their actor class in the title)."""
    if args.startswith("VLLM::EngineCore"):
        return "engine_core"
    if args.startswith("VLLM::"):
        return "engine_worker"
    if "QueuePoller" in args:
        return "poller"
    if "RedisPublisher" in args or "bella-publisher" in args:
        return "publisher"
    if "ServeReplica:" in args:
        return "llm"
    return "ray"


def peer_role(args: str) -> str:
    """The role of a process of vLLM's server session other than the server itself."""
    if args.startswith("VLLM::EngineCore"):
        return "engine_core"
    if args.startswith("VLLM::"):
        return "engine_worker"
    return "other"


def ttft_summary(values_s: list[float]) -> dict[str, float] | None:
    if not values_s:
        return None
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50": round(pct(ms, 0.5), 1),
        "p99": round(pct(ms, 0.99), 1),
        "mean": round(statistics.mean(ms), 1),
    }


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    role: str
    pid: int
    args: str


def proc_detail(proc: Proc) -> dict[str, Any]:
    """Threads, CPU affinity and thread-count variables of a process (best effort)."""
    detail: dict[str, Any] = {"role": proc.role, "pid": proc.pid, "args": proc.args[:120]}
    with contextlib.suppress(OSError, ValueError):
        status = Path(f"/proc/{proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("Threads:"):
                detail["threads"] = int(line.split()[1])
            if line.startswith("Cpus_allowed_list:"):
                detail["cpus_allowed"] = line.split()[1]
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        env = dict(e.decode(errors="replace").partition("=")[::2] for e in raw if b"=" in e)
        detail["env"] = {k: env[k] for k in ENV_KEYS if k in env}
    return detail


def cpu_map(procs: list[Proc]) -> dict[int, float | None]:
    return {p.pid: cpu_s(p.pid) for p in procs}


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def stop_session(sid: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGINT to the session's group, then SIGTERM, then SIGKILL to whatever of it is left."""
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 15.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
    deadline = time.monotonic() + 10
    while session_processes(sid, zombies=False) and time.monotonic() < deadline:
        time.sleep(0.5)
    for left in session_processes(sid, zombies=False):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(left.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    ttft_s: float | None = None
    end_s: float = 0.0
    tokens: int = 0
    content_chunks: int = 0
    retries: int = 0
    error: str | None = None


def chat_body(model: str, i: int, tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"stream {i}"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class StreamCounter:
    """Feeds SSE ``data`` payloads; keeps TTFT, usage tokens and content chunks."""

    def __init__(self, start: float, result: StreamResult) -> None:
        self.start = start
        self.result = result

    def feed(self, data: str) -> None:
        if has_content(data):
            self.result.content_chunks += 1
            if self.result.ttft_s is None:
                self.result.ttft_s = time.perf_counter() - self.start
        used = usage_tokens(data)
        if used is not None:
            self.result.tokens = used


@dataclass
class Side:
    """One side of the comparison: its client, how to send a stream, its processes."""

    name: str
    open_client: Callable[[], contextlib.AbstractAsyncContextManager[Any]]
    send: Callable[[Any, int, int], Awaitable[StreamResult]]
    processes: Callable[[], list[Proc]]
    metrics_url: str | None
    info: dict[str, Any] = field(default_factory=dict)
    client: Any = None

    async def stream(self, i: int, tokens: int) -> StreamResult:
        return await self.send(self.client, i, tokens)

    async def counters(self) -> dict[str, float] | None:
        if self.metrics_url is None:
            return None
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(self.metrics_url)
        except httpx.HTTPError:
            return None
        return engine_counters(parse_prometheus(response.text)) if response.is_success else None


async def vllm_stream(client: httpx.AsyncClient, model: str, i: int, tokens: int) -> StreamResult:
    result = StreamResult()
    start = time.perf_counter()
    counter = StreamCounter(start, result)
    try:
        async with client.stream("POST", CHAT, json=chat_body(model, i, tokens)) as response:
            if not response.is_success:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                        if data != "[DONE]":
                            counter.feed(data)
    except httpx.HTTPError as exc:
        result.error = repr(exc)[:200]
    result.end_s = time.perf_counter() - start
    return result


async def worker_stream(client: Any, queue: str, model: str, i: int, tokens: int) -> StreamResult:
    """A streaming put read to its end; a put refused before any event is tried again (the
    emulator on a loaded 2-core machine sometimes fails one before the task exists)."""
    from ray_worker.bella.protocol import PutRequest, ResponseMode

    request = PutRequest(
        endpoint=CHAT,
        queue=queue,
        response_mode=ResponseMode.STREAMING,
        data=chat_body(model, i, tokens),
        timeout=300,
    )
    for attempt in range(PUT_ATTEMPTS):
        result = StreamResult(retries=attempt)
        start = time.perf_counter()
        counter = StreamCounter(start, result)
        events = 0
        try:
            async for event in client.put_streaming(request):
                events += 1
                counter.feed(event.data)
            result.end_s = time.perf_counter() - start
            return result
        except Exception as exc:
            if events or attempt == PUT_ATTEMPTS - 1:
                result.error = repr(exc)[:200]
                result.end_s = time.perf_counter() - start
                return result
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def _us(cpu: float, tokens: int) -> float | None:
    return round(cpu * 1e6 / tokens, 1) if tokens else None


async def idle_rates(side: Side, seconds: float) -> tuple[dict[int, float], dict[str, float]]:
    """CPU seconds per second of each process (and per role) over ``seconds`` without load."""
    procs = side.processes()
    before = cpu_map(procs)
    start = time.monotonic()
    await asyncio.sleep(seconds)
    window = time.monotonic() - start
    after = cpu_map(procs)
    rates: dict[int, float] = {}
    for pid, b in before.items():
        a = after.get(pid)
        if a is not None and b is not None:
            rates[pid] = (a - b) / window
    roles: dict[str, float] = {}
    for p in procs:
        roles[p.role] = round(roles.get(p.role, 0.0) + rates.get(p.pid, 0.0), 4)
    return rates, roles


async def measured(
    side: Side,
    idle_rate: Mapping[int, float],
    label: str,
    run: Callable[[], Awaitable[list[StreamResult]]],
    ttfts: list[float] | None = None,
) -> dict[str, Any]:
    """CPU of every process of ``side`` across ``run()`` (plus a short settle), per role;
    the TTFTs are appended to ``ttfts`` when given."""
    procs = side.processes()
    before = cpu_map(procs)
    driver_before = _own_cpu_s()
    started = time.monotonic()
    results = await run()
    seconds = time.monotonic() - started
    await asyncio.sleep(SETTLE_S)
    window_s = time.monotonic() - started
    after = cpu_map(procs)
    driver_cpu = _own_cpu_s() - driver_before
    known = {p.pid for p in procs}
    for proc in side.processes():  # appeared during the phase: all their CPU counts
        if proc.pid not in known:
            procs.append(proc)
            before[proc.pid], after[proc.pid] = 0.0, cpu_s(proc.pid)
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    if ttfts is not None:
        ttfts.extend(r.ttft_s for r in ok if r.ttft_s is not None)
    roles: dict[str, dict[str, float]] = {}
    for p in procs:
        b, a = before.get(p.pid), after.get(p.pid)
        if a is None or b is None:
            continue
        used = a - b
        row = roles.setdefault(p.role, {"processes": 0, "cpu_s": 0.0, "net_cpu_s": 0.0})
        row["processes"] += 1
        row["cpu_s"] += used
        row["net_cpu_s"] += used - idle_rate.get(p.pid, 0.0) * window_s
    role_rows: dict[str, dict[str, Any]] = {
        role: {
            "processes": int(row["processes"]),
            "cpu_s": round(row["cpu_s"], 3),
            "net_cpu_s": round(row["net_cpu_s"], 3),
            "cpu_us_per_token": _us(row["cpu_s"], tokens),
            "net_cpu_us_per_token": _us(row["net_cpu_s"], tokens),
            "cpu_s_per_s": round(row["cpu_s"] / window_s, 4),
        }
        for role, row in sorted(roles.items())
    }
    groups = {
        "host": HOST_ROLES[side.name],
        "engine": ENGINE_ROLES,
        "ray": ("ray", "serve_run"),
    }
    group_rows = {}
    for group, members in groups.items():
        cpu = sum(role_rows[r]["cpu_s"] for r in members if r in role_rows)
        net = sum(role_rows[r]["net_cpu_s"] for r in members if r in role_rows)
        group_rows[group] = {
            "cpu_s": round(cpu, 3),
            "net_cpu_s": round(net, 3),
            "cpu_us_per_token": _us(cpu, tokens),
            "net_cpu_us_per_token": _us(net, tokens),
        }
    figures = {
        "phase": label,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "retries": sum(r.retries for r in results),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "window_s": round(window_s, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "ttft_ms": ttft_summary([r.ttft_s for r in ok if r.ttft_s is not None]),
        "roles": role_rows,
        "groups": group_rows,
        "driver": {"cpu_s": round(driver_cpu, 3), "cpu_us_per_token": _us(driver_cpu, tokens)},
    }
    host = group_rows["host"]["net_cpu_us_per_token"]
    engine = group_rows["engine"]["net_cpu_us_per_token"]
    sys.stderr.write(
        f"[{side.name}] {label}: {len(ok)}/{len(results)} ok, {tokens} tokens in {seconds:.2f} s "
        f"({figures['tokens_per_s']} tok/s), ttft {figures['ttft_ms']}, net us/token host {host} "
        f"engine {engine} roles "
        + " ".join(f"{r}={v['net_cpu_us_per_token']}" for r, v in role_rows.items())
        + "\n"
    )
    sys.stderr.flush()
    return figures


def merge_phases(phases: list[dict[str, Any]], label: str, ttfts: list[float]) -> dict[str, Any]:
    """Several measured phases as one: CPU and tokens summed, TTFTs pooled."""
    tokens = sum(p["tokens"] for p in phases)
    seconds = sum(p["seconds"] for p in phases)
    out: dict[str, Any] = {
        "phase": label,
        "requests": sum(p["requests"] for p in phases),
        "failed": sum(p["failed"] for p in phases),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "ttft_ms": ttft_summary(ttfts),
    }
    for key in ("roles", "groups"):
        merged: dict[str, dict[str, float]] = {}
        for p in phases:
            for name, row in p[key].items():
                into = merged.setdefault(name, {"cpu_s": 0.0, "net_cpu_s": 0.0})
                into["cpu_s"] += row["cpu_s"]
                into["net_cpu_s"] += row["net_cpu_s"]
        out[key] = {
            name: {
                "cpu_s": round(row["cpu_s"], 3),
                "net_cpu_s": round(row["net_cpu_s"], 3),
                "cpu_us_per_token": _us(row["cpu_s"], tokens),
                "net_cpu_us_per_token": _us(row["net_cpu_s"], tokens),
            }
            for name, row in merged.items()
        }
    poller = [p["roles"]["poller"]["cpu_s_per_s"] for p in phases if "poller" in p["roles"]]
    if poller:
        out["poller_cpu_s_per_s_max"] = max(poller)
    return out


async def burst(side: Side, streams: int, tokens: int, offset: int) -> list[StreamResult]:
    return list(await asyncio.gather(*(side.stream(offset + i, tokens) for i in range(streams))))


async def singles(side: Side, count: int, tokens: int, gap_s: float) -> list[StreamResult]:
    out = []
    for i in range(count):
        out.append(await side.stream(10_000 + i, tokens))
        await asyncio.sleep(gap_s)
    return out


async def sustained(side: Side, rate: float, seconds: float, tokens: int) -> list[StreamResult]:
    """Open loop: one request every ``1/rate`` s for ``seconds``, all awaited at the end."""
    tasks = []
    start = time.monotonic()
    n = max(1, int(rate * seconds))
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(side.stream(20_000 + i, tokens)))
    return list(await asyncio.gather(*tasks))


async def run_side(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    """The load shapes on one side, measured."""
    result: dict[str, Any] = {"info": side.info}
    async with side.open_client() as client:
        side.client = client
        for _ in range(2):  # warm-up: connections, the first engine steps, the publisher
            await burst(side, args.streams, 8, 0)
        await singles(side, 2, 8, 0.1)
        procs = side.processes()
        result["processes"] = [proc_detail(p) for p in procs]
        result["executor"] = "mp" if any(p.role == "engine_worker" for p in procs) else "uni"
        warmed_at = time.monotonic()
        await asyncio.sleep(args.idle_settle_s)  # an engine spins a while after its last step
        idle_rate, idle_roles = await idle_rates(side, args.idle_s)
        result["idle_cpu_s_per_s"] = idle_roles
        # Ray's metrics agent has the warm-up's last counts once an export interval has passed.
        await asyncio.sleep(max(0.0, warmed_at + args.metrics_delay_s - time.monotonic()))
        counters_before = await side.counters()
        bursts: list[dict[str, Any]] = []
        ttfts: list[float] = []
        for b in range(args.bursts):
            offset = 100 * (b + 1)
            bursts.append(
                await measured(
                    side,
                    idle_rate,
                    f"burst {b + 1}",
                    lambda o=offset: burst(side, args.streams, args.tokens, o),  # type: ignore[misc]
                    ttfts,
                )
            )
        # The engine's counters reach Ray's metrics agent every 10 s: wait, and read the idle
        # rates after load meanwhile (the poller's: issue 19, item 3).
        _, after_roles = await idle_rates(side, args.metrics_delay_s)
        result["idle_after_bursts_cpu_s_per_s"] = after_roles
        counters_after = await side.counters()
        result["bursts"] = bursts
        total = merge_phases(bursts, "bursts", ttfts)
        total["engine_steps"] = step_figures(counters_before, counters_after)
        result["bursts_total"] = total
        if args.singles:
            result["singles"] = await measured(
                side,
                idle_rate,
                "singles",
                lambda: singles(side, args.singles, args.single_tokens, args.single_gap_s),
            )
        if args.rate and args.rate_s:
            result["sustained"] = await measured(
                side,
                idle_rate,
                f"sustained {args.rate}/s x {args.rate_s} s",
                lambda: sustained(side, args.rate, args.rate_s, args.rate_tokens),
            )
    return result


# ---------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------


def worker_config(args: argparse.Namespace, emulator_url: str, queue: str, port: int) -> Any:
    """``configs/local.yaml`` on this run's emulator, queue, port and engine settings."""
    config = yaml.safe_load(BASE_CONFIG.read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["name"] = APP
    app_args = app["args"]
    app_args["queue_url"] = emulator_url
    app_args["queues"] = [f"{queue}:0", f"{queue}:1"]
    (llm,) = app_args["llm_configs"]
    loading = llm["model_loading_config"]
    loading["model_source"] = str(REPO / loading["model_source"])
    llm["engine_kwargs"]["max_model_len"] = args.max_model_len
    llm["engine_kwargs"]["max_num_seqs"] = args.max_num_seqs
    env = llm.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env.update({k: str(v) for k, v in args.replica_env})
    for key, value in args.set:
        set_path(app_args, key, value)
    # The app is built by Serve's controller: the key reaches the build through the app's
    # runtime_env, as in the e2e tier.
    app["runtime_env"] = {"env_vars": {"BELLA_QUEUE_APIKEY": APIKEY}}
    return config


@contextlib.contextmanager
def worker_side(args: argparse.Namespace, workdir: Path) -> Iterator[Side]:
    """Redis, the emulator, a local Ray and ``serve run`` of the worker, stopped on exit."""
    from ray_worker.bella.producer import ProducerClient
    from ray_worker.emulator.server import EmulatorConfig, EmulatorServer

    with contextlib.ExitStack() as stack:
        redis = RedisServer().start()
        stack.callback(redis.close)
        emulator = EmulatorServer(
            EmulatorConfig(redis_url=redis.url, apikeys=(APIKEY,), port=0, profile="bench")
        ).start()
        stack.callback(emulator.stop)
        cluster = LocalRayCluster(num_cpus=16)
        stack.callback(cluster.stop)
        cluster.start()
        cluster_sid = ray_session_of(cluster.address)
        queue = f"peer-{uuid.uuid4().hex[:6]}"
        port = free_port()
        config = worker_config(args, emulator.url, queue, port)
        path = workdir / "peer-worker.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_path = REPO / ".run" / "bench-peer-serve.log"
        run = stack.enter_context(
            serve_worker(
                path,
                env={"RAY_ADDRESS": cluster.address},
                log_path=log_path,
                cwd=REPO,
                status_url=f"http://127.0.0.1:{port}/bella",
                ready_timeout_s=args.ready_timeout_s,
                cluster_sid=cluster_sid,
            )
        )
        assert run.proc is not None
        serve_sid = run.proc.pid

        def processes() -> list[Proc]:
            found = [
                Proc(worker_role(p.args), p.pid, p.args)
                for p in session_processes(cluster_sid, zombies=False)
            ]
            found += [
                Proc("serve_run", p.pid, p.args)
                for p in session_processes(serve_sid, zombies=False)
            ]
            return found

        metrics_port = _metrics_export_port(processes())
        app_args = config["applications"][0]["args"]
        model = app_args["llm_configs"][0]["model_loading_config"]["model_id"]

        async def send(client: Any, i: int, tokens: int) -> StreamResult:
            return await worker_stream(client, queue, model, i, tokens)

        yield Side(
            name="worker",
            open_client=lambda: ProducerClient(
                emulator.url, APIKEY, timeout_s=300, max_connections=args.streams * 4 + 16
            ),
            send=send,
            processes=processes,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None,
            info={
                "app_args": {k: v for k, v in app_args.items() if k != "queue_url"},
                "log": str(log_path),
            },
        )


def _metrics_export_port(procs: list[Proc]) -> int | None:
    """Ray's metrics agent port, from the command line of a process of the Ray session."""
    for proc in procs:
        match = re.search(r"--metrics[-_]export[-_]port[= ](\d+)", proc.args)
        if match:
            return int(match.group(1))
    return None


@contextlib.contextmanager
def vllm_side(args: argparse.Namespace, llm: Mapping[str, Any]) -> Iterator[Side]:
    """``python -m vllm.entrypoints.openai.api_server`` with the LLM config's engine settings
    and replica environment, stopped (with its engine) on exit."""
    model = llm["model_loading_config"]["model_id"]
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        llm["model_loading_config"]["model_source"],
        "--served-model-name",
        model,
        *engine_cli_args(llm.get("engine_kwargs") or {}),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        *shlex.split(args.peer_arg),
    ]
    env = {**DEFAULT_RAY_ENV, **os.environ, **(llm.get("runtime_env") or {}).get("env_vars", {})}
    env.update({k: str(v) for k, v in args.peer_env})
    log_path = REPO / ".run" / "bench-peer-vllm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + args.ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=5).is_success:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM's server not up in {args.ready_timeout_s} s")
            time.sleep(1.0)

        def processes() -> list[Proc]:
            return [
                Proc("api_server" if p.pid == proc.pid else peer_role(p.args), p.pid, p.args)
                for p in session_processes(proc.pid, zombies=False)
            ]

        async def send(client: httpx.AsyncClient, i: int, tokens: int) -> StreamResult:
            return await vllm_stream(client, model, i, tokens)

        limits = httpx.Limits(max_connections=args.streams * 4 + 16)
        yield Side(
            name="vllm",
            open_client=lambda: httpx.AsyncClient(base_url=base, timeout=300, limits=limits),
            send=send,
            processes=processes,
            metrics_url=f"{base}/metrics",
            info={"command": shlex.join(cmd[1:]), "log": str(log_path)},
        )
    finally:
        stop_session(proc.pid, proc)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def _get(node: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def ratios(peer: dict[str, Any], mine: dict[str, Any]) -> dict[str, float | None]:
    """Worker over vLLM's server, figure by figure."""

    def r(*path: str) -> float | None:
        a, b = _get(mine, *path), _get(peer, *path)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return ratio(a, b)
        return None

    per_token = "net_cpu_us_per_token"
    return {
        "host_cpu_per_token_bursts": r("bursts_total", "groups", "host", per_token),
        "engine_cpu_per_token_bursts": r("bursts_total", "groups", "engine", per_token),
        "engine_core_cpu_per_token_bursts": r("bursts_total", "roles", "engine_core", per_token),
        "tokens_per_s_bursts": r("bursts_total", "tokens_per_s"),
        "ttft_p50_bursts": r("bursts_total", "ttft_ms", "p50"),
        "ttft_p99_bursts": r("bursts_total", "ttft_ms", "p99"),
        "generation_tokens_per_engine_step": r(
            "bursts_total", "engine_steps", "generation_tokens_per_step"
        ),
        "ttft_p50_single": r("singles", "ttft_ms", "p50"),
        "ttft_p99_single": r("singles", "ttft_ms", "p99"),
        "host_cpu_per_token_single": r("singles", "groups", "host", per_token),
        "engine_cpu_per_token_single": r("singles", "groups", "engine", per_token),
        "host_cpu_per_token_sustained": r("sustained", "groups", "host", per_token),
        "engine_cpu_per_token_sustained": r("sustained", "groups", "engine", per_token),
        "tokens_per_s_sustained": r("sustained", "tokens_per_s"),
        "ttft_p50_sustained": r("sustained", "ttft_ms", "p50"),
        "ttft_p99_sustained": r("sustained", "ttft_ms", "p99"),
    }


def goals(ratio_rows: Mapping[str, float | None], mine: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured figure and whether it is met."""

    def check(value: float | None, limit: float, most: bool) -> dict[str, Any]:
        met = None if value is None else (value <= limit if most else value >= limit)
        return {"value": value, "limit": limit, "met": met}

    poller_idle = _get(mine, "idle_cpu_s_per_s", "poller")
    poller_after = _get(mine, "idle_after_bursts_cpu_s_per_s", "poller")
    poller_burst = _get(mine, "bursts_total", "poller_cpu_s_per_s_max")
    return {
        "host_cpu_per_token": check(
            ratio_rows["host_cpu_per_token_bursts"], GOALS["host_cpu_per_token_max"], True
        ),
        "engine_cpu_per_token": check(
            ratio_rows["engine_cpu_per_token_bursts"], GOALS["engine_cpu_per_token_max"], True
        ),
        "poller_idle_cpu_s_per_s": check(
            None if poller_idle is None else max(poller_idle, poller_after or 0.0),
            GOALS["poller_cpu_s_per_s_max"],
            True,
        ),
        "poller_burst_cpu_s_per_s": check(poller_burst, GOALS["poller_cpu_s_per_s_max"], True),
        "tokens_per_s": check(ratio_rows["tokens_per_s_bursts"], GOALS["tokens_per_s_min"], False),
        "single_ttft_p50": check(ratio_rows["ttft_p50_single"], GOALS["single_ttft_p50_max"], True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sides", default="vllm,worker", help="which, in order")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per burst")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per burst stream")
    parser.add_argument("--singles", type=int, default=8, help="single requests, one by one")
    parser.add_argument("--single-tokens", type=int, default=32)
    parser.add_argument("--single-gap-s", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=4.0, help="sustained requests/s (0: none)")
    parser.add_argument("--rate-s", type=float, default=10.0, help="sustained phase length")
    parser.add_argument("--rate-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle CPU baseline window")
    parser.add_argument(
        "--idle-settle-s", type=float, default=3.0, help="wait after the warm-up before it"
    )
    parser.add_argument(
        "--metrics-delay-s",
        type=float,
        default=12.0,
        help="idle window after the bursts and before them (Ray exports metrics every 10 s)",
    )
    parser.add_argument(
        "--set",
        type=parse_assignment,
        action="append",
        default=[],
        metavar="PATH=JSON",
        help="worker app args, dotted (llm_configs.0.engine_kwargs.x=...; null deletes)",
    )
    parser.add_argument(
        "--replica-env", type=parse_assignment, action="append", default=[], metavar="K=V"
    )
    parser.add_argument(
        "--peer-env", type=parse_assignment, action="append", default=[], metavar="K=V"
    )
    parser.add_argument("--peer-arg", default="", help="extra flags for vLLM's server")
    parser.add_argument("--ready-timeout-s", type=float, default=420.0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="per side's load")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "peer.json")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    result: dict[str, Any] = {
        "benchmark": "peer",
        "cpus": os.cpu_count(),
        "note": "one run on shared cores: figures are noisy; net_* subtract each process's "
        "idle CPU rate",
        "load": {
            "bursts": args.bursts,
            "streams": args.streams,
            "tokens": args.tokens,
            "singles": args.singles,
            "single_tokens": args.single_tokens,
            "rate_per_s": args.rate,
            "rate_s": args.rate_s,
            "rate_tokens": args.rate_tokens,
        },
        "sides": {},
    }

    async def bounded(side: Side) -> dict[str, Any]:
        async with asyncio.timeout(args.max_seconds):
            return await run_side(side, args)

    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        # The worker's config, made once: its LLM config (engine settings, replica
        # environment) is what vLLM's server gets too.
        llm = worker_config(args, "http://unused", "unused", 0)["applications"][0]["args"][
            "llm_configs"
        ][0]
        for name in sides:
            started = time.monotonic()
            sys.stderr.write(f"[{name}] starting\n")
            if name == "vllm":
                with vllm_side(args, llm) as side:
                    figures = asyncio.run(bounded(side))
            elif name == "worker":
                with worker_side(args, Path(tmp)) as side:
                    figures = asyncio.run(bounded(side))
            else:
                raise SystemExit(f"unknown side {name!r}")
            figures["wall_s"] = round(time.monotonic() - started, 1)
            result["sides"][name] = figures
            if "vllm" in result["sides"] and "worker" in result["sides"]:
                peer, mine = result["sides"]["vllm"], result["sides"]["worker"]
                result["ratios_worker_over_vllm"] = ratios(peer, mine)
                result["goals"] = goals(result["ratios_worker_over_vllm"], mine)
            # Written after each side, whatever happens later; printed once at the end.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
