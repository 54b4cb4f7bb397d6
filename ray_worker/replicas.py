"""The dispatcher's view of the LLM deployments: Serve handles by model, Ray errors translated.

This module owns calling ``LLMServer.run_task`` through Serve deployment handles as a stream,
cancelling a call (Serve cancels the request on the replica running it, which aborts it in
the engine), and translating Ray's exceptions into ``ray_worker.errors`` so the dispatcher
never sees Ray. It must not hold business logic.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions
from ray.serve.handle import DeploymentHandle

from ray_worker.errors import (
    EngineError,
    EngineOverloadedError,
    ReplicaUnavailableError,
    WorkerError,
)

logger = logging.getLogger(__name__)

__all__ = ["ServeEngines", "translate_ray_error"]

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


class ServeEngines:
    """``Engines`` over Serve handles of ``BellaLLMServer`` deployments."""

    def __init__(self, handles: Mapping[str, DeploymentHandle]) -> None:
        self._handles = {m: h.options(stream=True) for m, h in handles.items()}
        self._load_handles = dict(handles)
        # DeploymentResponseGenerator per request id; typed Any as Ray's own stubs are partial.
        self._calls: dict[str, Any] = {}

    @property
    def model_ids(self) -> list[str]:
        """Served models."""
        return list(self._handles)

    async def stream(
        self, model_id: str, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Run ``run_task`` on a replica of ``model_id``; yields what it yields."""
        handle = self._handles[model_id]
        call: Any = handle.run_task.remote(
            endpoint, data, request_id=request_id, priority=priority
        )
        self._calls[request_id] = call
        finished = False
        try:
            async for item in call:
                yield item
            finished = True
        except Exception as err:
            finished = True
            raise translate_ray_error(err) from None
        finally:
            self._calls.pop(request_id, None)
            if not finished:
                # Cancelled or closed early (deadline, shutdown): Serve cancels the request on
                # its replica, whose generator aborts the request in the engine.
                call.cancel()

    async def abort(self, model_id: str, request_id: str) -> None:
        """Cancel a running call; its replica aborts it in the engine."""
        call = self._calls.pop(request_id, None)
        if call is not None:
            call.cancel()
