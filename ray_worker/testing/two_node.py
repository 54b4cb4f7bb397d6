"""Two Ray nodes on loopback running the worker app (simulated engine): one check, one report.

``python -m ray_worker.testing.two_node`` starts a real ``redis-server``, the Bella-Queue
emulator, a Ray head (``LocalRayCluster``) and a second Ray node joined to it
(``ray start --address``, every port free and on 127.0.0.1), deploys the worker app with one
simulated LLM replica per node (``max_replicas_per_node: 1``), puts concurrent streaming
tasks, then prints one JSON report on stdout (the line starting with ``REPORT_PREFIX``): the
nodes, each node's ``RedisPublisher`` (its node, its leases, what it published), each LLM
replica (its node, its ``EventBusClient`` session and the publisher actor that client uses),
and the streams (complete and in order or not). ``tests/integration/test_two_nodes.py``
asserts on it.

It runs in its own process because a process connects to one Ray cluster only (the test
session is already connected to another). Everything it starts is stopped on the way out,
on failure and on SIGTERM too. Never used by the worker itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from ray_worker.testing.ray_cluster import LocalRayCluster
from ray_worker.testing.redis_server import RedisServer, free_port

__all__ = ["REPORT_PREFIX", "RayWorkerNode", "main", "run_check"]

REPORT_PREFIX = "TWO-NODE-REPORT "
"""What starts the report's line on stdout."""

APIKEY = "two-node-key"
MODEL = "sim-model"


class RayWorkerNode:
    """A non-head Ray node (``ray start --address --block``) on loopback, owned by this object."""

    def __init__(
        self,
        head_address: str,
        num_cpus: float,
        *,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        ray_executable: str,
        object_store_memory: int = 128 * 1024 * 1024,
    ) -> None:
        self.head_address = head_address
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.env = env or {}
        self.ray_executable = ray_executable
        self.object_store_memory = object_store_memory
        self._temp_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def log_path(self) -> Path | None:
        """The ``ray start`` output."""
        return None if self._temp_dir is None else self._temp_dir / "ray-start.log"

    @property
    def running(self) -> bool:
        """Whether the ``ray start`` process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 90.0) -> RayWorkerNode:
        """Start the node and wait until ``ray start`` says it runs."""
        self._temp_dir = Path(tempfile.mkdtemp(prefix="bray-node-", dir="/tmp"))
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        args = [
            self.ray_executable,
            "start",
            f"--address={self.head_address}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            f"--object-store-memory={self.object_store_memory}",
            "--disable-usage-stats",
            f"--temp-dir={self._temp_dir}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        env = {**os.environ}
        for key, value in self.env.items():
            env.setdefault(key, value)
        assert self.log_path is not None
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"worker node's ray start exited early:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if b"Ray runtime started" in self.log_path.read_bytes():
                    return self
            time.sleep(0.25)
        raise RuntimeError(f"worker node did not come up in {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        """The last lines of the ``ray start`` output."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the ``ray start`` process (Ray stops its raylet and workers), then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout_s)
            # Whatever is left of its session (raylet, workers) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


def _app_args(queue_url: str, queue: str, tokens_per_s: float) -> dict[str, Any]:
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0"],
        "register_queues": True,
        "engine": "simulated",
        "poller": {"process_timeout_s": 3, "process_max_retries": 1},
        "llm_configs": [
            {
                "model_loading_config": {"model_id": MODEL, "model_source": MODEL},
                "accelerator_config": {"kind": "cpu"},
                "experimental_configs": {
                    "bella_sim_engine": {
                        "max_num_seqs": 8,
                        "ttft_s": 0.02,
                        "tokens_per_s": tokens_per_s,
                        "max_model_len": 8192,
                    }
                },
                "deployment_config": {
                    "num_replicas": 2,
                    "max_replicas_per_node": 1,
                    # A replica holds at most a full batch: Serve's router must send the rest
                    # of the burst to the other node's replica (by default it may queue all 16
                    # on one when the other answers its probes slowly on a busy machine).
                    "max_ongoing_requests": 8,
                    "ray_actor_options": {"num_cpus": 0.1},
                },
            }
        ],
    }


# -- probes run inside the actors (``__ray_call__``) -------------------------------------------


def _publisher_probe(actor: Any) -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "actor_id": ctx.get_actor_id(),
        "lease_sessions": sorted(actor._leases),
    }


def _replica_probe(actor: Any) -> dict[str, Any]:
    """Inside a Serve replica actor: its node and its task host's ``EventBusClient``."""
    import ray

    out: dict[str, Any] = {"node_id": ray.get_runtime_context().get_node_id()}
    try:
        server = actor._replica_impl._user_callable_wrapper.user_callable
    except AttributeError as exc:  # Serve internals moved: the lease check still holds
        out["probe_error"] = f"no user callable: {exc!r}"
        return out
    tasks = getattr(server, "_tasks", None)
    out["is_llm_replica"] = tasks is not None
    if tasks is not None:
        events = tasks.events
        handle = events.actor
        out["session"] = events.session
        out["bus_started"] = events.started
        out["publisher_actor_id"] = None if handle is None else handle._actor_id.hex()
        out["client_stats"] = events.stats()
    return out


# -- the check ---------------------------------------------------------------------------------


def _wait(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s:.0f} s (last error: {last_error!r})")


async def _streams(queue_url: str, queue: str, tasks: int, max_tokens: int) -> list[dict[str, Any]]:
    from ray_worker.bella.producer import ProducerClient
    from ray_worker.bella.protocol import PutRequest, ResponseMode

    async def one(client: ProducerClient, i: int) -> dict[str, Any]:
        request = PutRequest(
            endpoint="/v1/chat/completions",
            queue=queue,
            response_mode=ResponseMode.STREAMING,
            timeout=120,
            data={
                "model": MODEL,
                "messages": [{"role": "user", "content": f"stream {i}"}],
                "max_tokens": max_tokens,
            },
        )
        started = time.monotonic()
        try:
            events = [event async for event in client.put_streaming(request)]
        except Exception as exc:
            return {"i": i, "error": f"{type(exc).__name__}: {exc}"}
        ids = [e.id for e in events]
        return {
            "i": i,
            "events": len(events),
            "in_order": ids == [str(n) for n in range(len(events))],
            "done": bool(events) and events[-1].data == "[DONE]",
            "first_ids": ids[:3],
            "last_data": events[-1].data[:120] if events else None,
            "seconds": round(time.monotonic() - started, 2),
        }

    async with ProducerClient(queue_url, APIKEY, timeout_s=120) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(tasks))))


def _named(prefix: str, namespace: str | None = None) -> list[dict[str, str]]:
    import ray

    return [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix) and (namespace is None or a["namespace"] == namespace)
    ]


def _get(ref: Any, timeout_s: float = 30.0) -> Any:
    import ray

    return ray.get(ref, timeout=timeout_s)


def _inspect(app: str) -> dict[str, Any]:
    import ray

    from ray_worker.eventbus.shared import PUBLISHER_NAMESPACE
    from ray_worker.hop import POLLER_DEPLOYMENT

    publishers: list[dict[str, Any]] = []
    for entry in _named(f"event-publisher:{app}:", PUBLISHER_NAMESPACE):
        handle = ray.get_actor(entry["name"], namespace=PUBLISHER_NAMESPACE)
        probe: dict[str, Any] = _get(handle.__ray_call__.remote(_publisher_probe))
        stats: dict[str, Any] = _get(handle.stats.remote())
        publishers.append(
            {
                "name": entry["name"],
                "named_node_id": entry["name"].rsplit(":", 1)[-1],
                **probe,
                "published": stats.get("published"),
                "batches": stats.get("batches"),
                "dropped_progress": stats.get("dropped_progress"),
                "dropped_completions": stats.get("dropped_completions"),
                "last_error": stats.get("last_error"),
            }
        )
    replicas: list[dict[str, Any]] = []
    for entry in _named(f"SERVE_REPLICA::{app}#"):
        if f"#{POLLER_DEPLOYMENT}#" in entry["name"]:
            continue
        handle = ray.get_actor(entry["name"], namespace=entry["namespace"])
        seen: dict[str, Any] = _get(handle.__ray_call__.remote(_replica_probe))
        replicas.append({"name": entry["name"], **seen})
    return {"publishers": publishers, "replicas": replicas}


def run_check(
    *, tasks: int = 16, max_tokens: int = 300, tokens_per_s: float = 100.0
) -> dict[str, Any]:
    """Start everything, run the streams, inspect the actors, stop everything; the report."""
    import ray
    from ray import serve

    from ray_worker.emulator.server import EmulatorConfig, EmulatorServer
    from ray_worker.testing.serve_run import deployed_worker

    report: dict[str, Any] = {"ok": False}
    timings: dict[str, float] = {}
    report["timings_s"] = timings
    t0 = time.monotonic()

    def mark(name: str) -> None:
        timings[name] = round(time.monotonic() - t0, 2)

    app = f"two-node-{uuid.uuid4().hex[:6]}"
    queue = f"q-two-node-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        redis = RedisServer().start()
        stack.callback(redis.close)
        emulator = EmulatorServer(
            EmulatorConfig(redis_url=redis.url, apikeys=(APIKEY,), port=0, profile="test")
        ).start()
        stack.callback(emulator.stop)
        mark("redis_emulator")

        head = LocalRayCluster(num_cpus=4)
        worker = RayWorkerNode(head.address, 4, env=head.env, ray_executable=head.ray_executable)
        # Stopped in reverse: Serve and the driver, then this node, then the head.
        stack.callback(head.stop)
        stack.callback(worker.stop)
        stack.callback(head.disconnect)
        starting = _NodesStarting(head, worker, mark)
        starting.start()
        # Stopped midway (SIGTERM), the start finishes first, so nothing starts after its stop.
        stack.callback(starting.join, 180)
        # Meanwhile the driver pays for importing the app (vLLM, ray.serve.llm): tens of s.
        from ray_worker.app import build_app  # noqa: F401

        mark("app_imported")
        starting.join_or_raise(timeout_s=240)
        head.connect()
        # Connecting installs Ray's own fatal-signal handler (it aborts on SIGTERM, skipping
        # every cleanup): ours again, so a SIGTERM stops what we started.
        signal.signal(signal.SIGTERM, _on_sigterm)

        def two_nodes() -> list[dict[str, Any]] | None:
            alive = [n for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
            return alive if len(alive) == 2 else None

        report["nodes"] = sorted(
            (
                {"node_id": n["NodeID"], "address": n["NodeManagerAddress"]}
                for n in _wait(two_nodes, 60, "two live Ray nodes")
            ),
            key=lambda n: str(n["node_id"]),
        )
        report["head_node_id"] = ray.get_runtime_context().get_node_id()
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": free_port()},
        )
        mark("serve_started")

        worker_app = stack.enter_context(
            deployed_worker(_app_args(emulator.url, queue, tokens_per_s), app, APIKEY)
        )

        def ready() -> bool:
            status = worker_app.status.remote().result(timeout_s=30)
            pool = status["pools"][0]
            return bool(status["state"] == "running" and pool["capacity"]["replicas"] >= 2)

        _wait(ready, 150, "the worker running with 2 replicas", interval_s=0.5)

        def attached() -> dict[str, Any] | None:
            seen = _inspect(app)
            llm = [r for r in seen["replicas"] if r.get("is_llm_replica", True)]
            return seen if len(llm) == 2 and all(r.get("bus_started") for r in llm) else None

        report["before"] = _wait(attached, 60, "both LLM replicas attached to a publisher")
        mark("worker_ready")

        streams = asyncio.run(_streams(emulator.url, queue, tasks, max_tokens))
        mark("streams_done")
        report["streams"] = streams
        report["after"] = _inspect(app)
        report["ok"] = True
        mark("inspected")
    mark("stopped")
    return report


class _NodesStarting(threading.Thread):
    """Starts the head, then the worker node, in the background (only subprocesses here)."""

    def __init__(self, head: LocalRayCluster, worker: RayWorkerNode, mark: Any) -> None:
        super().__init__(name="two-node-start", daemon=True)
        self.head, self.worker, self.mark = head, worker, mark
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.head.start()
            self.mark("head_started")
            self.worker.head_address = self.head.address  # a retried start changes the port
            self.worker.start()
            self.mark("worker_node_started")
        except BaseException as exc:
            self.error = exc

    def join_or_raise(self, timeout_s: float) -> None:
        self.join(timeout_s)
        if self.is_alive():
            raise TimeoutError(f"the Ray nodes did not start within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup run
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the check; print the JSON report as the last line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m ray_worker.testing.two_node")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--tokens-per-s", type=float, default=100.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run_check(
            tasks=args.tasks, max_tokens=args.max_tokens, tokens_per_s=args.tokens_per_s
        )
    except BaseException as exc:
        report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report["traceback"] = traceback.format_exc()[-4000:]
    sys.stdout.write(REPORT_PREFIX + json.dumps(report, default=str) + "\n")
    sys.stdout.flush()
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
