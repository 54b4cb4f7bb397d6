"""The simulated engine on its own (no Ray): capacity, priority, abort, lengths, load, shapes.

Also ``BellaLLMServer``'s request handling on top of it, through the vLLM-free mixin
(``_TaskServingMixin``) with a stand-in for Ray's ``LLMServer`` base.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from ray_worker.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidTaskError,
    ModelNotFoundError,
)
from ray_worker.serve.engine_io import error_from_openai_body
from ray_worker.serve.sim_engine import SimEngine, SimEngineSettings
from ray_worker.testing.waiting import wait_for
from tests.unit.sim_server import CHAT, SLOW, chat_body, make_sim_server

CMPL = "/v1/completions"
EMB = "/v1/embeddings"

FAST = {"ttft_s": 0.0, "tokens_per_s": 1000.0}


def engine(**settings: Any) -> SimEngine:
    return SimEngine(model_id="sim", settings=settings)


async def collect(
    engine_: SimEngine, endpoint: str, body: dict[str, Any], rid: str, prio: int = 0
) -> list[dict[str, Any]]:
    request = engine_.parse_request(endpoint, body, request_id=rid, priority=prio)
    method = {CHAT: engine_.chat, CMPL: engine_.completions, EMB: engine_.embeddings}[endpoint]
    return [item async for item in method(request)]


class Consumer:
    """Drains one request in the background, recording what arrives."""

    def __init__(self, eng: SimEngine, rid: str, body: dict[str, Any], prio: int = 0) -> None:
        self.items: list[dict[str, Any]] = []
        self.first_at: float | None = None
        request = eng.parse_request(CHAT, body, request_id=rid, priority=prio)
        self.task = asyncio.ensure_future(self._run(eng.chat(request)))

    async def _run(self, gen: AsyncGenerator[dict[str, Any], None]) -> None:
        async for item in gen:
            if self.first_at is None:
                self.first_at = asyncio.get_running_loop().time()
            self.items.append(item)


# -- outputs -----------------------------------------------------------------------------------


async def test_chat_stream_chunks_validate_and_honour_max_tokens() -> None:
    eng = engine(**FAST)
    body = chat_body(stream=True, max_tokens=5, stream_options={"include_usage": True})
    items = await collect(eng, CHAT, body, "r1")
    chunks = [ChatCompletionChunk.model_validate(item) for item in items]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert {c.id for c in chunks} == {"chatcmpl-r1"}


async def test_chat_full_response_validates_with_usage() -> None:
    eng = engine(**FAST, max_tokens=7)
    (item,) = await collect(eng, CHAT, chat_body(), "r2")
    response = ChatCompletion.model_validate(item)
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content
    assert response.usage is not None
    assert response.usage.completion_tokens == 7  # the settings' default length
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


async def test_completions_stream_and_full_validate() -> None:
    eng = engine(**FAST)
    items = await collect(eng, CMPL, {"prompt": "once upon", "max_tokens": 3, "stream": True}, "c")
    # openai's Completion type has no null finish_reason (vLLM's own chunks carry one too, and
    # the openai client builds stream chunks without validating), so validate the last chunk.
    assert len(items) == 3
    assert [i["choices"][0]["finish_reason"] for i in items] == [None, None, "length"]
    assert Completion.model_validate(items[-1]).choices[0].text
    (item,) = await collect(eng, CMPL, {"prompt": "once upon"}, "d")
    full = Completion.model_validate(item)
    assert full.usage is not None
    assert full.usage.completion_tokens == eng.settings.max_tokens


async def test_embeddings_validate() -> None:
    eng = engine(**FAST, embedding_dim=8)
    (item,) = await collect(eng, EMB, {"input": "some text"}, "e")
    response = CreateEmbeddingResponse.model_validate(item)
    assert len(response.data[0].embedding) == 8


async def test_prompt_longer_than_max_model_len_is_a_400_error_body() -> None:
    eng = engine(**FAST, max_model_len=32)
    (item,) = await collect(eng, CMPL, {"prompt": "word " * 40, "max_tokens": 4}, "long")
    assert item["error"]["code"] == 400
    assert isinstance(error_from_openai_body(item["error"]), InvalidTaskError)


def test_parse_request_rejects_bad_bodies() -> None:
    eng = engine()
    with pytest.raises(ValidationError):
        eng.parse_request(CHAT, {"messages": []}, request_id="x")
    with pytest.raises(ValidationError):
        eng.parse_request(CHAT, chat_body(max_tokens="many"), request_id="x")
    with pytest.raises(ValidationError):
        eng.parse_request(CMPL, {"prompt": ""}, request_id="x")


def test_settings_default_from_engine_kwargs() -> None:
    class Cfg:
        def __init__(self) -> None:
            self.model_id = "m"
            self.engine_kwargs = {"max_num_seqs": 3, "max_model_len": 100}
            self.experimental_configs = {"bella_sim_engine": {"ttft_s": 0.5}}

    eng = SimEngine(Cfg())
    assert eng.settings == SimEngineSettings(max_num_seqs=3, max_model_len=100, ttft_s=0.5)
    assert eng.model_id == "m"


# -- scheduling --------------------------------------------------------------------------------


async def test_capacity_queues_extra_requests_and_load_reports_it() -> None:
    eng = engine(max_num_seqs=2, **SLOW)
    consumers = [Consumer(eng, f"r{i}", chat_body(stream=True, max_tokens=200)) for i in range(5)]
    load = await wait_for(lambda: (lo := eng.get_load())["running"] == 2 and lo)
    assert load["waiting"] == 3
    assert load["max_num_seqs"] == 2
    assert 0 < load["kv_cache_usage"] <= 1
    for c in consumers[2:]:
        assert c.items == []
    for i in range(5):
        await eng.abort(f"r{i}")
    await asyncio.gather(*(c.task for c in consumers))
    assert eng.get_load()["running"] == 0
    assert eng.get_load()["waiting"] == 0


async def test_abort_frees_the_slot_for_a_waiting_request() -> None:
    eng = engine(max_num_seqs=1, **SLOW)
    first = Consumer(eng, "a", chat_body(stream=True, max_tokens=500))
    await wait_for(lambda: first.items)
    second = Consumer(eng, "b", chat_body(stream=True, max_tokens=2))
    await wait_for(lambda: eng.get_load()["waiting"] == 1)
    assert await eng.abort("a") is True
    assert eng.get_load()["running"] == 1  # "b" took the slot at once
    await asyncio.wait_for(second.task, 10)
    await asyncio.wait_for(first.task, 10)
    assert first.items[-1]["choices"][0]["finish_reason"] == "abort"
    assert second.items[-1]["choices"][0]["finish_reason"] == "length"
    assert await eng.abort("a") is False


async def test_abort_of_a_waiting_request_ends_it_without_tokens() -> None:
    eng = engine(max_num_seqs=1, **SLOW)
    first = Consumer(eng, "a", chat_body(stream=True, max_tokens=500))
    await wait_for(lambda: first.items)
    waiting = Consumer(eng, "w", chat_body(stream=True, max_tokens=5))
    await wait_for(lambda: eng.get_load()["waiting"] == 1)
    await eng.abort("w")
    await asyncio.wait_for(waiting.task, 10)
    assert [i["choices"][0]["finish_reason"] for i in waiting.items] == ["abort"]
    assert eng.get_load()["waiting"] == 0
    await eng.abort("a")
    await first.task


async def test_lower_priority_value_is_admitted_first() -> None:
    eng = engine(max_num_seqs=1, **SLOW)
    blocker = Consumer(eng, "blocker", chat_body(stream=True, max_tokens=500))
    await wait_for(lambda: blocker.items)
    offline = [Consumer(eng, f"off{i}", chat_body(max_tokens=1), prio=1) for i in range(2)]
    online = Consumer(eng, "on", chat_body(max_tokens=1), prio=0)
    await wait_for(lambda: eng.get_load()["waiting"] == 3)
    await eng.abort("blocker")
    await asyncio.gather(online.task, *(c.task for c in offline), blocker.task)
    assert online.first_at is not None
    assert all(c.first_at is not None and online.first_at <= c.first_at for c in offline)
    # FIFO among equal priorities.
    assert offline[0].first_at is not None
    assert offline[1].first_at is not None
    assert offline[0].first_at <= offline[1].first_at


async def test_cancelling_the_consumer_frees_its_slot() -> None:
    eng = engine(max_num_seqs=1, **SLOW)
    first = Consumer(eng, "a", chat_body(stream=True, max_tokens=500))
    await wait_for(lambda: first.items)
    first.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first.task
    assert eng.get_load()["running"] == 0
    (item,) = await collect(eng, CHAT, chat_body(max_tokens=1), "next")
    assert item["choices"][0]["finish_reason"] == "length"


async def test_max_waiting_refuses_with_503() -> None:
    eng = engine(max_num_seqs=1, max_waiting=0, **SLOW)
    first = Consumer(eng, "a", chat_body(stream=True, max_tokens=500))
    await wait_for(lambda: first.items)
    (item,) = await collect(eng, CHAT, chat_body(), "b")
    assert isinstance(error_from_openai_body(item["error"]), EngineOverloadedError)
    await eng.abort("a")
    await first.task


async def test_failure_injection_before_and_during_generation() -> None:
    eng = engine(**FAST)
    (item,) = await collect(eng, CHAT, chat_body(sim_fail={"status_code": 502}), "f1")
    err = error_from_openai_body(item["error"])
    assert isinstance(err, EngineError)
    assert err.status_code == 502
    body = chat_body(stream=True, max_tokens=10, sim_fail={"after_tokens": 3})
    items = await collect(eng, CHAT, body, "f2")
    assert "error" in items[-1]
    assert (
        sum(1 for i in items if i.get("choices") and i["choices"][0]["delta"].get("content")) == 3
    )
    with pytest.raises(RuntimeError):
        await collect(eng, CHAT, chat_body(sim_fail={"raise_exception": True}), "f3")
    assert eng.get_load()["running"] == 0


# -- the server mixin on top of the simulated engine ------------------------------------------


async def test_server_runs_chat_and_reports_load() -> None:
    server = await make_sim_server()
    assert isinstance(server.engine, SimEngine)
    out = [x async for x in server.run_task(CHAT, chat_body(max_tokens=2), request_id="t1")]
    assert len(out) == 1
    ChatCompletion.model_validate(out[0])
    load = await server.get_load()
    assert {
        "replica_id",
        "running",
        "waiting",
        "kv_cache_usage",
        "max_num_seqs",
        "model_id",
    } <= set(load)
    assert load["max_num_seqs"] == 2
    assert load["engine"] == "simulated"


@pytest.mark.parametrize(
    ("endpoint", "data", "error"),
    [
        ("/v1/images", chat_body(), InvalidTaskError),
        (CHAT, {"messages": []}, InvalidTaskError),
        (CHAT, {"model": "sim"}, InvalidTaskError),
        (CHAT, chat_body(max_tokens="lots"), InvalidTaskError),
        (CHAT, chat_body(stream="yes"), InvalidTaskError),
        (CHAT, chat_body(model="other"), ModelNotFoundError),
        (CHAT, chat_body(sim_fail={"status_code": 503}), EngineOverloadedError),
        (CHAT, chat_body(sim_fail={"raise_exception": True}), EngineError),
    ],
)
async def test_server_raises_task_errors(endpoint: str, data: dict[str, Any], error: type) -> None:
    server = await make_sim_server()
    with pytest.raises(error) as info:
        async for _ in server.run_task(endpoint, data, request_id="bad"):
            pass
    assert not isinstance(info.value.__cause__, ValidationError)
    assert (await server.get_load())["running"] == 0


async def test_server_abort_raises_request_aborted_and_frees_the_slot() -> None:
    server = await make_sim_server()
    seen: list[dict[str, Any]] = []

    async def consume() -> None:
        async for item in server.run_task(
            CHAT, chat_body(stream=True, max_tokens=500), request_id="x"
        ):
            seen.append(item)

    task = asyncio.ensure_future(consume())
    await wait_for(lambda: len(seen) >= 2)
    assert await server.abort("x") is True
    with pytest.raises(EngineError) as info:
        await task
    assert info.value.code == "request_aborted"
    assert all(item["choices"][0]["finish_reason"] != "abort" for item in seen)
    assert (await server.get_load())["running"] == 0
    assert await server.abort("x") is False


async def test_server_generator_close_aborts_in_the_engine() -> None:
    server = await make_sim_server()
    gen = server.run_task(CHAT, chat_body(stream=True, max_tokens=500), request_id="y")
    await gen.__anext__()
    assert (await server.get_load())["running"] == 1
    await gen.aclose()
    assert (await server.get_load())["running"] == 0


async def test_server_priority_reaches_the_engine() -> None:
    server = await make_sim_server()
    request_priorities: list[int] = []
    original = server.engine.parse_request

    def spy(*args: Any, **kwargs: Any) -> Any:
        request_priorities.append(kwargs["priority"])
        return original(*args, **kwargs)

    server.engine.parse_request = spy
    for prio in (0, 1):
        async for _ in server.run_task(
            CHAT, chat_body(max_tokens=1), request_id=f"p{prio}", priority=prio
        ):
            pass
    assert request_priorities == [0, 1]


# -- a dead engine -----------------------------------------------------------------------------


async def test_a_killed_engine_fails_every_request_and_its_health_check() -> None:
    eng = engine(**SLOW)
    bystander = Consumer(eng, "b1", chat_body(stream=True, max_tokens=50))
    await wait_for(lambda: eng.get_load()["running"] == 1, 5)
    body = chat_body(stream=True, max_tokens=10, sim_fail={"after_tokens": 2, "kill_engine": True})
    with pytest.raises(RuntimeError) as killer:
        await collect(eng, CHAT, body, "k1")
    assert type(killer.value).__name__ == "EngineDeadError"
    with pytest.raises(RuntimeError, match="encountered an issue"):
        await bystander.task
    assert eng.is_dead()
    with pytest.raises(RuntimeError):
        await eng.check_health()
    with pytest.raises(RuntimeError):
        await collect(eng, CHAT, chat_body(), "after")
    assert eng.get_load()["running"] == 0


async def test_the_server_over_a_dead_engine_refuses_reports_no_capacity_and_is_unhealthy() -> None:
    server = await make_sim_server()
    body = chat_body(max_tokens=10, sim_fail={"after_tokens": 1, "kill_engine": True})
    with pytest.raises(EngineDeadError):
        async for _ in server.run_task(CHAT, body, request_id="k1"):
            pass
    load = await server.get_load()
    assert load["draining"] is True  # the poller counts no slot of it
    with pytest.raises(EngineDeadError):
        await server.check_health()
    with pytest.raises(EngineDeadError):
        async for _ in server.run_task(CHAT, chat_body(), request_id="after"):
            pass
