"""The poller's view of the LLM deployments: Serve handles by model, Ray errors translated.

This module owns calling ``BellaLLMServer.run`` (one whole task; its messages:
``ray_worker.hop``) through Serve deployment handles as a stream, with Ray's exceptions
translated into ``ray_worker.errors`` (``ray_worker.serve.ray_errors``) so the dispatcher never
sees Ray. It runs in the poller only; it must not hold business logic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray.serve.handle import DeploymentHandle

from ray_worker.bella.protocol import Task
from ray_worker.serve.ray_errors import translate_ray_error

__all__ = ["ServeReplicas"]


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
