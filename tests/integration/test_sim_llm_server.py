"""BellaLLMServer with the simulated engine under Ray Serve, called through a deployment handle.

The same subclass and entry points as production (``run_task``, ``abort``, ``get_load``), with
``experimental_configs.bella_sim_engine`` selecting the engine; errors must cross the handle as
``ray_worker.errors`` classes with their status.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ray_worker.errors import EngineError, InvalidTaskError, ModelNotFoundError
from ray_worker.hop import PRIORITY_OFFLINE, PRIORITY_ONLINE
from ray_worker.serve.llm_config import sim_llm_config
from ray_worker.serve.llm_server import build_llm_deployment
from ray_worker.testing.waiting import wait_for

CHAT = "/v1/chat/completions"
MODEL = "sim-model"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.fixture(scope="module")
def handle(ray_serve: Any) -> Iterator[Any]:
    """One simulated replica (2 slots, slow decode so requests stay running while looked at)."""
    from ray import serve

    app_name = f"sim-llm-{uuid.uuid4().hex[:6]}"
    config = sim_llm_config(MODEL, max_num_seqs=2, ttft_s=0.0, tokens_per_s=50.0, max_tokens=4)
    app = build_llm_deployment(config, name="sim-llm")
    h = serve.run(app, name=app_name, route_prefix=None)
    try:
        yield h
    finally:
        serve.delete(app_name)


async def drain(
    handle: Any, endpoint: str, data: dict[str, Any], rid: str, prio: int = 0
) -> list[dict[str, Any]]:
    call = handle.options(stream=True).run_task.remote(
        endpoint, data, request_id=rid, priority=prio
    )
    return [item async for item in call]


def cause(err: BaseException) -> Any:
    """The replica's own exception: Ray's RayTaskError(X) keeps X's class but not its instance
    attributes (status_code, code); ``.cause`` is the unpickled original."""
    return getattr(err, "cause", err)


async def load(handle: Any) -> dict[str, Any]:
    result: dict[str, Any] = await handle.get_load.remote()
    return result


async def test_streaming_and_full_chat(handle: Any) -> None:
    chunks = await drain(handle, CHAT, chat(stream=True, max_tokens=3), "s1")
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[-1].choices[0].finish_reason == "length"
    (full,) = await drain(handle, CHAT, chat(), "s2")
    response = ChatCompletion.model_validate(full)
    assert response.usage is not None
    assert response.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("data", "error", "status"),
    [
        ({"messages": []}, InvalidTaskError, 400),
        (chat(max_tokens="lots"), InvalidTaskError, 400),
        (chat(model="someone-else"), ModelNotFoundError, 404),
        (chat(sim_fail={"status_code": 502}), EngineError, 502),
    ],
)
async def test_errors_cross_the_handle_with_their_status(
    handle: Any, data: dict[str, Any], error: type, status: int
) -> None:
    with pytest.raises(error) as info:
        await drain(handle, CHAT, data, f"e-{uuid.uuid4().hex[:6]}")
    assert cause(info.value).status_code == status


async def test_load_report(handle: Any) -> None:
    report = await load(handle)
    assert report["model_id"] == MODEL
    assert report["max_num_seqs"] == 2
    assert report["engine"] == "simulated"
    assert report["replica_id"]
    assert report["running"] == 0


async def test_cancelling_the_call_frees_the_engine_slot(handle: Any) -> None:
    call = handle.options(stream=True).run_task.remote(
        CHAT, chat(stream=True, max_tokens=1_000), request_id="cancel-me"
    )
    await call.__anext__()
    assert (await load(handle))["running"] == 1
    call.cancel()
    await wait_for(lambda: _running_is(handle, 0), 20)


async def _running_is(handle: Any, n: int) -> bool:
    return bool((await load(handle))["running"] == n)


async def test_abort_through_the_handle(handle: Any) -> None:
    call = handle.options(stream=True).run_task.remote(
        CHAT, chat(stream=True, max_tokens=1_000), request_id="abort-me"
    )
    await call.__anext__()
    assert await handle.abort.remote("abort-me") is True
    with pytest.raises(EngineError) as info:
        async for _ in call:
            pass
    assert cause(info.value).code == "request_aborted"
    await wait_for(lambda: _running_is(handle, 0), 20)
    assert await handle.abort.remote("abort-me") is False


async def test_online_priority_overtakes_waiting_offline_tasks(handle: Any) -> None:
    stream = handle.options(stream=True)

    def long_call(rid: str, prio: int) -> Any:
        # 2,000 tokens at 50/s: never ends by itself while the test looks, even on a loaded
        # machine, so a slot frees only when the test cancels a call.
        data = chat(stream=True, max_tokens=2_000)
        return stream.run_task.remote(CHAT, data, request_id=rid, priority=prio)

    blockers = [long_call(f"b{i}", PRIORITY_ONLINE) for i in range(2)]
    for b in blockers:
        await b.__anext__()
    done: list[str] = []

    async def run(rid: str) -> None:
        await drain(handle, CHAT, chat(max_tokens=1), rid, PRIORITY_OFFLINE)
        done.append(rid)

    offline = [asyncio.ensure_future(run(f"off{i}")) for i in range(3)]
    await wait_for(lambda: _waiting_is(handle, 3), 20)
    online = long_call("on", PRIORITY_ONLINE)
    first = asyncio.ensure_future(online.__anext__())
    await wait_for(lambda: _waiting_is(handle, 4), 20)
    blockers[0].cancel()
    # The freed slot goes to the online call, which then holds it: no offline task can run
    # (and none can finish) until the test frees a slot again. The order is read in the
    # engine, not from when each client's answer happened to arrive.
    await asyncio.wait_for(first, 20)
    assert done == []
    assert await _waiting_is(handle, 3)
    online.cancel()
    blockers[1].cancel()
    await asyncio.wait_for(asyncio.gather(*offline), 20)
    assert sorted(done) == ["off0", "off1", "off2"]


async def _waiting_is(handle: Any, n: int) -> bool:
    return bool((await load(handle))["waiting"] == n)
