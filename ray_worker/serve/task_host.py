"""Hosting the task runner inside an LLM replica: its clients, its start and its stop.

This module owns what an LLM replica needs to run and answer whole Bella tasks: its
answering kit (``ray_worker.serve.answering``: queue client, outbox, event-bus client), the
``TaskRunner`` with its ``CancelWatch`` (long offline tasks Bella-Queue cancelled are
aborted), and the
``run`` stream the poller calls (its messages: ``ray_worker.hop``). The task's work is
shielded from that call: a poller that dies or restarts does not stop it.

Stopping (``begin_stop``, as soon as Serve starts stopping the replica, and ``aclose``): new
runs are refused with ``ReplicaUnavailableError`` (the poller runs them elsewhere), running
tasks get the stop budget (``drain_timeout_s``) to finish, then the runner cuts the rest short
(503, or left for redelivery at level 1 while the Redis of Bella-Queue's queues fires the
redelivery timer: read at the start and again at the stop, ``serve.redelivery``); the outbox
gets what is left of the margin.

It must not hold task logic (``ray_worker.task.runner`` does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from pydantic import SecretStr

from ray_worker.bella.protocol import Task
from ray_worker.config import STOP_MARGIN_S, RunnerSettings
from ray_worker.errors import EngineError, ReplicaUnavailableError
from ray_worker.hop import Outcome, accepted, answering, done
from ray_worker.metrics import WorkerMetrics
from ray_worker.serve.answering import AnsweringKit
from ray_worker.task.cancel_watch import CancelWatch
from ray_worker.task.runner import TaskRunner
from ray_worker.task.seats import Seats

logger = logging.getLogger(__name__)

__all__ = ["ReplicaTasks"]

_CLOSE_TIME_S = 5.0
"""Of the stop margin: what closing the event-bus client gets at the end."""
_HAND_OVER_TIME_S = 10.0
"""Of the stop margin: what handing undelivered answers to a live poller gets."""
_SETTLE_MAX_S = 5.0
"""Longest a stopping replica tries its undelivered answers itself before it hands them to a
live poller (whose outbox keeps trying them until their tasks expire)."""

StreamFn = Callable[..., AsyncIterator[dict[str, Any]]]


class _Engine:
    """The runner's ``Engine`` over the replica's own ``run_task``."""

    def __init__(self, stream: StreamFn) -> None:
        self.stream = stream


class ReplicaTasks:
    """The task runner of one LLM replica, with its clients."""

    def __init__(
        self,
        settings: RunnerSettings | Mapping[str, Any],
        apikey: SecretStr,
        *,
        stream: StreamFn,
        model_id: str = "",
        app_name: str,
        client_id: str,
        replica_id: str = "",
        seats: Seats | None = None,
    ) -> None:
        self.settings = (
            settings
            if isinstance(settings, RunnerSettings)
            else RunnerSettings.model_validate(dict(settings))
        )
        dispatch = self.settings.dispatcher
        self.replica_id = replica_id or client_id
        """Reported with each accepted task (the poller asks the load reports about it)."""
        self._stopping: asyncio.Task[int] | None = None
        self._stop_started = 0.0
        self.metrics = WorkerMetrics()
        self.kit = AnsweringKit(
            self.settings.queue_url,
            apikey,
            timeout_s=self.settings.request_timeout_s,
            dispatch=dispatch,
            publisher=self.settings.publisher,
            eventbus_url=self.settings.eventbus_url,
            app_name=app_name,
            client_id=client_id,
            metrics=self.metrics,
        )
        # At hand: the load report reads the outbox, the two-node check the event-bus client.
        self.outbox = self.kit.outbox
        self.events = self.kit.events
        self.runner = TaskRunner(
            engine=_Engine(stream),
            events=self.events,
            completer=self.outbox,
            config=dispatch,
            metrics=self.metrics,
            clock=self.kit.client.clock.now_ms,
            redelivery_window_s=self.settings.redelivery_window_s,
            model_id=model_id,
            redelivers=self.settings.redelivers,
            seats=seats,
        )
        self.cancel_watch: CancelWatch | None = None
        self._watching: asyncio.Task[None] | None = None
        if dispatch.cancel_check_interval_s > 0:
            self.cancel_watch = CancelWatch(
                self.runner,
                self.kit.client,
                interval_s=dispatch.cancel_check_interval_s,
                max_requests=dispatch.cancel_check_max_requests,
                metrics=self.metrics,
            )
            self._watching = asyncio.get_running_loop().create_task(
                self.cancel_watch.run(), name="replica-cancel-watch"
            )
        self._start = asyncio.get_running_loop().create_task(
            self._connect(), name="replica-event-bus"
        )

    async def _connect(self) -> None:
        await self.kit.connect()
        await self._check_redelivery()

    async def _check_redelivery(self) -> None:
        """Answer level-1 tasks cut short with 503 instead of leaving them, while the Redis
        of Bella-Queue's queues is known not to fire its redelivery timer (asked at the start
        and at a stop)."""
        if self.settings.redelivers:  # else nothing is left for redelivery anyway
            self.runner.redelivers = await self.kit.redelivers(self.runner.redelivers)

    @property
    def stopping(self) -> bool:
        """The replica is stopping: it takes no new task (its load report says draining)."""
        return self._stopping is not None

    def begin_stop(self) -> None:
        """Serve began stopping this replica: refuse new runs, let the running tasks finish
        within the stop budget (``drain_timeout_s``), then cut them short. Idempotent."""
        if self._stopping is not None:
            return
        self._stop_started = time.monotonic()
        budget_s = self.settings.drain_timeout_s
        logger.info(
            "stopping: %d tasks may finish within %.0f s; new ones go to other replicas",
            self.runner.in_flight,
            budget_s,
        )
        self._stopping = asyncio.get_running_loop().create_task(
            self._drain(budget_s), name="replica-stop"
        )

    async def _drain(self, budget_s: float) -> int:
        # What a stop does with level-1 tasks it cuts short depends on redelivery now.
        checked = asyncio.get_running_loop().create_task(self._check_redelivery())
        try:
            return await self.runner.drain(budget_s)
        finally:
            checked.cancel()

    async def run(self, task_wire: Mapping[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Run one task given by the poller; see the module docstring for what it yields."""
        if self._stopping is not None:
            # Serve may still route a call here while it stops the replica: run it elsewhere.
            raise ReplicaUnavailableError("this replica is stopping; the task runs elsewhere")
        task = Task.model_validate(dict(task_wire))
        if not task.is_online:
            self.outbox.expect(task)
        if task.is_online and not self.kit.ready.is_set():
            # The answer has nowhere to go yet; the start-up retries until the bus answers.
            await self.kit.ready.wait()
        began = asyncio.Event()
        job = self.runner.start(task, on_answering=began.set)
        if job is None:
            yield done(await self.runner.run(task))
            return
        yield accepted(self.replica_id)
        signal = asyncio.ensure_future(began.wait())
        try:
            await asyncio.wait({signal, job}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signal.cancel()
        if began.is_set():
            yield answering()
        result: Outcome = await asyncio.shield(job)
        yield done(result)

    def held(self) -> dict[str, Any]:
        """The tasks running here and the engine's seats (part of the load report)."""
        held = self.runner.held()
        if self.runner.seats is not None:
            held.update(self.runner.seats.stats())
        return held

    def outbox_load(self) -> dict[str, Any]:
        """The outbox's figures (entries, bytes, give-ups; part of the load report)."""
        return self.outbox.stats()

    def check_health(self) -> None:
        """Raise when start-up died."""
        if self._start.done() and not self._start.cancelled() and self._start.exception():
            raise EngineError(f"event-bus start-up failed: {self._start.exception()!r}")
        watching = self._watching
        if watching is not None and watching.done() and not watching.cancelled():
            raise EngineError(f"the cancellation watch stopped: {watching.exception()!r}")

    async def aclose(self) -> None:
        """Finish the stop (``begin_stop``, if Serve's stop was not seen before): the tasks'
        budget, then a few seconds of the outbox's own tries, then what it still holds goes
        to a live poller (``hand_over_answers``); close the clients. Answers nobody took are
        logged at ERROR per task id."""
        self.begin_stop()
        if self._watching is not None:
            self._watching.cancel()
        assert self._stopping is not None
        cut = await self._stopping
        if cut:
            logger.warning("%d tasks were cut short by the replica's stop", cut)
        # The outbox delivered all along; what is left gets the rest of the margin, then goes
        # to a live poller's outbox (a downscale during a Bella-Queue outage loses nothing).
        ends_at = (
            self._stop_started
            + self.settings.drain_timeout_s
            + STOP_MARGIN_S
            - _HAND_OVER_TIME_S
            - _CLOSE_TIME_S
        )
        self._start.cancel()
        await self.kit.aclose(
            settle_s=min(max(ends_at - time.monotonic(), 2.0), _SETTLE_MAX_S),
            hand_over_s=_HAND_OVER_TIME_S,
            close_s=_CLOSE_TIME_S,
        )
