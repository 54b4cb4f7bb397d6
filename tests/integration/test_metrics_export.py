"""``WorkerMetrics`` in a Ray actor reaches Ray's Prometheus endpoint under the dashboard's names.

The actor records one value of every metric with tags unique to this test (other tests of the
session export the same metric names from their workers); the test scrapes the node's metrics
export port until every series shows up (Ray exports periodically) and checks names, labels
and values: ``ray_`` prefix, counters ending in ``_total``, histograms as
``_bucket``/``_sum``/``_count``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ray_worker.metrics import METRIC_NAMES
from ray_worker.testing.waiting import wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _recorder_class() -> type:
    """Defined in a function so Ray pickles the class by value (workers cannot import tests)."""

    class _Recorder:
        """A Ray actor owning a ``WorkerMetrics``, as the poller replica does."""

        def __init__(self) -> None:
            from ray_worker.metrics import WorkerMetrics

            self.metrics = WorkerMetrics()  # detects that it runs inside Ray

        def exported(self) -> list[str]:
            return sorted(self.metrics._ray)

        def record(self, tag: str) -> None:
            m = self.metrics
            m.inc("tasks_taken", 3, queue=f"{tag}:0")
            m.inc("tasks_completed", 2, queue=tag, mode="streaming", status="2xx")
            m.set("tasks_in_flight", 4, model=tag)
            m.set("remaining_capacity", 7, model=tag)
            m.set("replicas", 2, model=tag)
            m.observe("take_latency_s", 0.003, model=tag)
            m.observe("take_latency_s", 0.004, model=tag)
            m.inc("take_failures", model=tag)
            m.observe("put_to_start_s", 0.2, queue=tag)
            m.observe("time_to_first_event_s", 0.02, queue=tag)
            m.inc("publish_failures", kind=tag)
            m.inc("complete_retries")
            m.inc("complete_failures")
            m.inc("duplicates")

    return _Recorder


@pytest.fixture(scope="module")
def recorder(ray_serve: Any) -> Iterator[Any]:
    import ray

    actor = ray.remote(num_cpus=0)(_recorder_class()).remote()
    try:
        yield actor
    finally:
        ray.kill(actor)


def _metrics_url() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


async def _scrape(client: httpx.AsyncClient, url: str) -> Samples:
    response = await client.get(url)
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    return found[0] if len(found) == 1 else None


async def test_worker_metrics_reach_rays_prometheus_endpoint(recorder: Any) -> None:
    assert set(await recorder.exported.remote()) == set(METRIC_NAMES)
    tag = f"t{uuid.uuid4().hex[:10]}"
    await recorder.record.remote(tag)
    expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
        ("ray_bella_worker_tasks_taken_total", (("queue", f"{tag}:0"),)): 3,
        (
            "ray_bella_worker_tasks_completed_total",
            (("queue", tag), ("mode", "streaming"), ("status", "2xx")),
        ): 2,
        ("ray_bella_worker_tasks_in_flight", (("model", tag),)): 4,
        ("ray_bella_worker_remaining_capacity", (("model", tag),)): 7,
        ("ray_bella_worker_replicas", (("model", tag),)): 2,
        ("ray_bella_worker_take_latency_seconds_count", (("model", tag),)): 2,
        ("ray_bella_worker_take_latency_seconds_bucket", (("model", tag), ("le", "0.005"))): 2,
        ("ray_bella_worker_take_latency_seconds_bucket", (("model", tag), ("le", "0.001"))): 0,
        ("ray_bella_worker_take_failures_total", (("model", tag),)): 1,
        ("ray_bella_worker_put_to_start_seconds_count", (("queue", tag),)): 1,
        ("ray_bella_worker_time_to_first_event_seconds_count", (("queue", tag),)): 1,
        ("ray_bella_worker_publish_failures_total", (("kind", tag),)): 1,
    }
    untagged = [
        "ray_bella_worker_complete_retries_total",
        "ray_bella_worker_complete_failures_total",
        "ray_bella_worker_duplicate_tasks_total",
    ]
    url = _metrics_url()

    async with httpx.AsyncClient(timeout=10) as client:

        async def exported() -> Samples | None:
            samples = await _scrape(client, url)
            missing = [
                name for (name, labels) in expected if _value(samples, name, **dict(labels)) is None
            ]
            missing += [n for n in untagged if not any(k[0] == n for k in samples)]
            return None if missing else samples

        samples = await wait_for(
            exported,
            timeout=60,
            interval=0.5,
            message="every worker metric on Ray's metrics endpoint",
            ignore=(httpx.HTTPError,),
        )

    for (name, labels), value in expected.items():
        assert _value(samples, name, **dict(labels)) == value, (name, labels)
    # Ray 2.60 ships histograms to its agent as bucket counts and rebuilds _sum from bucket
    # midpoints: the sum is only known to lie within the buckets' bounds (here 0.006, not 0.007).
    sum_s = _value(samples, "ray_bella_worker_take_latency_seconds_sum", model=tag)
    assert sum_s is not None
    assert 2 * 0.001 <= sum_s <= 2 * 0.005
    for name in untagged:
        assert sum(v for (n, _), v in samples.items() if n == name) >= 1
    # Ray adds where the series comes from; the dashboard aggregates these away with sum by.
    labels = next(ls for (n, ls) in samples if n == "ray_bella_worker_replicas")
    assert {"WorkerId", "NodeAddress", "SessionName"} <= {k for k, _ in labels}
