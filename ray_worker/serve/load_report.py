"""The LLM replica's load reports: ``get_load()`` pushed to the poller when it changes.

This module owns the replica's side of ``report_load`` (``ray_worker.hop``): the loop that
finds the app's ``QueuePoller`` and pushes each report, and the backlog its answers carry
(what the replica hands Serve's autoscaler). It runs in the LLM replicas only; it must not
hold business logic.

The load is read every ``interval_s`` and sent when it differs from the last report the poller
took (its ``ts`` aside), or when ``heartbeat_s`` has passed since that report: a busy replica
reports as often as before, an idle one every ``heartbeat_s``, which keeps it fresh for the
poller (``capacity.load_stale_after_s``). A report that fails is sent again at the next read
(only a report the poller took resets the heartbeat).
Each report costs a Serve call on both sides (the poller idled at 4.4% of a core with 2 reports
per second, 2.7% with one every 2 s: ``bench/bench_peer.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ray import serve

from ray_worker.hop import POLLER_DEPLOYMENT

logger = logging.getLogger(__name__)

__all__ = ["LoadReporter"]


class LoadReporter:
    """Runs inside each LLM replica: pushes ``get_load()`` to the poller when it changes, and
    at least every ``heartbeat_s`` (see the module docstring).

    The poller counts a replica as running while its reports are fresh, so a replica that
    stops reporting (dead, draining) stops receiving work. Outside an app that has a
    ``QueuePoller`` (an LLM deployment used on its own) it stays idle.
    """

    def __init__(
        self,
        get_load: Callable[[], Awaitable[dict[str, Any]]],
        interval_s: float,
        *,
        heartbeat_s: float | None = None,
        deployment_name: str = POLLER_DEPLOYMENT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._get_load = get_load
        self._interval_s = interval_s
        self._heartbeat_s = max(interval_s, heartbeat_s or interval_s)
        self._deployment_name = deployment_name
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._sent: dict[str, Any] | None = None
        """The last report the poller took, without its ``ts``."""
        self._sent_at = 0.0
        self.reports_sent = 0
        self.reports_skipped = 0
        """Reads that found the load unchanged within ``heartbeat_s``: nothing sent."""
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

    def _find_poller(self) -> Any:
        """The handle of this app's ``QueuePoller`` deployment."""
        app_name = serve.get_replica_context().app_name
        return serve.get_deployment_handle(self._deployment_name, app_name, _record_telemetry=False)

    def _due(self, load: Mapping[str, Any]) -> dict[str, Any] | None:
        """``load`` without its ``ts`` when it is to be sent (changed, or the heartbeat is
        due), else None."""
        key = {k: v for k, v in load.items() if k != "ts"}
        if key != self._sent or self._clock() - self._sent_at >= self._heartbeat_s:
            return key
        return None

    async def _run(self) -> None:
        handle = None
        while True:
            try:
                if handle is None:
                    handle = self._find_poller()
                load = await self._get_load()
                key = self._due(load)
                if key is None:
                    self.reports_skipped += 1
                else:
                    answer = await handle.report_load.remote(dict(load))
                    self._sent, self._sent_at = key, self._clock()
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
