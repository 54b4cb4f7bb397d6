"""``ray-worker serve``: the worker started as an operator would, stopped with SIGTERM, drains
its in-flight tasks (each gets its answer) and leaves no Ray process behind; and on a Ray
started before it, as ``ray up cluster.yaml`` leaves one, the app is built with the
environment of that Ray's start, not of the shell that runs ``serve run``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.ray_env import CONTRACT
from ray_worker.testing.ray_cluster import DEFAULT_RAY_ENV, LocalRayCluster
from ray_worker.testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
STATUS_URL = "http://127.0.0.1:8000/bella"


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,sid,comm"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return [" ".join(r) for r in rows if len(r) == 3 and r[1] == str(sid)]


async def _status() -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(STATUS_URL)
            if response.is_success:
                body: dict[str, Any] = response.json()
                return body
    return None


async def _ray_worker_serve(env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """``ray-worker serve configs/simulated.yaml`` as an operator starts it, in its own session."""
    return await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "ray_worker.cli", "serve", "configs/simulated.yaml"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def test_sigterm_drains_in_flight_tasks(emulator: EmulatorServer, tmp_path: Path) -> None:
    queue = f"srv-{uuid.uuid4().hex[:6]}"
    env = {
        **DEFAULT_RAY_ENV,
        **os.environ,
        "BELLA_QUEUE_URL": emulator.url,
        "BELLA_QUEUE_APIKEY": emulator.apikey,
        "BELLA_QUEUE_QUEUES": f"{queue}:0,{queue}:1",
    }
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = await _ray_worker_serve(env, log)
    try:

        async def ready() -> bool:
            status = await _status()
            return bool(
                status
                and status["state"] == "running"
                and status["pools"][0]["capacity"]["replicas"] > 0
            )

        await wait_for(ready, timeout=240, interval=1.0)
        async with QueueClient(emulator.url, emulator.apikey) as client:
            # 200 tokens at 200 tokens/s: about a second of generation, under way at SIGTERM.
            data = {
                "model": "sim-model",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 200,
            }
            request = PutRequest(
                endpoint="/v1/chat/completions",
                queue=queue,
                response_mode=ResponseMode.BLOCKING,
                data=data,
                timeout=120,
            )
            answers = [asyncio.create_task(client.put_blocking(request)) for _ in range(3)]

            async def running() -> bool:
                status = await _status()
                return bool(status and status["pools"][0]["capacity"]["engine_running"] >= 3)

            await wait_for(running, timeout=30, interval=0.05)
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*answers), 120)
        assert [r.status_code for r in results] == [200, 200, 200]
        code = await asyncio.to_thread(proc.wait, 120)
        assert code == 0
        leftovers: list[str] = []

        def gone() -> bool:
            leftovers[:] = _session_processes(proc.pid)
            return not leftovers

        await wait_for(gone, timeout=60, interval=0.5)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _blocking_task(queue: str) -> PutRequest:
    data = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    return PutRequest(
        endpoint="/v1/chat/completions",
        queue=queue,
        response_mode=ResponseMode.BLOCKING,
        data=data,
        timeout=120,
    )


async def _ray_environment_line(env: dict[str, str]) -> str:
    """The ``ray environment`` line of ``ray-worker check`` run from a shell with ``env``."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ray_worker.cli", "check", "--config", "configs/simulated.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if " ray environment " in line]
    assert len(lines) == 1, done.stdout + done.stderr
    return lines[0]


async def test_serve_run_on_a_started_ray_builds_with_that_rays_environment(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cluster.yaml's shape on one machine: Ray started with the key (and, here, the queue URL
    and queues) in its environment, then ``ray-worker serve`` from a shell that has none of
    them. ``serve run`` of a config on a running Ray submits it to Serve's controller, which
    builds the app in a Ray task: a key only in the ``serve run`` shell would never reach it."""
    queue = f"srvc-{uuid.uuid4().hex[:6]}"
    for name in CONTRACT:
        monkeypatch.delenv(name, raising=False)
    rays_env = {
        "BELLA_QUEUE_URL": emulator.url,
        "BELLA_QUEUE_APIKEY": emulator.apikey,
        "BELLA_QUEUE_QUEUES": f"{queue}:0",
    }
    cluster = LocalRayCluster(num_cpus=8, env=rays_env)
    log = (tmp_path / "serve.log").open("wb")
    proc: subprocess.Popen[bytes] | None = None
    try:
        await asyncio.to_thread(cluster.start)
        shell = {k: v for k, v in {**DEFAULT_RAY_ENV, **os.environ}.items() if k not in CONTRACT}
        shell["RAY_ADDRESS"] = cluster.address
        # `ray-worker check` tells an operator which environment the app will get.
        same = await _ray_environment_line({**shell, **rays_env})
        assert same.startswith("ok "), same
        other_key = {**shell, **rays_env, "BELLA_QUEUE_APIKEY": "not-the-rays-key"}
        differs = await _ray_environment_line(other_key)
        assert differs.startswith("FAIL "), differs
        assert "is not this shell's" in differs
        assert "not-the-rays-key" not in differs

        proc = await _ray_worker_serve(shell, log)

        async def ready() -> bool:
            status = await _status()
            return bool(status and status["state"] == "running")

        await wait_for(ready, timeout=240, interval=1.0)
        status = await _status()
        assert status
        assert status["queues"] == [f"{queue}:0"]  # BELLA_QUEUE_QUEUES of the Ray
        async with QueueClient(emulator.url, emulator.apikey) as client:
            # Answered only by a poller that takes from this test's queue with the key.
            result = await asyncio.wait_for(client.put_blocking(_blocking_task(queue)), 150)
        assert result.status_code == 200
        assert result.body["object"] == "chat.completion"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 120) == 0
    finally:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        await asyncio.to_thread(cluster.stop)
