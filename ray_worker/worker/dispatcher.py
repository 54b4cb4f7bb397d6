"""The dispatcher: hands each taken task to an LLM replica of its model, and supervises it.

This module owns the control-plane side of a task: its queue's limits on one task (checked by
``task/limits.py``; a task's fan-out ``n`` is what it holds of capacity), routing by
``data.model`` among the served models (the queue's default model otherwise), the ``Replicas``
call that gives the whole task to a replica (whose task runner answers it: no token comes back
here), retrying a task whose call failed before the replica answered anything, and the
poller's own answers, which are only for tasks that never reached a replica (over a limit,
unknown model, expired, shutting down, every replica gone) and the safety net when the replica
running a task dies mid-way (one 503; a late duplicate is harmless: the server ignores events
after a completion and complete is idempotent, protocol §4.3, §6).

It must not talk to Ray, Redis or httpx directly: the replicas are ``Replicas``, the event bus
an ``EventSink`` and Bella-Queue a ``Completer``, so it runs unchanged in unit tests with fakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any, Protocol

from ray_worker.aio import Backoff, cut_short, to_the_end
from ray_worker.bella.protocol import Level, Task, now_ms, task_return_path
from ray_worker.config import DispatcherConfig, QueueSpec, adapter_of
from ray_worker.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidTaskError,
    ModelNotFoundError,
    ReplicaUnavailableError,
    TaskError,
    TaskExpiredError,
)
from ray_worker.hop import ACCEPTED, ANSWERING, DONE, Outcome, deadline_ms
from ray_worker.metrics import WorkerMetrics, status_class
from ray_worker.task import limits as task_limits
from ray_worker.task.answers import (
    Completer,
    EngineOverloadedAnswer,
    EventSink,
    ShuttingDownAnswer,
    answer_error,
    delivery_failed,
    task_context,
)
from ray_worker.task.limits import TaskLimits, check_task
from ray_worker.worker.capacity import CapacityTracker

logger = logging.getLogger(__name__)

__all__ = ["Dispatcher", "ReplicaLostAnswer", "Replicas"]

_RETRY_INITIAL_S = 0.2
_RETRY_MAX_S = 2.0
"""Backoff between calls of a task whose replica failed before answering."""
_FATE_POLL_S = 0.25
"""How often a task's fate is read from the load reports after its replica call failed."""

SAFETY_NET_EVENT_ID = "error"
"""``eventId`` of the error chunk the poller sends for a streaming task whose replica died:
the poller does not know how many events the replica sent, so it does not number it."""


class Replicas(Protocol):
    """The LLM deployments, by served model id."""

    def run(
        self, model_id: str, task: Task, *, multiplexed_model_id: str | None = None
    ) -> AsyncIterator[Mapping[str, Any]]:
        """Give ``task`` to a replica of ``model_id``.

        ``multiplexed_model_id`` (``base:adapter``) makes Serve prefer a replica that holds
        that LoRA adapter already.

        Yields the messages of a run (``ray_worker.hop``: accepted, answering, done). Raises
        ``ReplicaUnavailableError`` (no replica, or it died) or ``EngineOverloadedError``
        (the deployment refused the call for load: it never reached a replica).
        """
        ...


class ReplicaLostAnswer(TaskError):
    """The replica running the task died mid-way: the producer may retry."""

    status_code = 503
    error_type = "server_error"
    code = "replica_failed"


class _Job:
    __slots__ = ("accepted_by", "answering", "charged", "in_call", "n")

    def __init__(self, charged: str, n: int) -> None:
        self.charged = charged
        """The model whose capacity the task holds: its pool's, then the one it runs on."""
        self.n = n
        """Engine sequences it holds there (its fan-out)."""
        self.in_call = False
        self.answering = False
        self.accepted_by: str | None = None
        """The replica that reported the task accepted (it owns the task from then on)."""


class Dispatcher:
    """Gives taken tasks to the replicas; every task ends in exactly one answer."""

    def __init__(
        self,
        *,
        replicas: Replicas,
        events: EventSink,
        completer: Completer,
        capacity: CapacityTracker,
        queues: list[QueueSpec],
        served_models: list[str],
        lora_models: Collection[str] = (),
        config: DispatcherConfig | None = None,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], int] = now_ms,
        redelivers: bool = True,
    ) -> None:
        self.replicas = replicas
        self.redelivers = redelivers
        """Level-1 tasks left unanswered come back (the takes set ``process_timeout``): a stop
        leaves them for redelivery. Without it they are answered 503 instead."""
        self.clock = clock
        """Epoch ms on the server's clock (deadlines are the server's timestamps)."""
        self.events = events
        self.completer = completer
        self.capacity = capacity
        self.config = config or DispatcherConfig()
        self.metrics = metrics or WorkerMetrics(use_ray=False)
        self.served_models = list(served_models)
        self.lora_models = set(lora_models)
        """Served models that take LoRA adapters (``base:adapter`` routes to ``base``)."""
        self._queue_models = {q.name: q.model for q in queues}
        self._limits = {q.name: TaskLimits.of(q, self.config) for q in queues}
        """Each queue's limits on one task; a queue not configured gets the worker-wide ones."""
        self._default_limits = TaskLimits.of(None, self.config)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._completed: OrderedDict[str, bool] = OrderedDict()
        """Recently ended task ids (value: answered online), to recognise redeliveries."""
        self._accepting = True
        self.answered: dict[str, int] = {"2xx": 0, "4xx": 0, "5xx": 0}
        """Answers by status class: the replicas' (from their outcomes) and the poller's."""
        self.tokens = {"prompt": 0, "completion": 0}
        self.cancelled = 0
        """Tasks the replicas aborted unanswered because Bella-Queue cancelled them."""
        self.timings: dict[str, list[Any]] = {}
        """Per outcome timing: [sum, count] (means in the status)."""

    # -- public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Tasks handed out and not ended yet."""
        return len(self._running)

    def holds(self, task_id: str) -> bool:
        """Whether the task is in flight here."""
        return task_id in self._running

    def reject(self, raw: Any, reason: str) -> bool:
        """Answer a taken entry the Task model could not read (``TakeResponse.rejected``).

        When ``protocol.task_return_path`` finds its ``task_id`` and return path, it is
        answered 400 ``invalid_request_error`` there (``reason`` names fields, never values);
        otherwise it is logged and counted. It never reached a replica, so no capacity is
        held. Returns whether an answer was started; never raises. ``raw`` may hold the
        producer's ``ak``: it is never logged.
        """
        self.metrics.inc("invalid_tasks")
        stub = task_return_path(raw)
        if stub is None:
            self.metrics.inc("invalid_tasks_dropped")
            logger.warning(
                "dropping an unreadable task with no usable task_id or return path: %s", reason
            )
            return False
        if stub.task_id in self._running or (stub.is_online and stub.task_id in self._completed):
            self.metrics.inc("duplicates")
            logger.info("ignoring a redelivered unreadable task", extra=task_context(stub))
            return False
        err = InvalidTaskError(f"the task could not be read: {reason}")
        job = asyncio.create_task(
            to_the_end(self._answer(stub, err, event_id="0")), name=f"reject-{stub.task_id}"
        )
        self._running[stub.task_id] = job

        def rejected(_: asyncio.Task[None]) -> None:
            self._running.pop(stub.task_id, None)
            self._remember(stub)

        job.add_done_callback(rejected)
        return True

    def limits(self, task: Task) -> TaskLimits:
        """The limits of ``task``'s queue."""
        return self._limits.get(task.full_queue, self._default_limits)

    def fan_out(self, task: Task) -> int:
        """Engine sequences ``task`` holds (its ``n``, within its queue's ``max_n``): what the
        caller charges against capacity for it, and passes to ``submit``. Never raises."""
        return task_limits.fan_out(task.data, self.limits(task))

    def submit(self, task: Task, pool_model: str, n: int = 1) -> bool:
        """Start dispatching ``task``, counted as ``n`` (``fan_out``) against ``pool_model``'s
        capacity by the caller; its end releases those ``n``, once.

        Returns False, and starts nothing (the caller releases what it counted), for a task
        already in flight or an online one recently answered (a redelivery). Once ``drain``
        has begun, a new task is not run: it is answered 503 at once, or left for redelivery
        at level 1.
        """
        if task.task_id in self._running or (task.is_online and task.task_id in self._completed):
            self.metrics.inc("duplicates")
            logger.info("ignoring a redelivered task", extra=task_context(task))
            return False
        state = _Job(pool_model, n)
        work = self._run(task, state) if self._accepting else self._refuse(task)
        job = asyncio.create_task(work, name=f"dispatch-{task.task_id}")
        self._running[task.task_id] = job
        job.add_done_callback(lambda j: self._finished(task, state, j))
        return True

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting; wait up to ``timeout_s`` for the tasks in flight (their replicas
        finish them within their own stop budget, ``drain_timeout_s``).

        Then this stops waiting: a task a replica accepted stays with it (it answers); one that
        never reached a replica (still queued at a Serve handle) is refused: 503, or left for
        redelivery at level 1. Returns how many were still in flight.
        """
        self._accepting = False
        return await cut_short(list(self._running.values()), timeout_s)

    # -- one task -------------------------------------------------------------------------

    def _finished(self, task: Task, state: _Job, job: asyncio.Task[None]) -> None:
        self._running.pop(task.task_id, None)
        level = Level.ONLINE if task.level == 0 else Level.OFFLINE
        self.capacity.release(state.charged, level, state.n, task_id=task.task_id)
        self._remember(task)
        if not job.cancelled() and job.exception() is not None:
            # _run answers every error itself; reaching here is a bug worth a loud log.
            logger.error("dispatch crashed", exc_info=job.exception(), extra=task_context(task))

    async def _run(self, task: Task, job: _Job) -> None:
        try:
            now = self.clock()
            if now >= deadline_ms(task, self.config.max_task_time_s, now=now):
                raise TaskExpiredError("the task expired before it could start")
            # Over one of its queue's limits: 400, and it never reaches a replica.
            check_task(task.data, self.limits(task))
            model_id, adapter_id = self._resolve_model(task)
            self._charge(task, job, model_id)
            outcome = await self._dispatch(task, model_id, job, adapter_id)
        except asyncio.CancelledError:
            if job.accepted_by is None:
                # Stopping before a replica took the task (it may have waited at a Serve
                # handle for a replica): nobody else will answer it.
                await self._answer_refused(task)
            raise
        except TaskError as err:
            await self._answer(task, err, event_id="0")
        else:
            if outcome is not None:
                self._record(outcome)

    async def _dispatch(
        self, task: Task, model_id: str, job: _Job, adapter_id: str | None = None
    ) -> Outcome | None:
        """Run ``task`` on a replica; its outcome, or None when it ended without one reaching
        here (its replica answered it, or it was left for redelivery)."""
        failures = 0
        overloaded = Backoff(self.config.overload_retry_initial_s, self.config.overload_retry_max_s)
        retrying = Backoff(_RETRY_INITIAL_S, _RETRY_MAX_S)
        deadline = deadline_ms(task, self.config.max_task_time_s, now=self.clock())
        while True:
            job.in_call = True
            try:
                async for message in self.replicas.run(
                    model_id, task, multiplexed_model_id=adapter_id
                ):
                    phase = message.get("phase")
                    if phase == ACCEPTED:
                        job.accepted_by = str(message.get("replica_id") or "")
                    elif phase == ANSWERING:
                        job.answering = True
                    elif phase == DONE:
                        outcome: Outcome = message["outcome"]
                        if not outcome.get("retry"):
                            return outcome
                        # Its engine died before the task began answering: nothing of it
                        # left, so another replica runs it (Serve replaces the dead one).
                        job.accepted_by = None
                        raise EngineDeadError("the replica's engine died under the task")
                raise ReplicaUnavailableError("the replica ended the call without an outcome")
            except (EngineOverloadedError, EngineDeadError) as err:
                # The deployment's queue is full, or the replica it reached has a dead engine
                # (it took nothing): wait for room on a live replica, within the deadline.
                job.in_call = False
                if not self._accepting:
                    await self._answer_refused(task)
                    return None
                if isinstance(err, EngineDeadError):
                    await self._live_replica(model_id, deadline)
                wait_s = overloaded.next_s()
                if self.clock() + wait_s * 1000 >= deadline:
                    raise EngineOverloadedAnswer(
                        f"the model is overloaded; the task expired while waiting: {err}"
                    ) from None
                await asyncio.sleep(wait_s)
            except (TaskError, asyncio.CancelledError):
                raise
            except Exception as err:
                # ReplicaUnavailableError, or any other failure of the call: the task's fate on
                # its replica is unknown until the replica's load reports tell.
                job.in_call = False
                if not isinstance(err, ReplicaUnavailableError):
                    logger.error(
                        "the replica call failed: %s: %s",
                        type(err).__name__,
                        err,
                        extra=task_context(task),
                    )
                if job.accepted_by is not None:
                    if await self._ended_on_replica(task, model_id, job.accepted_by, deadline):
                        # A blip of the call, not a death: the replica ran the task to its end
                        # and answered it (or left it for redelivery) itself.
                        logger.warning(
                            "the call to replica %s failed (%s) but the task ended there",
                            job.accepted_by,
                            err,
                            extra=task_context(task),
                        )
                        return None
                    job.accepted_by = None
                if job.answering:
                    self.metrics.inc("replica_failures")
                    if self._leaves_for_redelivery(task):
                        # Its answer may have left already; the server redelivers it if not.
                        self.metrics.inc("left_for_redelivery")
                        logger.warning(
                            "the replica running a level-1 task failed mid-answer; it is left "
                            "for the server's redelivery: %s",
                            err,
                            extra=task_context(task),
                        )
                        return None
                    raise ReplicaLostAnswer(
                        f"the replica running the task failed mid-way: {err}"
                    ) from None
                if not self._accepting:
                    # Stopping: the replicas stop too; nothing would run it.
                    await self._answer_refused(task)
                    return None
                failures += 1
                if failures > self.config.max_replica_retries:
                    raise EngineOverloadedAnswer(
                        f"no replica of {model_id!r} could run the task: {err}"
                    ) from None
                logger.warning(
                    "replica failed before answering; retrying (%d/%d): %s",
                    failures,
                    self.config.max_replica_retries,
                    err,
                    extra=task_context(task),
                )
                await retrying.sleep()

    async def _ended_on_replica(
        self, task: Task, model_id: str, replica_id: str, deadline: int
    ) -> bool:
        """After a failed call: wait for ``replica_id``'s load reports to tell whether it still
        runs ``task`` (then wait for its end there) or died. True when it ended there."""
        since = self.capacity.now()
        grace_ms = 30_000  # the replica answers an expired task itself, 408, just after
        while True:
            fate = self.capacity.task_fate(model_id, replica_id, task.task_id, since=since)
            if fate == "ended":
                return True
            if fate == "gone":
                return False
            if self.clock() >= deadline + grace_ms:
                logger.error(
                    "replica %s still reports the task past its deadline; not waiting longer",
                    replica_id,
                    extra=task_context(task),
                )
                return True
            await asyncio.sleep(_FATE_POLL_S)

    def _charge(self, task: Task, job: _Job, model_id: str) -> None:
        """A task whose ``data.model`` names another served model than its queue's runs on
        that model's replicas: it holds that model's capacity from now on, not its pool's (the
        other model's poller then takes less for it)."""
        if model_id == job.charged:
            return
        level = Level.ONLINE if task.level == 0 else Level.OFFLINE
        self.capacity.release(job.charged, level, job.n, task_id=task.task_id)
        self.capacity.acquire(model_id, level, job.n, task_id=task.task_id)
        job.charged = model_id

    async def _live_replica(self, model_id: str, deadline: int) -> None:
        """After a replica with a dead engine refused or handed back a task: wait until the
        model has a replica taking tasks (the replacement reports), within the deadline, rather
        than calling the dead one again and again."""
        while self.capacity.replicas(model_id) == 0 and self.clock() < deadline:
            await self.capacity.wait_changed(1.0)

    def _leaves_for_redelivery(self, task: Task) -> bool:
        return self.redelivers and task.level != 0 and not task.is_online

    async def _refuse(self, task: Task) -> None:
        await self._answer_refused(task)

    async def _answer_refused(self, task: Task) -> None:
        if self._leaves_for_redelivery(task):
            self.metrics.inc("left_for_redelivery")
            logger.warning(
                "stopping: a level-1 task is left for the server's redelivery",
                extra=task_context(task),
            )
            return
        await to_the_end(self._answer(task, ShuttingDownAnswer(), event_id="0"))

    async def _answer(self, task: Task, err: TaskError, *, event_id: str) -> None:
        """The poller's own answer; failures are logged and counted, never raised."""
        if isinstance(err, ReplicaLostAnswer):
            event_id = SAFETY_NET_EVENT_ID
        try:
            await answer_error(task, err, self.events, self.completer, event_id=event_id)
        except Exception as exc:
            delivery_failed(task, exc, self.metrics)
        status = status_class(err.status_code)
        self.answered[status] = self.answered.get(status, 0) + 1
        self.metrics.inc(
            "tasks_completed", queue=task.queue, mode=task.response_mode.value, status=status
        )

    def _record(self, outcome: Outcome) -> None:
        """A replica's outcome (the replica counted its own metrics)."""
        if outcome["duplicate"]:
            self.metrics.inc("duplicates")
            return
        if outcome.get("cancelled"):
            self.cancelled += 1
        if outcome["answered"]:
            status = status_class(outcome["status_code"])
            self.answered[status] = self.answered.get(status, 0) + 1
        self.tokens["prompt"] += outcome["prompt_tokens"]
        self.tokens["completion"] += outcome["completion_tokens"]
        for name in ("queue_wait_s", "ttft_s", "duration_s"):
            value = outcome.get(name)
            if value is not None:
                total = self.timings.setdefault(name, [0.0, 0])
                total[0] += value
                total[1] += 1

    def timing_means(self) -> dict[str, float | None]:
        """Means of the replicas' outcome timings so far (for the status)."""
        return {
            name: round(total / count, 6) if count else None
            for name, (total, count) in (
                (n, self.timings.get(n, [0.0, 0])) for n in ("queue_wait_s", "ttft_s", "duration_s")
            )
        }

    def _resolve_model(self, task: Task) -> tuple[str, str | None]:
        """The deployment of ``task`` and, for ``base:adapter``, its multiplexed model id."""
        requested = task.data.get("model")
        if requested is not None and not isinstance(requested, str):
            raise InvalidTaskError("'model' must be a string", "model")
        if requested:
            if requested in self.served_models:
                return requested, None
            for base in self.lora_models:
                if adapter_of(requested, base) is not None:
                    return base, requested
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist or is not served by this worker",
                "model",
            )
        default = self._queue_models.get(task.full_queue)
        if default:
            return default, None
        if len(self.served_models) == 1:
            return self.served_models[0], None
        raise InvalidTaskError("'model' is required: this worker serves several models", "model")

    def _remember(self, task: Task) -> None:
        limit = self.config.remember_completed
        if limit <= 0:
            return
        self._completed[task.task_id] = task.is_online
        self._completed.move_to_end(task.task_id)
        while len(self._completed) > limit:
            self._completed.popitem(last=False)
