"""The limits on one task's cost, and its fan-out.

This module owns what a task may ask of a replica: how many sequences (``n``, ``best_of``),
how many output tokens (``max_tokens``, ``max_completion_tokens``), how large a prompt
(messages' text, completions' ``prompt``, embeddings' ``input``) and how large a
structured-output grammar (``response_format``, ``structured_outputs``, ``guided_*``), each
bounded per queue with worker-wide defaults (``QueueSpec`` and ``DispatcherConfig`` fields of
the same names). ``check_task`` raises ``InvalidTaskError`` (400 ``invalid_request_error``,
``param`` the field) for a task over a limit; ``fan_out`` is the engine sequences a task holds,
which the poller charges against capacity.

It is pure: no I/O, no Ray, no state. It must not change a task, nor judge what the engine
validates itself (a field of the wrong type passes here and is the engine's 400).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ray_worker.config import DispatcherConfig, QueueSpec
from ray_worker.errors import InvalidTaskError

__all__ = ["TaskLimits", "check_task", "fan_out", "grammar_chars", "prompt_chars"]

_FAN_OUT_FIELDS = ("n", "best_of")
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")
_PROMPT_FIELDS = ("messages", "prompt", "input")
_GRAMMAR_PREFIX = "guided_"


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """One queue's limits; None is no limit."""

    max_n: int | None = None
    max_output_tokens: int | None = None
    max_prompt_chars: int | None = None
    max_grammar_chars: int | None = None

    @classmethod
    def of(cls, queue: QueueSpec | None, defaults: DispatcherConfig) -> TaskLimits:
        """``queue``'s limits: the ones its config sets (null there: no limit), the worker-wide
        ``defaults`` for the rest (and for a queue that is not configured)."""
        values = {}
        for limit in fields(cls):
            name = limit.name
            source: Any = (
                queue if queue is not None and name in queue.model_fields_set else defaults
            )
            values[name] = getattr(source, name)
        return cls(**values)


def check_task(data: Mapping[str, Any], limits: TaskLimits) -> None:
    """Raise ``InvalidTaskError`` naming the field and the limit when ``data`` (a task's
    OpenAI request body) is over one of ``limits``; cheapest checks first."""
    for name in _FAN_OUT_FIELDS:
        _check_number(data, name, limits.max_n, "max_n")
    for name in _OUTPUT_FIELDS:
        _check_number(data, name, limits.max_output_tokens, "max_output_tokens")
    if limits.max_prompt_chars is not None:
        sizes = prompt_chars(data)
        total = sum(sizes.values())
        if total > limits.max_prompt_chars:
            raise InvalidTaskError(
                f"the prompt is {total} characters; this queue takes at most "
                f"{limits.max_prompt_chars} (max_prompt_chars)",
                max(sizes, key=lambda k: sizes[k]),
            )
    if limits.max_grammar_chars is not None:
        sizes = grammar_chars(data)
        total = sum(sizes.values())
        if total > limits.max_grammar_chars:
            size = (
                "nested too deeply to measure"
                if total >= _UNMEASURABLE
                else f"{total} characters of JSON"
            )
            raise InvalidTaskError(
                f"the structured-output constraints are {size}; this queue takes at most "
                f"{limits.max_grammar_chars} (max_grammar_chars)",
                max(sizes, key=lambda k: sizes[k]),
            )


def fan_out(data: Mapping[str, Any], limits: TaskLimits) -> int:
    """Engine sequences the task holds: its ``n`` (or ``best_of``, the larger), at least 1,
    at most ``limits.max_n`` (a task above it is answered 400 and never runs)."""
    sequences = 1
    for name in _FAN_OUT_FIELDS:
        value = _number(data.get(name))
        if value is not None and math.isfinite(value):
            sequences = max(sequences, int(value))
    if limits.max_n is not None:
        sequences = min(sequences, limits.max_n)
    return sequences


def prompt_chars(data: Mapping[str, Any]) -> dict[str, int]:
    """Characters of the prompt, per field present: the text of ``messages``' content (a
    string, or the ``text`` of its parts), ``prompt`` and ``input`` (a string, a list of
    strings, token ids or lists of token ids; a token id counts as one)."""
    sizes: dict[str, int] = {}
    for name in _PROMPT_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        sizes[name] = _messages_chars(value) if name == "messages" else _prompt_chars(value)
    return sizes


def grammar_chars(data: Mapping[str, Any]) -> dict[str, int]:
    """Characters of the structured-output constraints, per field present: the compact JSON
    size of ``response_format`` less its ``type``, of ``structured_outputs`` and of every
    ``guided_*`` field (a string counts its length)."""
    sizes: dict[str, int] = {}
    response_format = data.get("response_format")
    if isinstance(response_format, Mapping):
        sizes["response_format"] = sum(
            _json_chars(v) for k, v in response_format.items() if k != "type"
        )
    elif response_format is not None:
        sizes["response_format"] = _json_chars(response_format)
    for name, value in data.items():
        if value is not None and (name == "structured_outputs" or name.startswith(_GRAMMAR_PREFIX)):
            sizes[name] = _json_chars(value)
    return sizes


def _check_number(data: Mapping[str, Any], name: str, limit: int | None, limit_name: str) -> None:
    value = _number(data.get(name))
    if limit is not None and value is not None and value > limit:
        raise InvalidTaskError(
            f"'{name}' is {data[name]}; this queue allows at most {limit} ({limit_name})", name
        )


def _number(value: Any) -> int | float | None:
    """``value`` if it is a JSON number (not a bool), else None (the engine judges it)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _messages_chars(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, Mapping) else None
                if isinstance(text, str):
                    total += len(text)
    return total


def _prompt_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            total += len(item)  # token ids
        elif _number(item) is not None:
            total += 1  # one token id
    return total


_UNMEASURABLE = 1 << 62
"""The size of a value JSON cannot encode (nested deeper than the encoder goes): over any
limit."""


def _json_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    try:
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    except (TypeError, ValueError, RecursionError):
        return _UNMEASURABLE
