"""The backlog autoscaling policy and the poller's backlog estimate and zero-replica probe."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from ray_worker.serve.autoscaling import (
    BACKLOG_METRIC,
    POLICY_PATH,
    UNDELIVERED_METRIC,
    backlog_policy,
    desired_replicas,
)
from ray_worker.serve.llm_config import (
    VLLM_DEFAULT_MAX_NUM_SEQS,
    with_backlog_autoscaling,
    with_worker_defaults,
)
from tests.unit.fakes import Delay, until
from tests.unit.poll_rig import tasks_of


@dataclass
class _Config:
    target: float

    def get_target_ongoing_requests(self) -> float:
        return self.target


@dataclass
class _Ctx:
    current_num_replicas: int
    total_num_requests: float
    target: float = 10
    target_num_replicas: int = 1
    aggregated_metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def config(self) -> _Config:
        return _Config(self.target)


def test_desired_replicas_counts_running_and_waiting() -> None:
    assert desired_replicas(0, 0, 10) == 0
    assert desired_replicas(10, 0, 10) == 1
    assert desired_replicas(10, 1, 10) == 2
    assert desired_replicas(20, 35, 10) == 6
    with pytest.raises(ValueError, match="positive"):
        desired_replicas(1, 1, 0)


def test_policy_scales_up_on_backlog_reported_by_replicas() -> None:
    ctx = _Ctx(2, 20, aggregated_metrics={BACKLOG_METRIC: {"r1": 25.0, "r2": 24.0}})
    desired, state = backlog_policy(ctx)
    assert desired == 5  # (20 running + 25 waiting) / 10 per replica
    assert state["backlog"] == 25.0


def test_policy_without_backlog_follows_running_requests() -> None:
    assert backlog_policy(_Ctx(3, 20))[0] == 2
    assert backlog_policy(_Ctx(3, 0))[0] == 0


def test_policy_keeps_every_replica_that_holds_undelivered_answers() -> None:
    # Idle (nothing running, nothing waiting) but two of three replicas still hold answers
    # Bella-Queue did not take yet (an outage): only the third may go.
    held = {UNDELIVERED_METRIC: {"r1": 3.0, "r2": 0.0, "r3": 1.0}}
    desired, state = backlog_policy(_Ctx(3, 0, aggregated_metrics=held))
    assert desired == 2
    assert state["holding"] == 2
    # Load above that still decides.
    assert backlog_policy(_Ctx(3, 30, aggregated_metrics=held))[0] == 3
    # Delivered: back to the load alone.
    done = {UNDELIVERED_METRIC: {"r1": 0.0, "r3": 0.0}}
    assert backlog_policy(_Ctx(3, 0, aggregated_metrics=done))[0] == 0


def test_policy_at_zero_defers_to_serve_cold_start() -> None:
    desired, _ = backlog_policy(_Ctx(0, 0, target_num_replicas=0))
    assert desired == 0


def test_app_defaults_autoscaled_deployments_to_the_backlog_policy() -> None:
    from ray.serve.llm import LLMConfig

    cfg = LLMConfig.model_validate(
        {
            "model_loading_config": {"model_id": "m"},
            "engine_kwargs": {"max_num_seqs": 64},
            "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
        }
    )
    out = with_backlog_autoscaling(cfg, 1.25)
    autoscaling = out.deployment_config["autoscaling_config"]
    assert autoscaling["policy"] == {"policy_function": POLICY_PATH}
    assert autoscaling["target_ongoing_requests"] == 80
    assert cfg.deployment_config["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    chosen = cfg.model_copy(
        update={
            "deployment_config": {
                "autoscaling_config": {
                    "target_ongoing_requests": 5,
                    "policy": {"policy_function": "x:y"},
                }
            }
        }
    )
    kept = with_backlog_autoscaling(chosen, 1.25).deployment_config["autoscaling_config"]
    assert kept == {"target_ongoing_requests": 5, "policy": {"policy_function": "x:y"}}
    fixed = LLMConfig.model_validate(
        {"model_loading_config": {"model_id": "m"}, "deployment_config": {"num_replicas": 2}}
    )
    assert with_backlog_autoscaling(fixed, 1.25).deployment_config == {"num_replicas": 2}


def test_default_max_num_seqs_has_one_home() -> None:
    # With max_num_seqs unset, the autoscaling target and Serve's max_ongoing_requests derive
    # from the same vLLM default, so the target always fits under the max.
    from ray.serve.llm import LLMConfig

    cfg = LLMConfig.model_validate(
        {
            "model_loading_config": {"model_id": "m"},
            "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
        }
    )
    out = with_worker_defaults(with_backlog_autoscaling(cfg, 1.25))
    target = out.deployment_config["autoscaling_config"]["target_ongoing_requests"]
    assert target == math.ceil(VLLM_DEFAULT_MAX_NUM_SEQS * 1.25)
    assert out.deployment_config["max_ongoing_requests"] == 2 * VLLM_DEFAULT_MAX_NUM_SEQS + 8
    assert target <= out.deployment_config["max_ongoing_requests"]


class _StatsTaker:
    """Adds the queue stats endpoint to a FakeTaker."""

    def __init__(self, taker: Any, pending: dict[str, int] | None) -> None:
        self._taker = taker
        self.pending = pending
        self.stats_calls: list[str] = []

    async def take(self, request: Any) -> Any:
        return await self._taker.take(request)

    async def stats(self, queue: str) -> dict[str, Any]:
        self.stats_calls.append(queue)
        return {} if self.pending is None else {"pending": self.pending.get(queue, 0)}


async def test_backlog_from_queue_stats_while_at_capacity(make: Any) -> None:
    rig = make(["q:1"], max_num_seqs=4, stats_interval_s=0.001)
    rig.engines.default = [Delay(30)]  # tasks keep their slots
    taker = _StatsTaker(rig.taker, {"q:1": 37})
    rig.poller.taker = taker
    rig.taker.add(tasks_of(3))  # the offline share of 4 slots with a 25 % online reserve
    rig.poller.start()
    await until(lambda: rig.pool.backlog == 37)
    assert rig.poller.backlog("m") == 37
    assert taker.stats_calls[0] == "q:1"


async def test_backlog_falls_back_to_one_replica_without_pending(make: Any) -> None:
    rig = make(["q:1"], max_num_seqs=4, stats_interval_s=0.001)
    rig.engines.default = [Delay(30)]
    rig.poller.taker = _StatsTaker(rig.taker, None)
    rig.taker.add(tasks_of(3))
    rig.poller.start()
    await until(lambda: rig.pool.backlog == 4)  # one replica's target


async def test_backlog_survives_empty_takes_of_the_online_reserve(make: Any) -> None:
    # Offline at capacity, the reserve slot keeps the loop taking the online queue alone; its
    # empty answers say nothing of the offline queue, whose backlog must still be reported.
    rig = make(["q:0", "q:1"], max_num_seqs=4, stats_interval_s=0.001)
    rig.engines.default = [Delay(30)]
    taker = _StatsTaker(rig.taker, {"q:0": 0, "q:1": 37})
    rig.poller.taker = taker
    rig.taker.add(tasks_of(3))  # the offline share of 4 slots
    rig.poller.start()
    await until(lambda: rig.pool.empty_takes >= 3 and rig.pool.backlog == 37)
    assert rig.requests[0].queues == ["q:0", "q:1"]
    assert {tuple(r.queues) for r in rig.requests[1:]} == {("q:0",)}
    assert rig.pool.saturated
    assert rig.pool.state == "at offline capacity"


async def test_no_backlog_after_a_partial_take(make: Any) -> None:
    rig = make(["q:1"], max_num_seqs=4, stats_interval_s=0.001)
    rig.engines.default = [Delay(30)]
    rig.poller.taker = _StatsTaker(rig.taker, {"q:1": 99})
    rig.taker.add(tasks_of(2))  # asked for 3, got 2: the queue is drained
    rig.poller.start()
    await until(lambda: rig.pool.tasks_taken == 2 and rig.pool.state == "idle")
    assert rig.pool.backlog == 0


async def test_probe_takes_one_task_while_scaled_to_zero(make: Any) -> None:
    rig = make(["q:0", "q:1"], max_num_seqs=None)
    rig.pool.probe_at_zero = True
    rig.engines.default = [Delay(30)]
    rig.taker.add(tasks_of(1))
    rig.poller.start()
    await until(lambda: rig.pool.tasks_taken == 1)
    assert rig.requests[0].size == 1
    assert rig.requests[0].queues == ["q:0", "q:1"]
    await until(lambda: rig.pool.state == "waiting for replicas")
    assert len(rig.requests) == 1  # one probe in flight at most


async def test_no_probe_unless_the_deployment_may_scale_to_zero(make: Any) -> None:
    rig = make(["q:1"], max_num_seqs=None)
    rig.poller.start()
    await until(lambda: rig.pool.state == "waiting for replicas")
    assert rig.requests == []
