"""The poller's status: what ``GET /bella`` and ``ray-worker status`` show, assembled.

This module owns the status dict (per pool take state and capacity, answers, tokens, timings,
the event bus and the publisher) and the replicas' outbox figures it sums per model
(``ReplicaOutboxes``, fed by the load reports). It must not do I/O or import Ray: the
``QueuePoller`` deployment hands it the parts and serves the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray_worker.config import WorkerAppArgs
from ray_worker.hop import ReplicaLoad
from ray_worker.metrics import WorkerMetrics
from ray_worker.worker.dispatcher import Dispatcher
from ray_worker.worker.poller import Poller

__all__ = ["ReplicaOutboxes", "poller_status"]


class ReplicaOutboxes:
    """The outbox figures of the LLM replicas' last load reports, summed per model."""

    def __init__(
        self, stale_after_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._last: dict[str, tuple[str, float, dict[str, Any]]] = {}
        """replica id -> (model id, when, outbox figures of its last load report)."""

    def report(self, load: ReplicaLoad) -> None:
        """Keep ``load``'s outbox figures (a report without them changes nothing)."""
        if "outbox_entries" in load.outbox:
            self._last[load.replica_id] = (load.model_id, self._clock(), dict(load.outbox))

    def of(self, model_id: str) -> dict[str, Any]:
        """The outboxes of ``model_id``'s replicas reporting lately, summed (and per replica)."""
        horizon = self._clock() - self._stale_after_s
        for rid in [r for r, (_, at, _) in self._last.items() if at < horizon]:
            del self._last[rid]  # a replica gone (its last report is stale)
        replicas = {
            rid: figures
            for rid, (model, at, figures) in self._last.items()
            if model == model_id and at >= horizon
        }
        total: dict[str, Any] = {}
        for figures in replicas.values():
            for key, value in figures.items():
                if isinstance(value, int | float) and not key.startswith("outbox_max_"):
                    total[key] = total.get(key, 0) + value
        total.pop("outbox_oldest_age_s", None)
        ages = [f.get("outbox_oldest_age_s") for f in replicas.values()]
        total["outbox_oldest_age_s"] = max((a for a in ages if a is not None), default=None)
        return {**total, "replicas": replicas}


def poller_status(
    *,
    state: str,
    startup_error: str | None,
    args: WorkerAppArgs,
    poller: Poller,
    dispatcher: Dispatcher,
    outboxes: ReplicaOutboxes,
    clock_offset_ms: int,
    complete_retries: int,
    metrics: WorkerMetrics,
    events: dict[str, Any],
    publisher: dict[str, Any] | None,
) -> dict[str, Any]:
    """The worker's state: per pool take state, capacity and the replicas' outboxes; answers,
    tokens and timings; Bella-Queue's clock offset and the poller's complete retries (its
    queue client's); the poller's event-bus client (``events``) and this node's publisher
    actor (``publisher``, None while it is not reachable)."""
    polled = poller.status()
    for pool in polled.get("pools", []):
        pool["outbox"] = outboxes.of(str(pool.get("model", "")))
    return {
        "state": state,
        "startup_error": startup_error,
        "queues": [q.name for q in args.queues],
        "strategy": args.poller.strategy.value,
        **polled,
        # False: level-1 tasks are answered 503 rather than left for redelivery.
        "redelivers": dispatcher.redelivers,
        "answered": dict(dispatcher.answered),
        "cancelled": dispatcher.cancelled,
        "tokens": dict(dispatcher.tokens),
        # Bella-Queue's clock minus ours, from its Date headers (deadlines account for it).
        "clock_offset_ms": clock_offset_ms,
        "duplicates": int(metrics.total("duplicates")),
        "latency_mean_s": {
            "take_latency_s": metrics.mean("take_latency_s"),
            # From the replicas' outcomes: put to run start, run start to first event.
            **dispatcher.timing_means(),
        },
        "complete_retries": complete_retries,
        "events": events,
        "publisher": publisher,
    }
