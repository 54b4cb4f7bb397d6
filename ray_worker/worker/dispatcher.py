"""The dispatcher: runs each taken task on an LLM replica and answers it exactly once.

This module owns a task's life after ``take``: one asyncio task per Bella task, a deadline
from ``expire_time``, routing by ``data.model`` among the served models, the engine call,
and the answer on the path its ``response_mode`` demands (protocol §4.1, §9.1):

- ``blocking``: one completion event ``{status_code, request_id, body}``;
- ``streaming``: progress events ``eventName="message"``, ``eventId`` "0", "1", ... with each
  chunk as ``eventData``, then ``"[DONE]"``, then the completion event; on an error, an
  ``{"error": ...}`` chunk and then the completion event (§4.5);
- ``callback`` and ``batch`` (any level): ``POST /v1/queue/{task_id}/complete``.

It must not talk to Ray, Redis or httpx directly: it sees the LLM deployments through the
``Engines`` protocol, the event bus through ``EventSink`` and Bella-Queue through
``Completer``, so it runs unchanged in unit tests with fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, Protocol

from ray_worker.bella.protocol import (
    ONLINE_MAX_WAIT_S,
    STREAM_DONE,
    Level,
    ResponseMode,
    Task,
    now_ms,
    result_body,
)
from ray_worker.config import DispatcherConfig, QueueSpec
from ray_worker.errors import (
    EngineError,
    EngineOverloadedError,
    InvalidTaskError,
    ModelNotFoundError,
    ReplicaUnavailableError,
    TaskError,
    TaskExpiredError,
    WorkerError,
)
from ray_worker.metrics import WorkerMetrics, status_class
from ray_worker.worker.capacity import CapacityTracker

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ENDPOINTS", "Completer", "Dispatcher", "Engines", "EventSink"]

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
STREAM_EVENT_NAME = "message"
PRIORITY_ONLINE = 0
PRIORITY_OFFLINE = 1
_SHUTTING_DOWN = "the worker is shutting down; retry the request"


class Engines(Protocol):
    """The LLM deployments, by served model id."""

    def stream(
        self, model_id: str, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one request; yield chunks (stream) or one response. Raise ``WorkerError``s."""
        ...

    async def abort(self, model_id: str, request_id: str) -> None:
        """Abort a request in the engine so its slot is freed."""
        ...


class EventSink(Protocol):
    """The event bus (a ``PublisherClient``)."""

    async def progress(
        self, instance_id: str, task_id: str, event_id: str, event_name: str, event_data: Any
    ) -> None:
        """Queue a progress event; per-task order is kept."""
        ...

    async def completion(self, instance_id: str, task_id: str, result: Mapping[str, Any]) -> None:
        """Queue a completion event and wait until it is written (raises if it cannot be)."""
        ...


class Completer(Protocol):
    """Bella-Queue's HTTP complete (a ``QueueClient``)."""

    async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
        """``POST /v1/queue/{task_id}/complete``, retried on retryable faults."""
        ...


class Dispatcher:
    """Runs taken tasks concurrently; every task ends in exactly one answer."""

    def __init__(
        self,
        *,
        engines: Engines,
        events: EventSink,
        completer: Completer,
        capacity: CapacityTracker,
        queues: list[QueueSpec],
        served_models: list[str],
        config: DispatcherConfig | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engines = engines
        self.events = events
        self.completer = completer
        self.capacity = capacity
        self.config = config or DispatcherConfig()
        self.metrics = metrics or WorkerMetrics(use_ray=False)
        self.served_models = list(served_models)
        self._queue_models = {q.name: q.model for q in queues}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._completed: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._accepting = True

    # -- public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Tasks being run or answered."""
        return len(self._running)

    def holds(self, task_id: str) -> bool:
        """Whether the task is in flight here."""
        return task_id in self._running

    def submit(self, task: Task, pool_model: str) -> bool:
        """Start running ``task`` (counted against ``pool_model``'s capacity by the caller).

        Returns False, and starts nothing, for a task already in flight or recently answered
        (a redelivery): an offline one that was answered gets its answer sent again instead,
        since complete is idempotent and the first one may not have arrived. Once ``drain``
        has begun, a new task is not run but answered 503 at once (the producer may retry).
        """
        if task.task_id in self._running:
            self.metrics.inc("duplicates")
            logger.info("ignoring redelivered task already in flight", extra=_ctx(task))
            return False
        if task.task_id in self._completed:
            self.metrics.inc("duplicates")
            result = self._completed[task.task_id]
            if result is not None and not task.is_online:
                logger.info("re-sending the answer of a redelivered task", extra=_ctx(task))
                self._spawn(task, self._answer_again(task, result), pool_model)
                return True
            return False
        if not self._accepting:
            self._spawn(task, self._refuse(task), pool_model)
            return True
        self._spawn(task, self._run(task), pool_model)
        return True

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting, wait up to ``timeout_s`` for in-flight tasks, then answer the rest 503.

        Returns how many tasks were cut short.
        """
        self._accepting = False
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout_s)
        else:
            pending = set()
        for job in pending:
            job.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
        return len(pending)

    # -- one task -------------------------------------------------------------------------

    def _spawn(self, task: Task, work: Any, pool_model: str) -> None:
        job = asyncio.create_task(work, name=f"task-{task.task_id}")
        self._running[task.task_id] = job
        job.add_done_callback(lambda j: self._finished(task, pool_model, j))

    def _finished(self, task: Task, pool_model: str, job: asyncio.Task[None]) -> None:
        self._running.pop(task.task_id, None)
        self.capacity.release(pool_model, Level(task.level))
        if not job.cancelled() and job.exception() is not None:
            # _run answers every error itself; reaching here is a bug worth a loud log.
            logger.error("task job crashed", exc_info=job.exception(), extra=_ctx(task))

    async def _run(self, task: Task) -> None:
        streaming = task.response_mode is ResponseMode.STREAMING
        state = _StreamState()
        taken_at = time.monotonic()
        try:
            result = await self._execute(task, streaming, state, taken_at)
        except asyncio.CancelledError:
            # Shutdown cut the task short: answer it so nobody waits for nothing, then re-raise.
            await self._answer_error(
                task,
                EngineOverloadedAnswer(_SHUTTING_DOWN),
                state,
                taken_at,
            )
            raise
        except TaskError as err:
            answering = self._answer_error(task, err, state, taken_at)
        except Exception as err:
            # Outside the engine call (e.g. the event bus refused "[DONE]"): still one answer.
            logger.error(
                "task failed outside the engine call: %s",
                err,
                exc_info=not isinstance(err, WorkerError),
                extra=_ctx(task),
            )
            answering = self._answer_error(
                task,
                EngineError(f"the worker failed: {type(err).__name__}: {err}"),
                state,
                taken_at,
            )
        else:
            answering = self._answer(task, result, taken_at)
        # The answer is the task's only one: shutdown must not cut it off half sent.
        await _to_the_end(answering)

    async def _refuse(self, task: Task) -> None:
        await self._answer_error(
            task, EngineOverloadedAnswer(_SHUTTING_DOWN), _StreamState(), time.monotonic()
        )

    async def _execute(
        self, task: Task, streaming: bool, state: _StreamState, taken_at: float
    ) -> dict[str, Any]:
        """Run the engine call; return the success result or raise a ``TaskError``."""
        deadline_ms = self._deadline_ms(task)
        if now_ms() >= deadline_ms:
            raise TaskExpiredError("the task expired before it could start")
        model_id = self._resolve_model(task)
        endpoint = task.endpoint or "/v1/chat/completions"
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise InvalidTaskError(
                f"endpoint {endpoint!r} is not served; supported: {', '.join(SUPPORTED_ENDPOINTS)}",
                "endpoint",
            )
        data = dict(task.data)
        data["model"] = model_id
        if endpoint == "/v1/embeddings":
            streaming = False
        else:
            # Only streaming-mode tasks stream; the others need one whole response (§7).
            data["stream"] = streaming
        if streaming:
            data.setdefault("stream_options", {"include_usage": True})
        elif "stream_options" in data:
            del data["stream_options"]
        priority = PRIORITY_ONLINE if task.level == Level.ONLINE else PRIORITY_OFFLINE
        if task.start_time:
            self.metrics.observe(
                "put_to_start_s", max(0.0, (now_ms() - task.start_time) / 1000), queue=task.queue
            )
        deadline = asyncio.timeout((deadline_ms - now_ms()) / 1000)
        try:
            async with deadline:
                response: dict[str, Any] | None = None
                async for item in self._attempts(task, model_id, endpoint, data, priority, state):
                    if streaming:
                        await self._chunk(task, state, taken_at, item)
                    else:
                        response = item
        except TimeoutError as err:
            if not deadline.expired():
                # The engine's own timeout, not the task's deadline.
                logger.warning("engine call timed out: %s", err, extra=_ctx(task))
                raise EngineError(f"the engine failed: {type(err).__name__}: {err}") from None
            with contextlib.suppress(Exception):
                await self.engines.abort(model_id, task.task_id)
            if state.overloaded:
                raise EngineOverloadedAnswer(
                    "the model is overloaded; the task expired while waiting for a slot"
                ) from None
            raise TaskExpiredError(
                "the task's deadline passed during generation; generation was aborted"
            ) from None
        except TaskError:
            raise
        except EngineOverloadedError as err:
            raise EngineOverloadedAnswer(str(err) or "the model is overloaded") from None
        except WorkerError as err:
            raise EngineError(f"the engine failed: {err}") from None
        except Exception as err:
            logger.exception("engine call failed", extra=_ctx(task))
            raise EngineError(f"the engine failed: {type(err).__name__}: {err}") from None
        if streaming:
            await self._chunk(task, state, taken_at, STREAM_DONE)
            return result_body(200, task.task_id)
        if response is None:
            raise EngineError("the engine returned no response")
        if task.response_mode is ResponseMode.STREAMING:
            # A streaming task on a non-streaming endpoint (embeddings): the server ignores the
            # completion's body for streaming tasks, so the response goes out as the one chunk.
            for data_item in (response, STREAM_DONE):
                await self._chunk(task, state, taken_at, data_item)
            return result_body(200, task.task_id)
        return result_body(200, task.task_id, response)

    async def _attempts(
        self,
        task: Task,
        model_id: str,
        endpoint: str,
        data: dict[str, Any],
        priority: int,
        state: _StreamState,
    ) -> AsyncIterator[dict[str, Any]]:
        """The engine stream, retried while nothing was produced yet."""
        failures = 0
        overload_wait = self.config.overload_retry_initial_s
        while True:
            produced = False
            try:
                async for item in self.engines.stream(
                    model_id, endpoint, data, request_id=task.task_id, priority=priority
                ):
                    produced = True
                    state.overloaded = False
                    yield item
                return
            except EngineOverloadedError:
                if produced:
                    raise
                state.overloaded = True
                await asyncio.sleep(overload_wait * random.uniform(0.5, 1.0))
                overload_wait = min(overload_wait * 2, self.config.overload_retry_max_s)
            except ReplicaUnavailableError:
                failures += 1
                if produced or failures > self.config.max_replica_retries:
                    raise
                logger.warning(
                    "replica failed before any output; retrying (%d/%d)",
                    failures,
                    self.config.max_replica_retries,
                    extra=_ctx(task),
                )

    async def _chunk(self, task: Task, state: _StreamState, taken_at: float, data: Any) -> None:
        """Send the next progress event of a streaming task: ``eventId`` counts 0, 1, ..."""
        if state.sent == 0:
            self._first_event(task, taken_at)
        await self.events.progress(
            task.instance_id or "", task.task_id, str(state.sent), STREAM_EVENT_NAME, data
        )
        state.sent += 1

    def _first_event(self, task: Task, taken_at: float) -> None:
        self.metrics.observe("time_to_first_event_s", time.monotonic() - taken_at, queue=task.queue)

    def _deadline_ms(self, task: Task) -> int:
        start = task.start_time or now_ms()
        if task.expire_time > 0:
            if task.is_online:
                # The producer waits at most ONLINE_MAX_WAIT_S after its put (§1.3).
                return min(task.expire_time, start + ONLINE_MAX_WAIT_S * 1000)
            return task.expire_time
        cap_s = self.config.max_task_time_s
        if task.is_online:
            cap_s = min(cap_s, ONLINE_MAX_WAIT_S)
        return start + int(cap_s * 1000)

    def _resolve_model(self, task: Task) -> str:
        requested = task.data.get("model")
        if requested is not None and not isinstance(requested, str):
            raise InvalidTaskError("'model' must be a string", "model")
        if requested:
            if requested in self.served_models:
                return requested
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist or is not served by this worker",
                "model",
            )
        default = self._queue_models.get(task.full_queue)
        if default:
            return default
        if len(self.served_models) == 1:
            return self.served_models[0]
        raise InvalidTaskError("'model' is required: this worker serves several models", "model")

    # -- answers --------------------------------------------------------------------------

    async def _answer_error(
        self, task: Task, err: TaskError, state: _StreamState, taken_at: float
    ) -> None:
        body = err.to_body()
        log = logger.warning if err.status_code < 500 else logger.error
        log("task failed with %d: %s", err.status_code, err.message, extra=_ctx(task))
        if task.response_mode is ResponseMode.STREAMING:
            # Streaming has no error channel in the completion (§4.5): send the error as a chunk.
            with contextlib.suppress(Exception):
                await self._chunk(task, state, taken_at, body)
        await self._answer(task, result_body(err.status_code, task.task_id, body), taken_at)

    async def _answer(self, task: Task, result: dict[str, Any], taken_at: float) -> None:
        """Send the one answer of a task; failures are logged and counted, never raised."""
        status = int(result["status_code"])
        if task.response_mode is ResponseMode.BLOCKING:
            self._first_event(task, taken_at)
        try:
            if task.is_online:
                await self.events.completion(task.instance_id or "", task.task_id, result)
            else:
                await self.completer.complete(task.task_id, result)
        except Exception as err:
            if task.is_online:
                self.metrics.inc("publish_failures", kind="completion")
            else:
                self.metrics.inc("complete_failures")
            logger.error(
                "could not deliver the answer: %s",
                err,
                exc_info=not isinstance(err, WorkerError),
                extra=_ctx(task),
            )
        finally:
            self.metrics.inc(
                "tasks_completed",
                queue=task.queue,
                mode=task.response_mode.value,
                status=status_class(status),
            )
            self._remember(task, result)

    async def _answer_again(self, task: Task, result: dict[str, Any]) -> None:
        try:
            await self.completer.complete(task.task_id, result)
        except Exception as err:
            logger.error(
                "could not re-send the answer: %s",
                err,
                exc_info=not isinstance(err, WorkerError),
                extra=_ctx(task),
            )

    def _remember(self, task: Task, result: dict[str, Any]) -> None:
        limit = self.config.remember_completed
        if limit <= 0:
            return
        self._completed[task.task_id] = None if task.is_online else result
        self._completed.move_to_end(task.task_id)
        while len(self._completed) > limit:
            self._completed.popitem(last=False)


class EngineOverloadedAnswer(TaskError):
    """The model stayed overloaded: answered 503 so the producer may retry elsewhere."""

    status_code = 503
    error_type = "server_error"
    code = "overloaded"


class _StreamState:
    __slots__ = ("overloaded", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.overloaded = False


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` to its end even if the caller is cancelled meanwhile (then re-raise)."""
    job = asyncio.ensure_future(work)
    try:
        await asyncio.shield(job)
    except asyncio.CancelledError:
        await job
        raise


def _ctx(task: Task) -> dict[str, Any]:
    return {"task_id": task.task_id, "queue": task.full_queue, "mode": task.response_mode.value}
