"""``python -m ray_worker.emulator`` serves until SIGTERM and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from ray_worker.testing.redis_server import RedisServer, free_port
from ray_worker.testing.waiting import wait_for_sync


def test_cli_serves_and_stops_cleanly(redis_server: RedisServer, tmp_path: object) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray_worker.emulator",
            "--port",
            str(port),
            "--redis-url",
            redis_server.url,
            "--apikey",
            "k1",
            "--apikey",
            "k2",
            "--profile",
            "cli",
            "--data-dir",
            str(tmp_path),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/queue/eventbus"

        def answer() -> httpx.Response | None:
            if proc.poll() is not None:
                raise RuntimeError(f"emulator exited {proc.returncode}")
            resp = httpx.get(url, headers={"Authorization": "Bearer k2"})
            return resp if resp.status_code == 200 else None

        resp = wait_for_sync(answer, timeout=30, interval=0.1, ignore=(httpx.TransportError,))
        assert resp.json() == {"url": redis_server.url, "topic": "redis-mesh:private-stream:cli:"}
        assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_cli_requires_an_apikey(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_worker.emulator.cli import main

    monkeypatch.delenv("BELLA_QUEUE_APIKEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "0"])
    assert exit_info.value.code == 2
