"""Engine outputs and errors as the task runner needs them: OpenAI dicts and our exceptions.

This module owns the translation of whatever an engine yields (SSE text, dicts, pydantic
models, lists) into OpenAI dicts, of engine and vLLM errors into ``ray_worker.errors``
classes (they pickle across Ray; a pydantic ``ValidationError`` never crosses), and the
engine-independent sanity checks of a request body, so both engines reject the same bodies.
It imports no vLLM: vLLM's classes are recognised by name and attributes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from ray_worker.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidTaskError,
    ModelNotFoundError,
    WorkerError,
)

__all__ = ["check_body", "decode_item", "error_from_openai_body", "map_exception"]


def error_from_openai_body(error: Mapping[str, Any]) -> WorkerError:
    """Map an OpenAI/vLLM error object ``{message, type, param, code}`` to our exception.

    ``code`` is the HTTP status vLLM chose: 404 → ``ModelNotFoundError``, 429/503 →
    ``EngineOverloadedError``, other 4xx → ``InvalidTaskError``, anything else → ``EngineError``;
    the status is kept on the exception.
    """
    message = str(error.get("message") or "engine error")
    param = error.get("param")
    param = str(param) if param is not None else None
    return _error_for_status(_status_of(error.get("code")), message, param)


def _status_of(code: Any) -> int:
    if isinstance(code, bool):
        return 500
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    return 500


def _error_for_status(status: int, message: str, param: str | None = None) -> WorkerError:
    if status in (429, 503):
        return EngineOverloadedError(message)
    if status == 404:
        return ModelNotFoundError(message, param, status_code=404)
    if 400 <= status < 500:
        return InvalidTaskError(message, param, status_code=status)
    return EngineError(message, param, status_code=status if status >= 500 else 500)


def _summarize_validation_error(err: ValidationError) -> tuple[str, str | None]:
    parts = []
    first_loc: str | None = None
    for item in err.errors()[:5]:
        loc = ".".join(str(p) for p in item.get("loc", ()))
        first_loc = first_loc or loc or None
        parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
    more = err.error_count() - len(parts)
    if more > 0:
        parts.append(f"... and {more} more")
    return "invalid request: " + "; ".join(parts), first_loc


def map_exception(err: BaseException, *, parsing: bool = False) -> BaseException:
    """The ``ray_worker.errors`` exception for anything an engine raised.

    A pydantic ``ValidationError`` is the task's fault while its request is parsed
    (``parsing``), and the server's own afterwards (e.g. re-validating a response).
    """
    if isinstance(err, WorkerError):
        return err
    if isinstance(err, ValidationError):
        message, param = _summarize_validation_error(err)
        if parsing:
            return InvalidTaskError(message, param)
        return EngineError(f"engine output failed validation: {message}")
    names = {cls.__name__ for cls in type(err).__mro__}
    status = getattr(err, "http_status", None) or getattr(err, "status_code", None)
    message = str(err) or type(err).__name__
    if "GracefulHTTPError" in names and status is not None:
        return _error_for_status(int(status), message)
    if "VLLMNotFoundError" in names:
        return ModelNotFoundError(message, status_code=404)
    if "VLLMUnprocessableEntityError" in names:
        return InvalidTaskError(message, getattr(err, "parameter", None), status_code=422)
    if "VLLMClientError" in names:
        return InvalidTaskError(message, getattr(err, "parameter", None))
    if "GenerationError" in names and status is not None:
        return _error_for_status(int(status), message)
    if "EngineDeadError" in names:
        return EngineDeadError(f"the engine died: {message}")
    return EngineError(f"{type(err).__name__}: {message}")


def _raise_if_error(obj: Mapping[str, Any]) -> None:
    error = obj.get("error")
    if isinstance(error, Mapping) and "choices" not in obj and "data" not in obj:
        raise error_from_openai_body(error)


def decode_item(item: Any) -> Iterator[dict[str, Any]]:
    """OpenAI dicts from one engine output: SSE text, a dict, a pydantic model, or a list."""
    if isinstance(item, str):
        for line in item.splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == "[DONE]":
                continue
            obj = json.loads(payload)
            if isinstance(obj, dict):
                _raise_if_error(obj)
                yield obj
    elif isinstance(item, dict):
        _raise_if_error(item)
        yield item
    elif isinstance(item, list | tuple):
        for sub in item:
            yield from decode_item(sub)
    elif hasattr(item, "model_dump"):
        dumped = item.model_dump(mode="json")
        if type(item).__name__.endswith("ErrorResponse") and isinstance(dumped, dict):
            _raise_if_error(dumped)
        yield dumped
    else:
        raise EngineError(f"unexpected engine output of type {type(item).__name__}")


def check_body(endpoint: str, data: Mapping[str, Any]) -> None:
    """Engine-independent sanity checks, so both engines reject the same bodies."""
    if endpoint == "/v1/chat/completions":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidTaskError("'messages' must be a non-empty list", "messages")
    elif endpoint == "/v1/completions":
        prompt = data.get("prompt")
        if prompt is None or (isinstance(prompt, str | list) and len(prompt) == 0):
            raise InvalidTaskError("'prompt' must be a non-empty string or list", "prompt")
    elif (
        endpoint == "/v1/embeddings"
        and data.get("input") in (None, "", [])
        and not data.get("messages")
    ):
        raise InvalidTaskError("'input' must be a non-empty string or list", "input")
    if "stream" in data and not isinstance(data["stream"], bool | None):
        raise InvalidTaskError("'stream' must be a boolean", "stream")
