"""``ray-worker serve``: the worker started as an operator would, stopped with SIGTERM, drains
its in-flight tasks (each gets its answer) and leaves no Ray process behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.ray_cluster import DEFAULT_RAY_ENV
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
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "ray_worker.cli", "serve", "configs/simulated.yaml"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
