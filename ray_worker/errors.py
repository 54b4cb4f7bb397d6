"""The worker's exception hierarchy.

This module owns every exception the package raises on purpose. It must not import
httpx, redis or vllm: the modules that talk to those libraries translate their errors
into these, so that callers decide by class alone whether to retry.

Every exception here pickles (plain attributes only) because several of them cross
Ray actor boundaries. A ``TaskError``'s answer, the OpenAI error body, takes its shape from
``bella.protocol.openai_error``.

    WorkerError
    ├── RetryableError               try again later, with backoff
    │   ├── QueueUnavailableError    Bella-Queue timed out, refused, or answered 5xx
    │   │   └── QueueGatewayError    a 3xx/4xx without Bella-Queue's error body: something in
    │   │                            front of it answered (gateway, WAF, proxy, wrong URL)
    │   ├── EventBusUnavailableError the event-bus Redis is unreachable
    │   │   └── EventsGivenUpError   the publisher gave a task's events up (counted there)
    │   ├── EngineOverloadedError    the LLM replicas cannot take more right now (HTTP 503/429)
    │   └── ReplicaUnavailableError  the replica serving a request died or is unreachable
    │       └── EngineDeadError      its engine died: what had not begun answering runs elsewhere
    ├── PermanentError               the same call will fail the same way
    │   ├── AuthenticationError      Bella-Queue answered 401 (bad or missing API key)
    │   ├── BadRequestError          Bella-Queue's own 4xx, with its error body (message kept)
    │   └── TaskError                one task cannot be served; carries the HTTP status
    │       ├── InvalidTaskError     malformed request body (400)
    │       ├── EngineError          the engine failed on this task (500 unless it said otherwise)
    │       ├── ModelNotFoundError   data.model is not served here (404)
    │       └── TaskExpiredError     the task's expire_time passed (408)
    └── FatalError                   the worker cannot run (bad configuration, missing model)
        └── ConfigError
"""

from __future__ import annotations

from typing import Any

from ray_worker.bella.protocol import openai_error


class WorkerError(Exception):
    """Base class of every error this package raises on purpose."""


class RetryableError(WorkerError):
    """A transient fault: the same call may succeed later."""


class QueueUnavailableError(RetryableError):
    """Bella-Queue could not be reached, timed out, or answered with a 5xx status.

    ``retry_after_s`` is the answer's ``Retry-After`` in seconds (an HTTP date already turned
    into a wait), ``None`` when it had none: a retry should not come sooner.
    """

    def __init__(
        self, message: str, status_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.status_code, self.retry_after_s))


class QueueGatewayError(QueueUnavailableError):
    """A 3xx or 4xx answer without Bella-Queue's ``{code, message, timestamp}`` error body:
    a gateway, WAF, proxy or key rotation in front of Bella-Queue answered, not Bella-Queue
    (or the URL is not Bella-Queue's). Retryable: it says nothing about the request itself.
    ``status_code`` is always set."""


class EventBusUnavailableError(RetryableError):
    """The event-bus Redis is unreachable or refused a write."""


class EventsGivenUpError(EventBusUnavailableError):
    """The publisher gave up a task's completion (a long Redis outage, a rejection, a
    closing publisher); it logged and counted the drop where it happened."""


class EngineOverloadedError(RetryableError):
    """The LLM replicas refused new work for now."""


class ReplicaUnavailableError(RetryableError):
    """The LLM replica serving a request died or could not be reached."""


class EngineDeadError(ReplicaUnavailableError):
    """The replica's engine died (a CUDA error, a segfault, an OOM kill of its process): a
    task that had not begun answering runs on another replica; the replica takes no more."""


class PermanentError(WorkerError):
    """A fault that repeating the same call will not fix."""


class AuthenticationError(PermanentError):
    """Bella-Queue answered 401: the API key is missing, malformed or unknown."""


class BadRequestError(PermanentError):
    """Bella-Queue's own refusal: a 4xx (400 from its exception handler) carrying its error
    body; ``message`` is the server's own text. The same request fails the same way."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.status_code))


class TaskError(PermanentError):
    """One task cannot be served. Answered to its producer as an OpenAI error body."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        status_code: int | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # Instance overrides of the class defaults, e.g. an engine's own 4xx status.
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code
        if error_type is not None:
            self.error_type = error_type

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_task_error, (type(self), self.message, self.param, self.__dict__))

    def to_body(self) -> dict[str, Any]:
        """The OpenAI error body ``{"error": {message, type, param, code}}``."""
        return openai_error(self.message, self.error_type, self.code, self.param)


def _rebuild_task_error(
    cls: type[TaskError], message: str, param: str | None, state: dict[str, Any]
) -> TaskError:
    err = cls(message, param)
    err.__dict__.update(state)
    return err


class InvalidTaskError(TaskError):
    """The task's request body is malformed or out of range."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class EngineError(TaskError):
    """The engine failed while serving this task."""

    status_code = 500
    error_type = "server_error"
    code = "engine_error"


class ModelNotFoundError(TaskError):
    """``data.model`` names a model this worker does not serve."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class TaskExpiredError(TaskError):
    """The task's ``expire_time`` passed before or during generation."""

    status_code = 408
    error_type = "timeout_error"
    code = "task_expired"


class FatalError(WorkerError):
    """The worker cannot run at all."""


class ConfigError(FatalError):
    """The configuration is invalid or incomplete."""


__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "EngineDeadError",
    "EngineError",
    "EngineOverloadedError",
    "EventBusUnavailableError",
    "EventsGivenUpError",
    "FatalError",
    "InvalidTaskError",
    "ModelNotFoundError",
    "PermanentError",
    "QueueGatewayError",
    "QueueUnavailableError",
    "ReplicaUnavailableError",
    "RetryableError",
    "TaskError",
    "TaskExpiredError",
    "WorkerError",
]
