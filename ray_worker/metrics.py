"""Worker metrics, exported through ``ray.util.metrics`` next to Serve's and vLLM's.

This module owns the metric names, their tags and their buckets. Inside a Ray process the
metrics reach Ray's Prometheus endpoint (prefixed ``ray_`` there); outside Ray (unit tests,
tools) they are kept only as local counters, which the status endpoint also reads. It must
not import anything of the worker but the standard library and Ray.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["METRIC_NAMES", "WorkerMetrics"]

_LATENCY_BOUNDARIES_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

METRIC_NAMES = {
    "tasks_taken": "bella_worker_tasks_taken_total",
    "tasks_completed": "bella_worker_tasks_completed_total",
    "tasks_in_flight": "bella_worker_tasks_in_flight",
    "remaining_capacity": "bella_worker_remaining_capacity",
    "replicas": "bella_worker_replicas",
    "take_latency_s": "bella_worker_take_latency_seconds",
    "take_failures": "bella_worker_take_failures_total",
    "put_to_start_s": "bella_worker_put_to_start_seconds",
    "time_to_first_event_s": "bella_worker_time_to_first_event_seconds",
    "publish_latency_s": "bella_worker_publish_latency_seconds",
    "publish_failures": "bella_worker_publish_failures_total",
    "complete_retries": "bella_worker_complete_retries_total",
    "complete_failures": "bella_worker_complete_failures_total",
    "duplicates": "bella_worker_duplicate_tasks_total",
    "left_for_redelivery": "bella_worker_left_for_redelivery_total",
    "replica_failures": "bella_worker_replica_failures_total",
    "tasks_given_up": "bella_worker_tasks_given_up_total",
    "prompt_tokens": "bella_worker_prompt_tokens_total",
    "completion_tokens": "bella_worker_completion_tokens_total",
    "outbox_entries": "bella_worker_outbox_entries",
    "outbox_bytes": "bella_worker_outbox_bytes",
    "outbox_backpressure": "bella_worker_outbox_backpressure_total",
    "complete_given_up": "bella_worker_complete_given_up_total",
    "tasks_cancelled": "bella_worker_tasks_cancelled_total",
    "cancel_checks": "bella_worker_cancel_checks_total",
    "preemptions": "bella_worker_preemptions_total",
}


def status_class(status_code: int) -> str:
    """``2xx``, ``4xx`` or ``5xx``."""
    return f"{status_code // 100}xx"


class WorkerMetrics:
    """Counters, gauges and histograms of the worker; safe to use with or without Ray."""

    def __init__(self, *, use_ray: bool | None = None) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._ray: dict[str, Any] = {}
        if use_ray is None:
            use_ray = _ray_connected()
        if use_ray:
            self._make_ray_metrics()

    def _make_ray_metrics(self) -> None:
        try:
            from ray.util import metrics as rm
        except ImportError:  # pragma: no cover - ray is a base dependency
            return
        n = METRIC_NAMES
        self._ray = {
            "tasks_taken": rm.Counter(
                n["tasks_taken"], "Tasks taken from Bella-Queue.", tag_keys=("queue",)
            ),
            "tasks_completed": rm.Counter(
                n["tasks_completed"],
                "Tasks answered, by response mode and status class.",
                tag_keys=("queue", "mode", "status"),
            ),
            "tasks_in_flight": rm.Gauge(
                n["tasks_in_flight"], "Tasks taken and not answered yet.", tag_keys=("model",)
            ),
            "remaining_capacity": rm.Gauge(
                n["remaining_capacity"], "Tasks the worker may still take.", tag_keys=("model",)
            ),
            "replicas": rm.Gauge(
                n["replicas"], "LLM replicas reporting load.", tag_keys=("model",)
            ),
            "take_latency_s": rm.Histogram(
                n["take_latency_s"],
                "Latency of POST /v1/queue/take.",
                boundaries=_LATENCY_BOUNDARIES_S,
                tag_keys=("model",),
            ),
            "take_failures": rm.Counter(n["take_failures"], "Failed takes.", tag_keys=("model",)),
            "put_to_start_s": rm.Histogram(
                n["put_to_start_s"],
                "From the task's put (start_time) to the engine call.",
                boundaries=_LATENCY_BOUNDARIES_S,
                tag_keys=("queue",),
            ),
            "time_to_first_event_s": rm.Histogram(
                n["time_to_first_event_s"],
                "From taking a task to its first event or answer.",
                boundaries=_LATENCY_BOUNDARIES_S,
                tag_keys=("queue",),
            ),
            "publish_latency_s": rm.Histogram(
                n["publish_latency_s"],
                "Event-bus publisher: oldest event of each written batch, enqueue to ack.",
                boundaries=_LATENCY_BOUNDARIES_S,
                tag_keys=(),
            ),
            "publish_failures": rm.Counter(
                n["publish_failures"], "Events that could not be published.", tag_keys=("kind",)
            ),
            "complete_retries": rm.Counter(
                n["complete_retries"], "Retried HTTP completes.", tag_keys=()
            ),
            "complete_failures": rm.Counter(
                n["complete_failures"], "HTTP completes given up after retries.", tag_keys=()
            ),
            "duplicates": rm.Counter(
                n["duplicates"], "Redelivered tasks recognised as duplicates.", tag_keys=()
            ),
            "left_for_redelivery": rm.Counter(
                n["left_for_redelivery"],
                "Level-1 tasks a stop cut short, left unanswered for the server's redelivery.",
                tag_keys=(),
            ),
            "replica_failures": rm.Counter(
                n["replica_failures"],
                "Tasks whose replica died mid-way (answered 503 by the poller).",
                tag_keys=(),
            ),
            "tasks_given_up": rm.Counter(
                n["tasks_given_up"],
                "Online tasks whose events the publisher gave up whole after a Redis outage.",
                tag_keys=(),
            ),
            "prompt_tokens": rm.Counter(
                n["prompt_tokens"],
                "Prompt tokens of answered tasks (the engine's usage).",
                tag_keys=("queue", "model"),
            ),
            "completion_tokens": rm.Counter(
                n["completion_tokens"],
                "Completion tokens of answered tasks (the engine's usage).",
                tag_keys=("queue", "model"),
            ),
            "outbox_entries": rm.Gauge(
                n["outbox_entries"], "Answers waiting in a replica's outbox.", tag_keys=()
            ),
            "outbox_bytes": rm.Gauge(
                n["outbox_bytes"], "JSON bytes of the answers in a replica's outbox.", tag_keys=()
            ),
            "outbox_backpressure": rm.Counter(
                n["outbox_backpressure"],
                "Answers that waited for room in a full outbox (their task stayed held).",
                tag_keys=(),
            ),
            "complete_given_up": rm.Counter(
                n["complete_given_up"],
                "Answers the outbox gave up: expired, rejected (Bella-Queue's own 4xx), "
                "undelivered_at_stop.",
                tag_keys=("reason",),
            ),
            "tasks_cancelled": rm.Counter(
                n["tasks_cancelled"],
                "Running offline tasks aborted unanswered (Bella-Queue cancelled them or their "
                "batch).",
                tag_keys=("queue", "mode"),
            ),
            "cancel_checks": rm.Counter(
                n["cancel_checks"],
                "Cancellation status requests of long offline tasks, by kind and result "
                "(ok, cancelled, error).",
                tag_keys=("kind", "result"),
            ),
            "preemptions": rm.Counter(
                n["preemptions"],
                "Offline runs aborted to free an engine seat for an online task (each re-runs).",
                tag_keys=("queue",),
            ),
        }

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add to a counter."""
        key = (name, tuple(sorted(tags.items())))
        with self._lock:
            self.counters[key] += value
        metric = self._ray.get(name)
        if metric is not None:
            metric.inc(value, tags=tags or None)

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set a gauge."""
        key = (name, tuple(sorted(tags.items())))
        with self._lock:
            self.gauges[key] = value
        metric = self._ray.get(name)
        if metric is not None:
            metric.set(value, tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Record a histogram observation (locally: count and sum)."""
        self.inc(name + ":count", 1.0, **tags)
        self.inc(name + ":sum", value, **tags)
        metric = self._ray.get(name)
        if metric is not None:
            metric.observe(value, tags=tags or None)

    def mean(self, name: str, **tags: str) -> float | None:
        """Mean of a histogram's observations so far (None before the first)."""
        count = self.total(name + ":count", **tags)
        return round(self.total(name + ":sum", **tags) / count, 6) if count else None

    def total(self, name: str, **tags: str) -> float:
        """Sum of a counter over every tag set that includes ``tags``."""
        wanted = set(tags.items())
        with self._lock:
            return sum(v for (n, t), v in self.counters.items() if n == name and wanted <= set(t))


def _ray_connected() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return False
    return bool(ray.is_initialized())
