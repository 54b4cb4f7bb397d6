"""A task's one answer, on the path its ``response_mode`` demands (protocol §4.1, §9.1).

- ``blocking``: one completion event ``{status_code, request_id, body}``;
- ``streaming``: progress events ``eventName="message"``, ``eventId`` "0", "1", ... with each
  chunk as ``eventData``, then ``"[DONE]"``, then the completion event; on an error, an
  ``{"error": ...}`` chunk and then the completion event (§4.5);
- ``callback`` and ``batch`` (any level): ``POST /v1/queue/{task_id}/complete``.

Both the task runner (in the LLM replica) and the poller (for tasks that never reached a
replica, and as the safety net when a replica dies mid-task) answer through these functions.
It must not talk to Ray, Redis or httpx: the event bus is an ``EventSink`` and Bella-Queue a
``Completer``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from ray_worker.bella.protocol import ResponseMode, Task, result_body
from ray_worker.errors import EventsGivenUpError, TaskError, WorkerError
from ray_worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

__all__ = [
    "STREAM_EVENT_NAME",
    "Completer",
    "EngineOverloadedAnswer",
    "EventSink",
    "ShuttingDownAnswer",
    "answer_error",
    "deliver",
    "delivery_failed",
    "task_context",
]

STREAM_EVENT_NAME = "message"
"""``eventName`` of every streaming progress event (what the Java SDK's workers send)."""


class EventSink(Protocol):
    """The event bus (an ``EventBusClient``)."""

    async def progress(
        self, instance_id: str, task_id: str, event_id: str, event_name: str, event_data: Any
    ) -> None:
        """Queue a progress event; per-task order is kept."""
        ...

    async def completion(self, instance_id: str, task_id: str, result: Mapping[str, Any]) -> None:
        """Queue a completion event; return once Redis acknowledged it (raise if it never is:
        ``EventsGivenUpError`` when the publisher gave it up)."""
        ...


class Completer(Protocol):
    """Bella-Queue's HTTP complete (a ``QueueClient``)."""

    async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
        """``POST /v1/queue/{task_id}/complete``, retried on retryable faults."""
        ...


class EngineOverloadedAnswer(TaskError):
    """The model stayed overloaded: answered 503 so the producer may retry elsewhere."""

    status_code = 503
    error_type = "server_error"
    code = "overloaded"


class ShuttingDownAnswer(EngineOverloadedAnswer):
    """The worker stops before the task could finish (online tasks only: offline ones are left
    for the server's redelivery)."""

    def __init__(self, message: str = "the worker is shutting down; retry the request") -> None:
        super().__init__(message)


async def deliver(
    task: Task, result: Mapping[str, Any], events: EventSink, completer: Completer
) -> None:
    """Send ``result`` as the task's completion: an event for online modes, HTTP complete
    otherwise. Raises what the event bus or the client raised."""
    if task.is_online:
        await events.completion(task.instance_id or "", task.task_id, result)
    else:
        await completer.complete(task.task_id, result)


async def answer_error(
    task: Task,
    err: TaskError,
    events: EventSink,
    completer: Completer,
    *,
    event_id: str,
) -> dict[str, Any]:
    """Answer ``task`` with ``err``'s OpenAI error body; returns the result sent.

    A streaming task gets the error as a progress chunk (``event_id``) first: its completion's
    body is not forwarded (§4.5). Delivery failures of the completion are raised.
    """
    body = err.to_body()
    log = logger.warning if err.status_code < 500 else logger.error
    log("task failed with %d: %s", err.status_code, err.message, extra=task_context(task))
    if task.response_mode is ResponseMode.STREAMING:
        try:
            await events.progress(
                task.instance_id or "", task.task_id, event_id, STREAM_EVENT_NAME, body
            )
        except Exception as exc:  # the completion below still ends the producer's wait
            logger.warning("could not send the error chunk: %s", exc, extra=task_context(task))
    result = result_body(err.status_code, task.task_id, body)
    await deliver(task, result, events, completer)
    return result


def delivery_failed(task: Task, err: Exception, metrics: WorkerMetrics) -> None:
    """Log and count an answer of ``task`` that ``deliver`` (or ``answer_error``) could not
    send: ``publish_failures`` online (unless the publisher gave it up: it counted it there),
    ``complete_failures`` offline."""
    if isinstance(err, EventsGivenUpError):
        pass  # the publisher counted it (publish_failures, tasks_given_up) where it gave up
    elif task.is_online:
        metrics.inc("publish_failures", kind="completion")
    else:
        metrics.inc("complete_failures")
    logger.error(
        "could not deliver the answer: %s",
        err,
        exc_info=not isinstance(err, WorkerError),
        extra=task_context(task),
    )


def task_context(task: Task) -> dict[str, Any]:
    """``extra=`` of a log line about ``task`` (never its ``ak``)."""
    return {"task_id": task.task_id, "queue": task.full_queue, "mode": task.response_mode.value}
