"""Ray's and Serve's exceptions as the ``ray_worker.errors`` they stand for.

A pure helper for whoever calls across a Ray hop (the poller's replica calls, a stop's answer
hand-over): callers above it never see a Ray exception. It must not call Ray.
"""

from __future__ import annotations

from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions

from ray_worker.errors import (
    EngineError,
    EngineOverloadedError,
    ReplicaUnavailableError,
    WorkerError,
)

__all__ = ["translate_ray_error"]

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
