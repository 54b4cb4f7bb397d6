"""Benchmark of CPU per streamed event in each Ray process of the worker, at 1x and 4x streams.

Run ``python -m bench.bench_cpu [--streams N] [--tokens T]``. It starts a throwaway
redis-server, the Bella-Queue emulator and a local Ray head on loopback, deploys the worker
with the simulated engine (``max_num_seqs`` fits every stream of the larger burst at once,
``tokens_per_s`` 200, ``ttft_s`` 0.05, a fixed length of T tokens), and puts, as a producer
would (streaming puts, SSE read to the end; a put the emulator refuses before any event is
retried), after a warm-up of 4N two-token streams, a burst of N concurrent streaming chat
tasks (default 64 x 200 tokens), then one of 4N. Across each burst it reads the CPU time (user +
sys) of each Ray process of the worker, found in Ray's actor table (pid, class name, node):

- ``poller``: the Serve replica whose class name contains ``QueuePoller``;
- ``llm``: the other Serve replicas of the app (the LLM deployment's, however many);
- ``publisher``: each ``RedisPublisher`` actor (class name), or an actor named
  ``bella-publisher...`` (one per node after the redesign; one owned by the poller before).

Figures per process and per role: CPU seconds, the SSE events the producers received, and
microseconds of CPU per event; ``net_*`` subtract the process's idle CPU rate (measured over
``--idle-s`` before the bursts) times the burst's window. ``ratio_poller_cpu_4x_vs_1x`` is the
poller's CPU at 4N streams over N (flat is the goal once no token crosses the poller; but a
larger burst also lasts longer on a saturated machine, and a poller's own loops cost CPU per
second, so ``cpu_s_per_s`` per role, the CPU rate over the burst's window, and
``ratio_poller_cpu_per_s_4x_vs_1x`` are printed beside it; ``net_*`` can come out negative
when the idle loop costs more than the busy one). ``driver`` is this process (the emulator and
the producers), for scale.

The actors come from ``ray.util.state.list_actors(detail=True)`` when Ray's dashboard (the
state API server) runs, else from the GCS actor table (``actor_source`` says which;
``LocalRayCluster`` starts Ray without the dashboard). One JSON object is printed and written
to ``bench/results/cpu.json``; the run is bounded by ``--max-seconds`` and every process it
starts is stopped on the way out. This module must not be imported by the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import (
    RESULTS_DIR,
    emit,
    has_content,
    local_stack,
    ratio,
    usage_tokens,
    wait_ready,
)
from ray_worker.bella.producer import ProducerClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.testing.serve_run import deployed_worker

APIKEY = "bench-key"
APP = "bench-cpu"
MODEL = "sim-cpu"
CHAT = "/v1/chat/completions"
TTFT_S = 0.05
TOKENS_PER_S = 200.0
SCALE = 4
SETTLE_S = 0.5
PUT_ATTEMPTS = 4
ROLES = ("poller", "llm", "publisher")


def worker_args(queue_url: str, queue: str, args: argparse.Namespace) -> dict[str, Any]:
    max_num_seqs = args.streams * SCALE  # every stream of the larger burst runs at once
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0", f"{queue}:1"],
        "register_queues": True,
        "engine": "simulated",
        "llm_configs": [
            {
                "model_loading_config": {"model_id": MODEL, "model_source": MODEL},
                "accelerator_config": {"kind": "cpu"},
                "experimental_configs": {
                    "bella_sim_engine": {
                        "max_num_seqs": max_num_seqs,
                        "ttft_s": TTFT_S,
                        "tokens_per_s": TOKENS_PER_S,
                        "max_tokens": args.tokens,
                        "kv_cache_tokens": max_num_seqs * (args.tokens + 64),
                    }
                },
                "deployment_config": {
                    "num_replicas": args.replicas,
                    "ray_actor_options": {"num_cpus": 0.1},
                },
            }
        ],
    }


# ---------------------------------------------------------------------------------------
# The worker's Ray processes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One Ray actor process of the worker."""

    role: str
    class_name: str
    name: str
    pid: int
    node_id: str


def role_of(class_name: str, name: str) -> str | None:
    """``poller``, ``llm``, ``publisher``, or None for an actor that is not the worker's."""
    if "QueuePoller" in class_name:
        return "poller"
    if "RedisPublisher" in class_name or name.startswith(("bella-publisher", "event-publisher")):
        return "publisher"
    if class_name.startswith(f"ServeReplica:{APP}:"):
        return "llm"
    return None


def _state_api_actors(address: str) -> list[tuple[str, str, int, str]]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=address,
        filters=[("state", "=", "ALIVE")],
        detail=True,
        limit=10_000,
        timeout=10,
        raise_on_missing_output=False,
    )
    return [(a.class_name or "", a.name or "", int(a.pid or 0), a.node_id or "") for a in actors]


def _gcs_actors() -> list[tuple[str, str, int, str]]:
    from ray._private import state

    rows = []
    for info in state.actors().values():
        if info.get("State") != "ALIVE":
            continue
        node = (info.get("Address") or {}).get("NodeID", "")
        rows.append(
            (info.get("ActorClassName", ""), info.get("Name", ""), int(info.get("Pid", 0)), node)
        )
    return rows


class ActorFinder:
    """Lists the worker's actor processes; remembers whether the state API answered."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.source: str | None = None

    def find(self) -> list[Proc]:
        rows: list[tuple[str, str, int, str]] | None = None
        if self.source != "gcs_actor_table":
            try:
                rows = _state_api_actors(self.address)
                self.source = "ray.util.state.list_actors"
            except Exception as exc:  # no dashboard (state API server): the GCS table
                logging.getLogger(__name__).info("state API unavailable (%s); using GCS", exc)
        if rows is None:
            rows = _gcs_actors()
            self.source = "gcs_actor_table"
        procs = []
        for class_name, name, pid, node in rows:
            role = role_of(class_name, name)
            if role is not None and pid > 0:
                procs.append(Proc(role, class_name, name, pid, node))
        return sorted(procs, key=lambda p: (ROLES.index(p.role), p.class_name, p.pid))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), None once it is gone.

    From ``/proc/<pid>/stat`` (fields 14 and 15, utime and stime, in clock ticks): the
    worker's processes run on this machine (one local node).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_of(procs: list[Proc]) -> dict[int, float | None]:
    return {p.pid: cpu_s(p.pid) for p in procs}


# ---------------------------------------------------------------------------------------
# The producers
# ---------------------------------------------------------------------------------------


@dataclass
class StreamCount:
    events: int = 0
    content_events: int = 0
    usage_tokens: int | None = None
    put_retries: int = 0


async def one_stream(client: ProducerClient, queue: str, i: int, tokens: int) -> StreamCount:
    """One streaming put read to its end; a put refused before any event is tried again.

    On the loaded 2-core machine the emulator sometimes fails a put (its Redis connection
    times out) before the task exists; a producer would retry that, and the burst keeps its
    size. A stream cut after its first event raises.
    """
    request = PutRequest(
        endpoint=CHAT,
        queue=queue,
        response_mode=ResponseMode.STREAMING,
        data={
            "model": MODEL,
            "messages": [{"role": "user", "content": f"stream {i}"}],
            "stream": True,
            "max_tokens": tokens,
        },
        timeout=300,
    )
    for attempt in range(PUT_ATTEMPTS):
        count = StreamCount(put_retries=attempt)
        try:
            async for event in client.put_streaming(request):
                count.events += 1
                if has_content(event.data):
                    count.content_events += 1
                used = usage_tokens(event.data)
                if used is not None:
                    count.usage_tokens = used
            return count
        except Exception:
            if count.events or attempt == PUT_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


async def burst(client: ProducerClient, queue: str, streams: int, tokens: int) -> dict[str, Any]:
    start = time.monotonic()
    results = await asyncio.gather(
        *(one_stream(client, queue, i, tokens) for i in range(streams)), return_exceptions=True
    )
    seconds = time.monotonic() - start
    counts = [r for r in results if isinstance(r, StreamCount)]
    failures = [r for r in results if not isinstance(r, StreamCount)]
    usage = [c.usage_tokens for c in counts]
    return {
        "streams": streams,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "sse_events": sum(c.events for c in counts),
        "content_events": sum(c.content_events for c in counts),
        "usage_completion_tokens": (
            sum(u for u in usage if u is not None) if all(u is not None for u in usage) else None
        ),
        "put_retries": sum(c.put_retries for c in counts),
        "failed_streams": len(failures),
        "first_failure": repr(failures[0])[:300] if failures else None,
    }


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _us_per_event(cpu: float | None, events: int) -> float | None:
    return round(cpu * 1e6 / events, 1) if cpu is not None and events else None


async def measured_burst(
    finder: ActorFinder,
    idle_rate: dict[int, float],
    client: ProducerClient,
    queue: str,
    streams: int,
    tokens: int,
) -> dict[str, Any]:
    procs = finder.find()
    driver_before = _own_cpu_s()
    before = cpu_of(procs)
    started = time.monotonic()
    figures = await burst(client, queue, streams, tokens)
    await asyncio.sleep(SETTLE_S)  # what the worker does after the last event, in the window
    window_s = time.monotonic() - started
    after = cpu_of(procs)
    driver_cpu = _own_cpu_s() - driver_before
    # Actors that appeared during the burst (a new replica or publisher): all their CPU counts.
    known = {p.pid for p in procs}
    for proc in finder.find():
        if proc.pid not in known:
            procs.append(proc)
            before[proc.pid], after[proc.pid] = 0.0, cpu_s(proc.pid)
    events = int(figures["sse_events"])
    rows: list[dict[str, Any]] = []
    for p in procs:
        b, a = before.get(p.pid), after.get(p.pid)
        used = None if a is None or b is None else a - b
        net = None if used is None else used - idle_rate.get(p.pid, 0.0) * window_s
        rows.append(
            {
                "role": p.role,
                "class_name": p.class_name,
                "name": p.name,
                "pid": p.pid,
                "node_id": p.node_id,
                "cpu_s": None if used is None else round(used, 3),
                "net_cpu_s": None if net is None else round(net, 3),
                "events": events,
                "cpu_us_per_event": _us_per_event(used, events),
                "net_cpu_us_per_event": _us_per_event(net, events),
            }
        )
    roles: dict[str, Any] = {}
    for role in ROLES:
        mine = [r for r in rows if r["role"] == role and r["cpu_s"] is not None]
        total = sum(r["cpu_s"] for r in mine)
        net_total = sum(r["net_cpu_s"] for r in mine)
        roles[role] = {
            "processes": len(mine),
            "cpu_s": round(total, 3),
            "net_cpu_s": round(net_total, 3),
            "cpu_us_per_event": _us_per_event(total, events),
            "net_cpu_us_per_event": _us_per_event(net_total, events),
            "cpu_s_per_s": round(total / window_s, 4),
        }
    return {
        **figures,
        "window_s": round(window_s, 2),
        "processes": rows,
        "roles": roles,
        "driver": {
            "note": "this process: the emulator (HTTP, SSE, Redis reads) and the producers",
            "cpu_s": round(driver_cpu, 3),
            "cpu_us_per_event": _us_per_event(driver_cpu, events),
        },
    }


async def idle_cpu_rates(procs: list[Proc], seconds: float) -> tuple[dict[int, float], float]:
    """CPU seconds per second of each process while no task runs, and the window's length."""
    before = cpu_of(procs)
    start = time.monotonic()
    await asyncio.sleep(seconds)
    window = time.monotonic() - start
    after = cpu_of(procs)
    rates = {}
    for pid, b in before.items():
        a = after.get(pid)
        if a is not None and b is not None:
            rates[pid] = (a - b) / window
    return rates, window


def report(label: str, figures: dict[str, Any]) -> None:
    """One human-readable line per process, on stderr (stdout carries the JSON)."""
    err = sys.stderr
    err.write(
        f"{label}: {figures['streams']} streams x {figures['tokens']} tokens, "
        f"{figures['sse_events']} SSE events in {figures['seconds']} s "
        f"({figures['failed_streams']} failed, {figures['put_retries']} puts retried)\n"
    )
    for r in figures["processes"]:
        err.write(
            f"  {r['role']:<9} pid {r['pid']:<7} {r['class_name'][:44]:<44} "
            f"cpu {r['cpu_s']} s  events {r['events']}  {r['cpu_us_per_event']} us/event "
            f"(net of idle {r['net_cpu_us_per_event']})\n"
        )
    err.flush()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "cpu",
        "cpus": os.cpu_count(),
        "note": "2 shared cores, one run: figures are noisy",
        "config": {
            "streams": args.streams,
            "streams_scaled": args.streams * SCALE,
            "tokens": args.tokens,
            "replicas": args.replicas,
            "max_num_seqs": args.streams * SCALE,
            "ttft_s": TTFT_S,
            "tokens_per_s": TOKENS_PER_S,
        },
    }
    queue = f"cpu-{uuid.uuid4().hex[:6]}"
    async with local_stack(APIKEY) as stack:
        finder = ActorFinder(stack.cluster.address)
        with deployed_worker(worker_args(stack.emulator.url, queue, args), APP, APIKEY) as handle:
            await wait_ready(handle, args.ready_timeout_s)
            connections = args.streams * SCALE + 16
            async with ProducerClient(
                stack.emulator.url, APIKEY, timeout_s=300, max_connections=connections
            ) as client:
                # Warm-up at the larger burst's width: HTTP and Redis connections, the first
                # engine requests, the publisher actor.
                await burst(client, queue, args.streams * SCALE, 2)
                procs = finder.find()
                idle_rate, idle_s = await idle_cpu_rates(procs, args.idle_s)
                result["actor_source"] = finder.source
                result["idle"] = {
                    "seconds": round(idle_s, 2),
                    "cpu_s_per_s": {
                        role: round(
                            sum(idle_rate.get(p.pid, 0.0) for p in procs if p.role == role), 4
                        )
                        for role in ROLES
                    },
                }
                one = await measured_burst(
                    finder, idle_rate, client, queue, args.streams, args.tokens
                )
                report("1x", one)
                scaled = await measured_burst(
                    finder, idle_rate, client, queue, args.streams * SCALE, args.tokens
                )
                report(f"{SCALE}x", scaled)
        result["bursts"] = {"1x": one, f"{SCALE}x": scaled}
        poller_1, poller_4 = one["roles"]["poller"], scaled["roles"]["poller"]
        result["ratio_events_4x_vs_1x"] = ratio(scaled["sse_events"], one["sse_events"])
        result["ratio_poller_cpu_4x_vs_1x"] = ratio(poller_4["cpu_s"], poller_1["cpu_s"])
        result["ratio_poller_net_cpu_4x_vs_1x"] = ratio(
            poller_4["net_cpu_s"], poller_1["net_cpu_s"]
        )
        result["ratio_poller_cpu_per_s_4x_vs_1x"] = ratio(
            poller_4["cpu_s_per_s"], poller_1["cpu_s_per_s"]
        )
        result["ratio_poller_cpu_per_event_4x_vs_1x"] = ratio(
            poller_4["cpu_us_per_event"] or 0.0, poller_1["cpu_us_per_event"] or 0.0
        )
        emit(result, args.out)  # before tear-down, whatever happens there
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=64, help=f"the 1x burst ({SCALE}x follows)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--replicas", type=int, default=1, help="LLM replicas")
    parser.add_argument("--idle-s", type=float, default=3.0, help="idle CPU baseline window")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu.json")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per put otherwise

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.max_seconds):
            return await main_async(args)

    asyncio.run(bounded())


if __name__ == "__main__":
    main()
