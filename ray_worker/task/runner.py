"""The task runner: one Bella task's whole life, inside the LLM replica that runs it.

This module owns what happens to a task once the poller handed it to a replica: the deadline
from ``expire_time`` (the engine call is aborted when it passes, freeing the slot), the
online/offline priority, the engine call with its overload retries, the streaming events
(``eventId`` 0, 1, ..., ``[DONE]``, the completion), the error chunk, the completion event or
the HTTP complete, and the task's metrics. The caller gets a small ``Outcome`` back (status,
counts, usage, timings; ``ray_worker.hop``, with the deadline rule and the priorities): no
token goes back to the poller.

It must not import Ray, Redis or httpx: the engine is an ``Engine``, the event bus an
``EventSink`` and Bella-Queue a ``Completer`` (``ray_worker.serve.llm_server`` wires the real
ones in; unit tests pass fakes).

Cancelling: ``abort`` ends a task that Bella-Queue no longer wants (a cancelled task or batch,
see ``ray_worker.task.cancel_watch``) before its answer: the engine request is aborted and no
answer is sent (the server would ignore it); its outcome says ``cancelled``.

Seats: with ``seats`` (``ray_worker.task.seats``), every engine call holds seats of the
replica's engine: online work (level 0, or a producer waiting) in any free seat, offline work
within the configured width; an offline run an online task preempts runs again from the start
(its answer leaves only at the end), at most ``max_preemptions`` times.

Stopping: ``drain`` waits for the running tasks; what it must cut short is answered 503 when
its producer waits online (or at level 0, which the server never redelivers), and left
unanswered at level 1, where the server redelivers it after ``process_timeout``: a final 503
would end a batch line for good. Without redelivery (``redelivers=False``: the takes set no
``process_timeout``) a level-1 task left so would never be answered: it gets the 503 too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from ray_worker.aio import Backoff, cut_short, to_the_end
from ray_worker.bella.protocol import (
    DEFAULT_ENDPOINT,
    STREAM_DONE,
    Level,
    ResponseMode,
    Task,
    now_ms,
    result_body,
)
from ray_worker.config import DispatcherConfig
from ray_worker.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidTaskError,
    TaskError,
    TaskExpiredError,
    WorkerError,
)
from ray_worker.hop import (
    PRIORITY_OFFLINE,
    PRIORITY_ONLINE,
    SUPPORTED_ENDPOINTS,
    Outcome,
    deadline_ms,
    outcome,
)
from ray_worker.metrics import WorkerMetrics, status_class
from ray_worker.task.answers import (
    STREAM_EVENT_NAME,
    Completer,
    EngineOverloadedAnswer,
    EventSink,
    ShuttingDownAnswer,
    answer_error,
    deliver,
    delivery_failed,
    task_context,
)
from ray_worker.task.seats import Seats

logger = logging.getLogger(__name__)

__all__ = ["Engine", "TaskRunner"]


class Engine(Protocol):
    """The replica's engine, as the runner sees it."""

    def stream(
        self, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one request; yield chunks (``data["stream"]``) or one response.

        Raises ``WorkerError``s; closing the iterator aborts the request in the engine.
        """
        ...


class _Run:
    """The state of one task's run."""

    __slots__ = (
        "answering",
        "cancel_reason",
        "completion_tokens",
        "first_at",
        "on_answering",
        "overloaded",
        "preemptions",
        "prompt_tokens",
        "sent",
        "started",
        "started_ms",
    )

    def __init__(self, on_answering: Callable[[], None] | None, started_ms: int) -> None:
        self.sent = 0
        self.overloaded = False
        self.answering = False
        self.cancel_reason: str | None = None
        self.on_answering = on_answering
        self.started = time.monotonic()
        self.started_ms = started_ms
        self.first_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.preemptions = 0

    def mark_answering(self) -> None:
        """Called once, right before the task's first event or answer leaves."""
        if not self.answering:
            self.answering = True
            self.first_at = time.monotonic()
            if self.on_answering is not None:
                self.on_answering()

    def count_usage(self, item: Any) -> None:
        usage = item.get("usage") if isinstance(item, dict) else None
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)


class TaskRunner:
    """Runs the tasks handed to one replica; every task ends in one answer (or is left for
    redelivery when a stop cuts a level-1 task short)."""

    def __init__(
        self,
        *,
        engine: Engine,
        events: EventSink,
        completer: Completer,
        config: DispatcherConfig | None = None,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], int] = now_ms,
        redelivery_window_s: float = 0.0,
        model_id: str = "",
        redelivers: bool = True,
        seats: Seats | None = None,
    ) -> None:
        self.engine = engine
        self.seats = seats
        """The engine's seats (None: every call goes straight to the engine)."""
        self.redelivers = redelivers
        """Whether the server redelivers a level-1 task left unanswered (see the module doc)."""
        self.events = events
        self.completer = completer
        self.config = config or DispatcherConfig()
        self.metrics = metrics or WorkerMetrics(use_ray=False)
        self.clock = clock
        """Epoch ms on the server's clock (deadlines are the server's timestamps)."""
        self.redelivery_window_s = redelivery_window_s
        self.model_id = model_id
        """The model this replica serves (the tag of the token metrics and usage lines)."""
        self._jobs: dict[str, asyncio.Task[Outcome]] = {}
        self._runs: dict[str, tuple[Task, _Run]] = {}
        self._levels: dict[str, Level] = {}
        self._accepting = True

    # -- public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Tasks running here."""
        return len(self._jobs)

    def holds(self, task_id: str) -> bool:
        """Whether ``task_id`` runs here."""
        return task_id in self._jobs

    def held(self) -> dict[str, Any]:
        """The tasks running here, for the load report (a restarted poller counts them)."""
        online = sum(1 for level in self._levels.values() if level is Level.ONLINE)
        return {
            "held_ids": list(self._jobs),
            "held_online": online,
            "held_offline": len(self._levels) - online,
        }

    def start(
        self, task: Task, on_answering: Callable[[], None] | None = None
    ) -> asyncio.Task[Outcome] | None:
        """Start running ``task`` in the background; None if it already runs here.

        The job runs to its end whatever happens to the caller (a poller that dies or is
        restarted does not stop the task). ``on_answering`` is called once, right before
        the task's first event or answer leaves.
        """
        if task.task_id in self._jobs:
            self.metrics.inc("duplicates")
            logger.info("ignoring a task already running here", extra=task_context(task))
            return None
        run = _Run(on_answering, self.clock())
        work = self._run(task, run) if self._accepting else self._stopped(task, run)
        job = asyncio.get_running_loop().create_task(work, name=f"task-{task.task_id}")
        self._jobs[task.task_id] = job
        self._runs[task.task_id] = (task, run)
        self._levels[task.task_id] = Level.ONLINE if task.level == 0 else Level.OFFLINE
        job.add_done_callback(lambda j: self._finished(task, j))
        return job

    async def run(self, task: Task) -> Outcome:
        """Run ``task`` and return its outcome (a duplicate's outcome says so at once)."""
        job = self.start(task)
        if job is None:
            return _outcome(task, duplicate=True)
        return await asyncio.shield(job)

    def offline_running(self) -> list[tuple[Task, float]]:
        """The level-1 offline tasks running here and not answering yet, with how long each
        has run (seconds): what ``abort`` may still end."""
        now = time.monotonic()
        return [
            (task, now - run.started)
            for task, run in self._runs.values()
            if task.level != 0 and not task.is_online and not run.answering
        ]

    def abort(self, task_id: str, reason: str) -> bool:
        """End ``task_id`` without an answer: Bella-Queue cancelled it (``reason`` says how).

        Closing the engine stream aborts the request in the engine, freeing its slot. Returns
        False when the task is not running here or its answer already left (too late).
        """
        entry = self._runs.get(task_id)
        job = self._jobs.get(task_id)
        if entry is None or job is None or job.done():
            return False
        _, run = entry
        if run.answering or run.cancel_reason is not None:
            return False
        run.cancel_reason = reason
        job.cancel()
        return True

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting; wait up to ``timeout_s`` for running tasks, then cut the rest short
        (503 online and at level 0, left for redelivery at level 1). Returns how many were cut.
        """
        self._accepting = False
        return await cut_short(list(self._jobs.values()), timeout_s)

    # -- one task -------------------------------------------------------------------------

    def _finished(self, task: Task, job: asyncio.Task[Outcome]) -> None:
        self._jobs.pop(task.task_id, None)
        self._runs.pop(task.task_id, None)
        self._levels.pop(task.task_id, None)
        if not job.cancelled() and job.exception() is not None:
            # _run answers every error itself; reaching here is a bug worth a loud log.
            logger.error("task job crashed", exc_info=job.exception(), extra=task_context(task))

    async def _run(self, task: Task, run: _Run) -> Outcome:
        try:
            result = await self._execute(task, run)
        except asyncio.CancelledError:
            # Only abort and drain cancel a job, and they want an outcome rather than the error.
            if run.cancel_reason is not None:
                return self._cancelled(task, run)
            return await self._stopped(task, run)
        except Exception as err:
            # An engine may turn a cancellation into an error of its own (vLLM's non-streaming
            # chat answers "Client disconnected") rather than let it through.
            if run.cancel_reason is not None:
                return self._cancelled(task, run)
            job = asyncio.current_task()
            if job is not None and job.cancelling():
                return await self._stopped(task, run)
            if isinstance(err, EngineDeadError) and not run.answering:
                # Nothing of it left the replica: another replica runs it from the start.
                logger.warning(
                    "the engine died before the task answered: handed back to the poller",
                    extra=task_context(task),
                )
                return _outcome(task, retry=True, duration_s=time.monotonic() - run.started)
            answering = self._failed(task, err, run)
        else:
            if run.cancel_reason is not None:
                return self._cancelled(task, run)
            answering = self._answer(task, result, run)
        # The answer is the task's only one: a stop must not cut it off half sent.
        return await to_the_end(answering)

    def _failed(self, task: Task, err: Exception, run: _Run) -> Coroutine[Any, Any, Outcome]:
        """The answer of a task whose run raised ``err``."""
        if isinstance(err, TaskError):
            return self._answer_error(task, err, run)
        if isinstance(err, EngineDeadError):
            # Its first events are out: the producer gets the rest as an error, retryable.
            lost = EngineError(str(err), status_code=503, code="engine_failed")
            return self._answer_error(task, lost, run)
        # Outside the engine call (e.g. the event bus refused "[DONE]"): still one answer.
        logger.error(
            "task failed outside the engine call: %s",
            err,
            exc_info=not isinstance(err, WorkerError),
            extra=task_context(task),
        )
        failure = EngineError(f"the worker failed: {type(err).__name__}: {err}")
        return self._answer_error(task, failure, run)

    async def _stopped(self, task: Task, run: _Run) -> Outcome:
        """A stop cut ``task`` short (or came before it): 503 online and at level 0; left
        unanswered at level 1, where the server redelivers it after ``process_timeout`` (an
        answer now would be final), unless nothing redelivers it."""
        if self.redelivers and task.level != 0 and not task.is_online:
            logger.warning(
                "stopping: a level-1 task is left for the server's redelivery",
                extra=task_context(task),
            )
            self.metrics.inc("left_for_redelivery")
            return _outcome(task, duration_s=time.monotonic() - run.started)
        return await to_the_end(self._answer_error(task, ShuttingDownAnswer(), run))

    def _cancelled(self, task: Task, run: _Run) -> Outcome:
        """Bella-Queue cancelled ``task`` while it ran: the engine call is aborted (the stream
        was closed on the way out) and no answer goes out."""
        duration_s = time.monotonic() - run.started
        self.metrics.inc("tasks_cancelled", queue=task.queue, mode=task.response_mode.value)
        logger.info(
            "task %s cancelled after %.1f s (%s): aborted in the engine, not answered",
            task.task_id,
            duration_s,
            run.cancel_reason,
            extra={
                **task_context(task),
                "model": self.model_id or str(task.data.get("model") or ""),
                "status": "cancelled",
                "reason": run.cancel_reason,
                "generation_s": duration_s,
            },
        )
        return _outcome(task, cancelled=True, duration_s=duration_s)

    async def _execute(self, task: Task, run: _Run) -> dict[str, Any]:
        """Run the engine call; return the success result or raise a ``TaskError``."""
        now = self.clock()
        deadline = deadline_ms(
            task,
            self.config.max_task_time_s,
            now=now,
            redelivery_window_s=self.redelivery_window_s,
        )
        if now >= deadline:
            raise TaskExpiredError("the task expired before it could start")
        endpoint = task.endpoint or DEFAULT_ENDPOINT
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise InvalidTaskError(
                f"endpoint {endpoint!r} is not served; supported: {', '.join(SUPPORTED_ENDPOINTS)}",
                "endpoint",
            )
        data = dict(task.data)
        streaming = task.response_mode is ResponseMode.STREAMING
        if endpoint == "/v1/embeddings":
            streaming = False
        else:
            # Only streaming-mode tasks stream; the others need one whole response (§7).
            data["stream"] = streaming
        if streaming:
            # Exact token counts for the outcome and the metrics.
            data["stream_options"] = {"include_usage": True}
        else:
            data.pop("stream_options", None)
        priority = PRIORITY_ONLINE if task.level == 0 else PRIORITY_OFFLINE
        if task.start_time:
            self.metrics.observe(
                "put_to_start_s", max(0.0, (now - task.start_time) / 1000), queue=task.queue
            )
        timeout = asyncio.timeout((deadline - self.clock()) / 1000)
        response: dict[str, Any] | None = None
        online = task.level == 0 or task.is_online
        try:
            async with timeout:
                if self.seats is not None and not online and not streaming:
                    response = await self._preemptible(task, endpoint, data, priority, run)
                else:
                    async with contextlib.AsyncExitStack() as seat:
                        if self.seats is not None:
                            await seat.enter_async_context(
                                self.seats.hold(task.task_id, online=online, weight=_seqs(data))
                            )
                        if streaming:
                            async for item in self._attempts(task, endpoint, data, priority, run):
                                run.count_usage(item)
                                await self._chunk(task, run, item)
                        else:
                            response = await self._whole(task, endpoint, data, priority, run)
        except EngineDeadError:
            raise
        except Exception as err:
            if timeout.expired():
                # The deadline, whether it surfaced as TimeoutError or as the error an engine
                # made of its cancellation (vLLM's non-streaming chat: "Client disconnected").
                if run.overloaded:
                    raise EngineOverloadedAnswer(
                        "the model is overloaded; the task expired while waiting for a slot"
                    ) from None
                raise TaskExpiredError(
                    "the task's deadline passed during generation; generation was aborted"
                ) from None
            raise self._engine_failure(task, err) from None
        if streaming:
            await self._chunk(task, run, STREAM_DONE)
            return result_body(200, task.task_id)
        if response is None:
            raise EngineError("the engine returned no response")
        if task.response_mode is ResponseMode.STREAMING:
            # A streaming task on a non-streaming endpoint (embeddings): the server ignores the
            # completion's body for streaming tasks, so the response goes out as the one chunk.
            for data_item in (response, STREAM_DONE):
                await self._chunk(task, run, data_item)
            return result_body(200, task.task_id)
        return result_body(200, task.task_id, response)

    @staticmethod
    def _engine_failure(task: Task, err: Exception) -> TaskError:
        """The answer's error for an engine call that failed with ``err`` (no deadline)."""
        if isinstance(err, TaskError):
            return err
        if isinstance(err, EngineOverloadedError):
            return EngineOverloadedAnswer(str(err) or "the model is overloaded")
        if isinstance(err, TimeoutError):
            # The engine's own timeout, not the task's deadline.
            logger.warning("engine call timed out: %s", err, extra=task_context(task))
            return EngineError(f"the engine failed: {type(err).__name__}: {err}")
        if isinstance(err, WorkerError):
            return EngineError(f"the engine failed: {err}")
        logger.error("engine call failed", exc_info=err, extra=task_context(task))
        return EngineError(f"the engine failed: {type(err).__name__}: {err}")

    async def _attempts(
        self, task: Task, endpoint: str, data: dict[str, Any], priority: int, run: _Run
    ) -> AsyncIterator[dict[str, Any]]:
        """The engine stream, retried with backoff while the engine refuses it for load."""
        overloaded = Backoff(self.config.overload_retry_initial_s, self.config.overload_retry_max_s)
        while True:
            produced = False
            stream = self.engine.stream(endpoint, data, request_id=task.task_id, priority=priority)
            try:
                async for item in stream:
                    produced = True
                    run.overloaded = False
                    yield item
                return
            except EngineOverloadedError:
                if produced:
                    raise
                run.overloaded = True
                await overloaded.sleep()
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    # Closing aborts the request in the engine when it did not finish.
                    with contextlib.suppress(Exception):
                        await aclose()

    async def _preemptible(
        self, task: Task, endpoint: str, data: dict[str, Any], priority: int, run: _Run
    ) -> dict[str, Any] | None:
        """An offline task's whole engine response, within the seats' offline width; run
        again from the start (at the head of the line) when an online task preempts it."""
        seats = self.seats
        assert seats is not None
        while True:
            async with seats.hold(
                task.task_id,
                online=False,
                weight=_seqs(data),
                preemptible=run.preemptions < seats.max_preemptions,
                first=run.preemptions > 0,
            ) as seat:
                call = asyncio.ensure_future(self._whole(task, endpoint, data, priority, run))
                seat.on_preempt = call.cancel
                try:
                    return await call
                except BaseException:
                    job = asyncio.current_task()
                    # Preempted, unless this job itself is being cancelled (deadline, abort,
                    # stop); the engine may have made its own error of the cancellation.
                    if not seat.preempted or (job is not None and job.cancelling()):
                        raise
            run.preemptions += 1
            self.metrics.inc("preemptions", queue=task.queue)
            logger.info(
                "offline task preempted for an online task (%d of at most %d); it runs again",
                run.preemptions,
                seats.max_preemptions,
                extra=task_context(task),
            )

    async def _whole(
        self, task: Task, endpoint: str, data: dict[str, Any], priority: int, run: _Run
    ) -> dict[str, Any] | None:
        """The last item of one engine call (a non-streaming call yields one response)."""
        response: dict[str, Any] | None = None
        async for item in self._attempts(task, endpoint, data, priority, run):
            run.count_usage(item)
            response = item
        return response

    async def _chunk(self, task: Task, run: _Run, data: Any) -> None:
        """Send the next progress event of a streaming task: ``eventId`` counts 0, 1, ..."""
        if run.sent == 0:
            run.mark_answering()
            self._first_event(task, run)
        await self.events.progress(
            task.instance_id or "", task.task_id, str(run.sent), STREAM_EVENT_NAME, data
        )
        run.sent += 1

    def _first_event(self, task: Task, run: _Run) -> None:
        self.metrics.observe(
            "time_to_first_event_s", time.monotonic() - run.started, queue=task.queue
        )

    # -- answers --------------------------------------------------------------------------

    async def _answer_error(self, task: Task, err: TaskError, run: _Run) -> Outcome:
        run.mark_answering()
        delivered = True
        try:
            result = await answer_error(
                task, err, self.events, self.completer, event_id=str(run.sent)
            )
        except Exception as exc:
            delivered = False
            delivery_failed(task, exc, self.metrics)
            result = result_body(err.status_code, task.task_id)
        if task.response_mode is ResponseMode.STREAMING:
            run.sent += 1
        return self._done(task, run, int(result["status_code"]), delivered)

    async def _answer(self, task: Task, result: dict[str, Any], run: _Run) -> Outcome:
        if task.response_mode is ResponseMode.BLOCKING:
            self._first_event(task, run)
        run.mark_answering()
        delivered = True
        try:
            await deliver(task, result, self.events, self.completer)
        except Exception as exc:
            delivered = False
            delivery_failed(task, exc, self.metrics)
        return self._done(task, run, int(result["status_code"]), delivered)

    def _done(self, task: Task, run: _Run, status: int, delivered: bool) -> Outcome:
        self.metrics.inc(
            "tasks_completed",
            queue=task.queue,
            mode=task.response_mode.value,
            status=status_class(status),
        )
        model = self.model_id or str(task.data.get("model") or "")
        if run.prompt_tokens:
            self.metrics.inc("prompt_tokens", run.prompt_tokens, queue=task.queue, model=model)
        if run.completion_tokens:
            self.metrics.inc(
                "completion_tokens", run.completion_tokens, queue=task.queue, model=model
            )
        out = _outcome(
            task,
            status_code=status,
            answered=True,
            delivered=delivered,
            events=run.sent,
            prompt_tokens=run.prompt_tokens,
            completion_tokens=run.completion_tokens,
            queue_wait_s=(
                max(0.0, (run.started_ms - task.start_time) / 1000) if task.start_time else None
            ),
            ttft_s=None if run.first_at is None else run.first_at - run.started,
            duration_s=time.monotonic() - run.started,
        )
        # One structured line per answered task (never the producer's ak).
        logger.info(
            "task %s answered %d: %d prompt + %d completion tokens",
            task.task_id,
            status,
            run.prompt_tokens,
            run.completion_tokens,
            extra={
                **task_context(task),
                "model": model,
                "status": status,
                "delivered": delivered,
                "prompt_tokens": run.prompt_tokens,
                "completion_tokens": run.completion_tokens,
                "queue_wait_s": out["queue_wait_s"],
                "ttft_s": out["ttft_s"],
                "generation_s": out["duration_s"],
            },
        )
        return out


def _outcome(task: Task, **fields: Any) -> Outcome:
    return outcome(task.task_id, **fields)


def _seqs(data: dict[str, Any]) -> int:
    """Engine sequences a request runs (its ``n``)."""
    n = data.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
