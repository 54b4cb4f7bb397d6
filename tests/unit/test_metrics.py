"""``WorkerMetrics``: local counters without Ray, and what it hands to ``ray.util.metrics``."""

from __future__ import annotations

from typing import Any

import pytest

from ray_worker.metrics import METRIC_NAMES, WorkerMetrics, status_class


class _Recorder:
    """Stands in for ``ray.util.metrics`` classes; records every call."""

    calls: list[tuple[str, str, float, dict[str, str] | None]]

    def __init__(self, name: str, description: str = "", **kwargs: Any) -> None:
        self.name = name
        self.tag_keys = tuple(kwargs.get("tag_keys") or ())
        self.boundaries = kwargs.get("boundaries")

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", self.name, value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", self.name, value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", self.name, value, tags))


@pytest.fixture
def ray_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, float, Any]]:
    from ray.util import metrics as rm

    calls: list[tuple[str, str, float, Any]] = []
    for kind in ("Counter", "Gauge", "Histogram"):
        cls = type(kind, (_Recorder,), {"calls": calls})
        monkeypatch.setattr(rm, kind, cls)
    return calls


def test_without_ray_counters_are_kept_locally() -> None:
    metrics = WorkerMetrics(use_ray=False)
    metrics.inc("tasks_taken", queue="a:0")
    metrics.inc("tasks_taken", 2, queue="a:0")
    metrics.inc("tasks_taken", queue="b:1")
    assert metrics.counters[("tasks_taken", (("queue", "a:0"),))] == 3
    assert metrics.total("tasks_taken") == 4
    assert metrics.total("tasks_taken", queue="b:1") == 1
    assert metrics.total("tasks_taken", queue="c:0") == 0
    assert metrics.total("duplicates") == 0


def test_total_matches_every_tag_set_that_includes_the_filter() -> None:
    metrics = WorkerMetrics(use_ray=False)
    metrics.inc("tasks_completed", queue="q", mode="streaming", status=status_class(200))
    metrics.inc("tasks_completed", queue="q", mode="callback", status=status_class(404))
    metrics.inc("tasks_completed", queue="r", mode="callback", status=status_class(503))
    assert metrics.total("tasks_completed", status="2xx") == 1
    assert metrics.total("tasks_completed", mode="callback") == 2
    assert metrics.total("tasks_completed", queue="q", status="4xx") == 1
    assert metrics.total("tasks_completed", queue="r", status="4xx") == 0


def test_without_ray_gauges_keep_the_last_value() -> None:
    metrics = WorkerMetrics(use_ray=False)
    metrics.set("replicas", 1, model="m")
    metrics.set("replicas", 3, model="m")
    metrics.set("replicas", 2, model="n")
    assert metrics.gauges[("replicas", (("model", "m"),))] == 3
    assert metrics.gauges[("replicas", (("model", "n"),))] == 2


def test_without_ray_histograms_keep_count_and_sum() -> None:
    metrics = WorkerMetrics(use_ray=False)
    for value in (0.1, 0.2, 0.7):
        metrics.observe("take_latency_s", value, model="m")
    assert metrics.total("take_latency_s:count", model="m") == 3
    assert metrics.total("take_latency_s:sum", model="m") == pytest.approx(1.0)


def test_without_ray_no_ray_metric_is_made(ray_calls: list[Any]) -> None:
    metrics = WorkerMetrics(use_ray=False)
    metrics.inc("duplicates")
    metrics.observe("put_to_start_s", 0.5, queue="q")
    assert ray_calls == []


def test_outside_a_ray_process_the_default_is_local_only() -> None:
    assert WorkerMetrics().total("duplicates") == 0  # ray.is_initialized() is False here


def test_with_ray_every_metric_is_made_with_its_exported_name(
    ray_calls: list[Any],
) -> None:
    made = WorkerMetrics(use_ray=True)._ray
    assert {key: m.name for key, m in made.items()} == METRIC_NAMES
    histograms = {k for k, m in made.items() if type(m).__name__ == "Histogram"}
    assert histograms == {
        "take_latency_s",
        "put_to_start_s",
        "time_to_first_event_s",
        "publish_latency_s",
    }
    for key in histograms:
        assert made[key].boundaries == sorted(made[key].boundaries)
    for key, metric in made.items():
        if type(metric).__name__ == "Counter":
            assert metric.name.endswith("_total"), key


def test_with_ray_values_reach_ray_and_the_local_view(ray_calls: list[Any]) -> None:
    metrics = WorkerMetrics(use_ray=True)
    metrics.inc("tasks_taken", queue="q:0")
    metrics.inc("complete_retries", 2)
    metrics.set("remaining_capacity", 5, model="m")
    metrics.observe("time_to_first_event_s", 0.25, queue="q")
    assert ray_calls == [
        ("inc", "bella_worker_tasks_taken_total", 1.0, {"queue": "q:0"}),
        ("inc", "bella_worker_complete_retries_total", 2, None),
        ("set", "bella_worker_remaining_capacity", 5, {"model": "m"}),
        ("observe", "bella_worker_time_to_first_event_seconds", 0.25, {"queue": "q"}),
    ]
    assert metrics.total("tasks_taken") == 1
    assert metrics.total("complete_retries") == 2
    assert metrics.total("time_to_first_event_s:count") == 1


def test_status_class() -> None:
    assert [status_class(s) for s in (200, 201, 400, 404, 408, 500, 503)] == [
        "2xx",
        "2xx",
        "4xx",
        "4xx",
        "4xx",
        "5xx",
        "5xx",
    ]
