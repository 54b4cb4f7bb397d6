"""The poller's view of the LLM deployments: Serve handles by model, Ray errors translated.

This module owns calling ``BellaLLMServer.run`` (one whole task) through Serve deployment
handles as a stream, translating Ray's exceptions into ``ray_worker.errors`` so the
dispatcher never sees Ray, the ``LoadReporter`` each LLM replica runs to push its load to
the poller, and ``hand_over_answers``: a stopping replica's (or poller's) undelivered HTTP
answers handed to a live poller. It must not hold business logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from ray import exceptions as ray_exceptions
from ray import serve
from ray.serve import exceptions as serve_exceptions
from ray.serve.handle import DeploymentHandle

from ray_worker.bella.protocol import Task
from ray_worker.errors import (
    EngineError,
    EngineOverloadedError,
    ReplicaUnavailableError,
    WorkerError,
)
from ray_worker.task.outbox import Outbox

logger = logging.getLogger(__name__)

__all__ = [
    "POLLER_DEPLOYMENT",
    "LoadReporter",
    "ServeReplicas",
    "hand_over_answers",
    "translate_ray_error",
]

POLLER_DEPLOYMENT = "QueuePoller"
"""Name of the poller deployment LLM replicas push their load to (same Serve app)."""

_UNAVAILABLE = (
    ray_exceptions.RayActorError,
    ray_exceptions.ActorUnavailableError,
    serve_exceptions.DeploymentUnavailableError,
    serve_exceptions.ReplicaUnavailableError,
)


def translate_ray_error(err: BaseException) -> BaseException:
    """The ``ray_worker.errors`` exception a Ray/Serve exception stands for."""
    if isinstance(err, WorkerError):
        # RayTaskError is made an instance of its cause's class; rebuild the plain cause so
        # it pickles and prints cleanly.
        cause = getattr(err, "cause", None)
        return cause if isinstance(cause, WorkerError) else err
    if isinstance(err, ray_exceptions.RayTaskError):
        cause = err.cause
        if isinstance(cause, WorkerError):
            return cause
        return EngineError(f"{type(cause).__name__}: {cause}")
    if isinstance(err, serve_exceptions.BackPressureError):
        return EngineOverloadedError(str(err))
    if isinstance(err, _UNAVAILABLE):
        return ReplicaUnavailableError(f"{type(err).__name__}: {err}")
    return err


class ServeReplicas:
    """``Replicas`` over Serve handles of ``BellaLLMServer`` deployments: ``run`` streams the
    phases of one whole task from the replica that runs it."""

    def __init__(self, handles: Mapping[str, DeploymentHandle[Any]]) -> None:
        self._handles = {m: h.options(stream=True) for m, h in handles.items()}

    @property
    def model_ids(self) -> list[str]:
        """Served models."""
        return list(self._handles)

    async def run(
        self, model_id: str, task: Task, *, multiplexed_model_id: str | None = None
    ) -> AsyncIterator[Mapping[str, Any]]:
        """Give ``task`` to a replica of ``model_id``; yields what its ``run`` yields.

        With ``multiplexed_model_id`` (a LoRA adapter, ``base:adapter``) Serve's router
        prefers a replica that has that adapter loaded (Serve model multiplexing).
        Closing this early does not cancel the task on its replica (the replica owns it).
        """
        handle = self._handles[model_id]
        if multiplexed_model_id:
            handle = handle.options(multiplexed_model_id=multiplexed_model_id)
        call: Any = handle.run.remote(task.model_dump(mode="json"))
        try:
            async for message in call:
                yield message
        except Exception as err:
            raise translate_ray_error(err) from None


class LoadReporter:
    """Runs inside each LLM replica: pushes ``get_load()`` to the poller every interval.

    The poller counts a replica as running while its reports are fresh, so a replica that
    stops reporting (dead, draining) stops receiving work. Outside an app that has a
    ``QueuePoller`` (an LLM deployment used on its own) it stays idle.
    """

    def __init__(
        self,
        get_load: Callable[[], Awaitable[dict[str, Any]]],
        interval_s: float,
        *,
        deployment_name: str = POLLER_DEPLOYMENT,
    ) -> None:
        self._get_load = get_load
        self._interval_s = interval_s
        self._deployment_name = deployment_name
        self._task: asyncio.Task[None] | None = None
        self.reports_sent = 0
        self.last_error: str | None = None
        self.backlog = 0.0
        """The backlog of this replica's model, as the poller last answered."""

    def start(self) -> None:
        """Start reporting from the running event loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="llm-load-reporter"
            )

    async def stop(self) -> None:
        """Stop reporting."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        handle = None
        while True:
            try:
                if handle is None:
                    app_name = serve.get_replica_context().app_name
                    handle = serve.get_deployment_handle(
                        self._deployment_name, app_name, _record_telemetry=False
                    )
                load = await self._get_load()
                answer = await handle.report_load.remote(dict(load))
                if isinstance(answer, dict):
                    self.backlog = float(answer.get("backlog", 0) or 0)
                self.reports_sent += 1
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the poller may not be up yet; keep trying
                if self.last_error is None:
                    logger.info("load report not delivered yet: %s", err)
                self.last_error = repr(err)
                handle = None if "not found" in str(err).lower() else handle
            await asyncio.sleep(self._interval_s)


async def hand_over_answers(
    outbox: Outbox,
    app_name: str,
    *,
    settle_s: float,
    timeout_s: float = 10.0,
    deployment_name: str = POLLER_DEPLOYMENT,
) -> int:
    """At a stop: deliver what ``outbox`` can within ``settle_s``, then hand what is left to a
    live ``QueuePoller`` replica of ``app_name`` (``adopt_answers``: its outbox keeps retrying
    each until its task's deadline), so a downscale or redeploy during a Bella-Queue outage
    loses no answer. A poller that refuses (it stops too) or cannot be reached is asked again
    (Serve routes the next call to a live replica, the new one of a redeploy) until
    ``timeout_s``; what no poller takes then (the whole app stops, say) is given up, logged at
    ERROR per task id. Returns how many were given up."""
    if await outbox.settle(settle_s) == 0:
        return await outbox.drain(0)
    answers = outbox.hand_over()
    deadline = time.monotonic() + timeout_s
    handle = serve.get_deployment_handle(deployment_name, app_name, _record_telemetry=False)
    while True:
        try:
            left_s = max(deadline - time.monotonic(), 0.1)
            taken = await asyncio.wait_for(handle.adopt_answers.remote(answers), left_s)
            break
        except Exception as err:
            if time.monotonic() >= deadline:
                outbox.lost(
                    answers, f"no live poller took it at the stop: {translate_ray_error(err)}"
                )
                return len(answers)
            await asyncio.sleep(0.5)
    logger.warning(
        "handed %d undelivered answers to a live poller (it retries them until their tasks expire)",
        taken,
    )
    return 0
