"""Autoscaling LLM deployments on the Bella-Queue backlog.

A pull-based worker and Serve's push-based autoscaler pull against each other: the poller
takes only what the running replicas can hold, so the replicas never look overloaded and the
default policy never scales up. This module owns the Serve autoscaling policy that closes
the loop: every LLM replica reports, as a custom autoscaling metric, the backlog the poller
sees for its model (tasks waiting in Bella-Queue that current replicas cannot absorb); the
policy sizes the deployment for what runs *and* what waits:

    desired = ceil((ongoing + backlog) / target_ongoing_requests)

and never fewer replicas than those holding undelivered answers (each replica reports how many
answers its outbox still holds, ``bella_undelivered``: during a Bella-Queue outage a finished
task's answer lives only in its replica's memory, so a downscale to fewer replicas than hold
answers would stop one of them; a stop still hands its answers to a live poller, see
``ray_worker.serve.task_host``, but only while one runs).

``ongoing`` is Serve's own count of requests at the replicas and queued at handles (so the
cold start from zero, driven by a probe task the poller dispatches while no replica runs,
works as usual). ``target_ongoing_requests`` defaults to the tasks the worker holds per
replica (``ceil(max_num_seqs * target_ratio)``). Serve applies min/max replicas, the
up/down-scale delays and scale-to-zero around this function. It must not do I/O: it runs in
the Serve controller's control loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BACKLOG_METRIC",
    "POLICY_PATH",
    "UNDELIVERED_METRIC",
    "backlog_policy",
    "desired_replicas",
]

BACKLOG_METRIC = "bella_backlog"
"""Custom autoscaling metric each LLM replica reports (``record_autoscaling_stats``)."""
UNDELIVERED_METRIC = "bella_undelivered"
"""Custom autoscaling metric: answers this replica's outbox holds, not yet delivered."""
POLICY_PATH = "ray_worker.serve.autoscaling:backlog_policy"


def desired_replicas(ongoing: float, backlog: float, target_per_replica: float) -> float:
    """Replicas needed for ``ongoing`` requests plus ``backlog`` waiting tasks."""
    if target_per_replica <= 0:
        raise ValueError("target_per_replica must be positive")
    return float(math.ceil(max(0.0, ongoing + backlog) / target_per_replica))


def _backlog(aggregated: Mapping[str, Mapping[Any, float]] | None) -> float:
    # Every replica of a model reports the same pool backlog, so the freshest view is the max.
    values = (aggregated or {}).get(BACKLOG_METRIC) or {}
    return max((float(v) for v in values.values()), default=0.0)


def _holding(aggregated: Mapping[str, Mapping[Any, float]] | None) -> int:
    # Per replica: how many replicas hold at least one undelivered answer.
    values = (aggregated or {}).get(UNDELIVERED_METRIC) or {}
    return sum(1 for v in values.values() if float(v) > 0)


def backlog_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve custom autoscaling policy: size for running plus backlogged tasks.

    ``ctx`` is Serve's ``AutoscalingContext``; the returned state keeps the last inputs so the
    decision can be read back from the controller's policy state when debugging.
    """
    target = float(ctx.config.get_target_ongoing_requests())
    try:
        aggregated = ctx.aggregated_metrics
    except Exception:  # custom metrics not reported (yet): fall back to ongoing requests only
        aggregated = None
    backlog = _backlog(aggregated)
    holding = _holding(aggregated)
    ongoing = float(ctx.total_num_requests)
    state = {"backlog": backlog, "ongoing": ongoing, "holding": holding}
    if ctx.current_num_replicas == 0:
        # No replica reports a backlog at zero: the poller's probe task shows as a queued
        # request at the handle, which Serve's cold-start path already turns into one replica.
        return float(ctx.target_num_replicas), state
    desired = max(desired_replicas(ongoing, backlog, target), float(holding))
    return desired, {**state, "desired": desired}
