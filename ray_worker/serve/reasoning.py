"""The name of the reasoning field in chat answers: vLLM's ``reasoning``, DeepSeek's
``reasoning_content``, or both.

vLLM's reasoning parsers (``reasoning_parser: deepseek_r1``) put a model's thinking in
``reasoning`` (vLLM 0.29 and 0.32 alike); DeepSeek's API and the Bella-Queue ecosystem's
clients read ``reasoning_content``. This module owns renaming it, in blocking messages
(``choices[i].message``) and streamed deltas (``choices[i].delta``), on the dicts a replica
decodes from its engine. It must stay cheap: a body without a ``reasoning`` key (completions,
embeddings, chats without a reasoning parser) is only looked at, never copied.
"""

from __future__ import annotations

from typing import Any, get_args

from ray_worker.config import ReasoningField

__all__ = ["REASONING_FIELDS", "ReasoningField", "apply_reasoning_field"]

REASONING_FIELDS: tuple[ReasoningField, ...] = get_args(ReasoningField)

_VLLM = "reasoning"
_DEEPSEEK = "reasoning_content"


def apply_reasoning_field(body: dict[str, Any], field: ReasoningField) -> dict[str, Any]:
    """Rename vLLM's ``reasoning`` to ``field`` in ``body``'s choices, in place; returns ``body``.

    ``reasoning`` leaves the body as vLLM made it. A ``reasoning_content`` the engine set
    itself is kept unless it is null.
    """
    if field == _VLLM:
        return body
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if message is None:
            message = choice.get("delta")
        if not isinstance(message, dict) or _VLLM not in message:
            continue
        value = message[_VLLM] if field == "both" else message.pop(_VLLM)
        if message.get(_DEEPSEEK) is None:
            message[_DEEPSEEK] = value
    return body
