"""The LLM replica's load reports: ``get_load()`` pushed to the poller every interval.

This module owns the replica's side of ``report_load`` (``ray_worker.hop``): the loop that
finds the app's ``QueuePoller`` and pushes each report, and the backlog its answers carry
(what the replica hands Serve's autoscaler). It runs in the LLM replicas only; it must not
hold business logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from ray_worker.hop import POLLER_DEPLOYMENT

logger = logging.getLogger(__name__)

__all__ = ["LoadReporter"]


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
