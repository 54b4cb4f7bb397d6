"""The reasoning field's name in chat answers (``ray_worker.serve.reasoning``)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ray_worker.config import DispatcherConfig
from ray_worker.serve.reasoning import REASONING_FIELDS, apply_reasoning_field


def _message(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", **fields}}]}


def _chunk(**fields: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields}]}


@pytest.mark.parametrize("make", [_message, _chunk])
def test_default_renames_to_reasoning_content(make: Any) -> None:
    body = make(content="answer", reasoning="thinking")
    out = apply_reasoning_field(body, "reasoning_content")
    assert out is body
    inner = body["choices"][0].get("message") or body["choices"][0]["delta"]
    assert inner["reasoning_content"] == "thinking"
    assert inner["content"] == "answer"
    assert "reasoning" not in inner


@pytest.mark.parametrize("make", [_message, _chunk])
def test_both_keeps_reasoning_and_adds_reasoning_content(make: Any) -> None:
    body = make(content=None, reasoning="thinking")
    apply_reasoning_field(body, "both")
    inner = body["choices"][0].get("message") or body["choices"][0]["delta"]
    assert inner["reasoning"] == inner["reasoning_content"] == "thinking"


def test_reasoning_leaves_vllm_output_alone() -> None:
    body = _message(content="a", reasoning="t")
    before = copy.deepcopy(body)
    assert apply_reasoning_field(body, "reasoning") == before


def test_null_reasoning_is_renamed_too() -> None:
    # vLLM's blocking messages always carry the key; DeepSeek answers null alike.
    body = _message(content="a", reasoning=None)
    apply_reasoning_field(body, "reasoning_content")
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "a",
        "reasoning_content": None,
    }


def test_engine_reasoning_content_is_kept_unless_null() -> None:
    body = _message(reasoning="new", reasoning_content="old")
    apply_reasoning_field(body, "reasoning_content")
    assert body["choices"][0]["message"] == {"role": "assistant", "reasoning_content": "old"}
    body = _message(reasoning="new", reasoning_content=None)
    apply_reasoning_field(body, "reasoning_content")
    assert body["choices"][0]["message"]["reasoning_content"] == "new"


@pytest.mark.parametrize(
    "body",
    [
        {"object": "text_completion", "choices": [{"index": 0, "text": "x"}]},
        {"object": "list", "data": [{"embedding": [0.1]}]},
        _chunk(content="x"),
        _chunk(),
        {"choices": [{"index": 0, "delta": None}]},
        {"choices": None},
        {"choices": ["odd"]},
    ],
)
@pytest.mark.parametrize("field", REASONING_FIELDS)
def test_bodies_without_reasoning_are_unchanged(body: dict[str, Any], field: Any) -> None:
    before = copy.deepcopy(body)
    assert apply_reasoning_field(body, field) == before


def test_every_choice_is_renamed() -> None:
    body = {
        "choices": [
            {"index": 0, "message": {"reasoning": "a"}},
            {"index": 1, "message": {"reasoning": "b"}},
        ]
    }
    apply_reasoning_field(body, "reasoning_content")
    assert [c["message"] for c in body["choices"]] == [
        {"reasoning_content": "a"},
        {"reasoning_content": "b"},
    ]


def test_config_default_is_deepseeks_name() -> None:
    assert DispatcherConfig().reasoning_field == "reasoning_content"
    assert DispatcherConfig(reasoning_field="both").reasoning_field == "both"
