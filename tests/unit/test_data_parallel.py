"""Data-parallel deployments: the replica and seat arithmetic, and the builder's DP server.

The arithmetic (``ray_worker.serve.data_parallel``) is plain; the builder tests build the Serve
deployment with Ray's real ``DPServer.get_deployment_options`` (its only Ray call, the driver's
runtime env, is stubbed: the unit tier starts no Ray) and hold Ray's answer against it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

# Imported here, at collection: the first import of ray.serve.llm (vLLM) takes seconds.
from ray.llm._internal.serve.core.server.llm_server import LLMServer as RayLLMServer
from ray.serve.config import GangPlacementStrategy, GangRuntimeFailurePolicy
from ray.serve.llm import LLMConfig
from ray.serve.llm.deployment import DPServer

from ray_worker.bella.protocol import Level
from ray_worker.config import CapacityConfig
from ray_worker.errors import ConfigError
from ray_worker.hop import ReplicaLoad, counted_replicas
from ray_worker.serve.data_parallel import (
    DataParallelLayout,
    ReplicaBounds,
    is_data_parallel,
    layout_of,
    serve_replica_bounds,
)
from ray_worker.worker.capacity import CapacityTracker

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _llm(name: str) -> dict[str, Any]:
    [llm] = yaml.safe_load((CONFIGS / name).read_text())["applications"][0]["args"]["llm_configs"]
    assert isinstance(llm, dict)
    return llm


# ------------------------------------------------------------------------------- layout


def test_deepseek_r1_is_eight_ranks_of_one_gpu_per_group() -> None:
    layout = layout_of(_llm("deepseek-r1.yaml"))
    assert layout == DataParallelLayout(
        data_parallel_size=8, tensor_parallel_size=1, pipeline_parallel_size=1, max_num_seqs=64
    )
    assert layout.is_data_parallel
    assert layout.ranks_per_group == 8
    assert (layout.gpus_per_rank, layout.gpus_per_group) == (1, 8)
    assert (layout.seats_per_rank, layout.seats_per_group) == (64, 512)
    # A running engine's seats (e.g. max_num_seqs raised by online seats) replace the config's.
    assert layout_of(_llm("deepseek-r1.yaml"), max_num_seqs=71).seats_per_group == 568


def test_a_config_without_data_parallelism_is_one_rank_per_group() -> None:
    llm = _llm("deepseek.yaml")
    assert not is_data_parallel(llm)
    layout = layout_of(llm)
    assert (layout.ranks_per_group, layout.gpus_per_rank, layout.gpus_per_group) == (1, 2, 2)
    assert layout.seats_per_group == layout.seats_per_rank == 128
    assert layout.serve_replicas(3) == 3
    assert layout.groups(3) == 3


def test_an_llm_config_object_reads_as_its_mapping() -> None:
    llm = _llm("deepseek-r1.yaml")
    assert layout_of(LLMConfig.model_validate(llm)) == layout_of(llm)
    assert is_data_parallel(LLMConfig.model_validate(llm))


def test_targets_are_per_rank_and_groups_round_up() -> None:
    layout = DataParallelLayout(data_parallel_size=8, max_num_seqs=64)
    # Serve's target_ongoing_requests is per replica, i.e. per rank.
    assert layout.target_per_rank(1.25) == 80
    assert layout.target_per_group(1.25) == 640
    assert layout.serve_replicas(2) == 16
    assert [layout.groups(r) for r in (0, 1, 8, 9, 16)] == [0, 1, 1, 2, 2]
    # The backlog policy's ranks, rounded up to whole groups as Serve's gang policy does.
    assert layout.desired_groups(0, 0, 1.25) == 0
    assert layout.desired_groups(0, 1, 1.25) == 1
    assert layout.desired_groups(600, 40, 1.25) == 1  # 640 tasks: 8 ranks of 80
    assert layout.desired_groups(600, 41, 1.25) == 2  # one more task: a 9th rank, a 2nd group
    with pytest.raises(ValueError, match="negative"):
        layout.serve_replicas(-1)


@pytest.mark.parametrize(
    ("engine_kwargs", "match"),
    [
        ({"data_parallel_size": 0}, "positive integer"),
        ({"data_parallel_size": "8"}, "positive integer"),
        ({"data_parallel_size": True}, "positive integer"),
        ({"data_parallel_size": 8, "data_parallel_rank": 0}, "data_parallel_rank"),
        ({"data_parallel_size": 8, "data_parallel_size_local": 8}, "data_parallel_size_local"),
    ],
)
def test_what_dp_server_would_get_wrong_is_a_config_error(
    engine_kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        layout_of({"engine_kwargs": engine_kwargs})


# ---------------------------------------------------------------------- Serve replicas


@pytest.mark.parametrize(
    ("deployment_config", "dp", "expected"),
    [
        (
            {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
            8,
            ReplicaBounds(min_replicas=8, max_replicas=16),
        ),
        (
            {"autoscaling_config": {"min_replicas": 0, "initial_replicas": 1}},
            8,
            ReplicaBounds(min_replicas=0, max_replicas=800, initial_replicas=8),
        ),
        ({"num_replicas": "auto"}, 4, ReplicaBounds(min_replicas=4, max_replicas=400)),
        ({"num_replicas": 2}, 8, ReplicaBounds(num_replicas=16)),
        ({}, 8, ReplicaBounds(num_replicas=8)),
        (
            {"autoscaling_config": {"min_replicas": 1, "max_replicas": 8}},
            1,
            ReplicaBounds(min_replicas=1, max_replicas=8),
        ),
    ],
)
def test_serve_replicas_are_groups_times_data_parallel_size(
    deployment_config: dict[str, Any], dp: int, expected: ReplicaBounds
) -> None:
    assert serve_replica_bounds(deployment_config, dp) == expected


# ---------------------------------------------------------------------------- capacity


def _rank(replica_id: str, **kw: Any) -> ReplicaLoad:
    return ReplicaLoad(replica_id=replica_id, model_id="m", max_num_seqs=8, **kw)


def _gang(gang_id: str, ranks: Iterable[int], size: int = 4, **kw: Any) -> list[ReplicaLoad]:
    return [_rank(f"{gang_id}-{r}", gang_id=gang_id, dp_rank=r, dp_size=size, **kw) for r in ranks]


def test_a_whole_group_counts() -> None:
    reports = [*_gang("g1", range(4)), _rank("plain")]
    assert counted_replicas(reports) == {"g1-0", "g1-1", "g1-2", "g1-3", "plain"}


def test_a_group_missing_a_rank_counts_nothing() -> None:
    # Rank 2 has not reported (starting) or went stale (dead): the others cannot step alone.
    reports = [*_gang("g1", range(4)), *_gang("g2", (0, 1, 3))]
    assert counted_replicas(reports) == {"g1-0", "g1-1", "g1-2", "g1-3"}


def test_a_group_with_a_draining_rank_counts_nothing() -> None:
    # One rank's engine died: Serve restarts the whole gang, so its healthy ranks take nothing.
    reports = [
        *_gang("g1", range(3)),
        _rank("g1-3", draining=True, gang_id="g1", dp_rank=3, dp_size=4),
        _rank("plain-draining", draining=True),
    ]
    assert counted_replicas(reports) == {"plain-draining"}


def test_the_capacity_of_a_group_is_its_ranks_seats_once_all_report() -> None:
    cap = CapacityTracker(CapacityConfig(target_ratio=1.25), ["m"])
    for load in _gang("g1", range(3)):
        cap.report(load.as_report())
    assert cap.replicas("m") == 0  # rank 3 has not joined: nothing runs yet
    assert cap.remaining("m", Level.OFFLINE) == 0
    cap.report(_gang("g1", [3])[0].as_report())
    assert cap.replicas("m") == 4
    assert cap.max_num_seqs("m") == 4 * 8  # data_parallel_size x max_num_seqs
    assert cap.remaining("m", Level.OFFLINE) == 4 * 10  # per rank ceil(8 x 1.25)


# ----------------------------------------------------------------- the builder's DP server


@pytest.fixture
def no_ray_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray LLM's ``get_deployment_options`` reads the driver's runtime env (else it starts
    Ray): an empty one, as a fresh driver has."""
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env={}))


def _build(llm: dict[str, Any]) -> Any:
    from ray_worker.serve.llm_server import build_llm_deployment

    return build_llm_deployment(llm)._bound_deployment


@pytest.mark.usefixtures("no_ray_driver")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # DPServer's AutoscalingConfig.dict()
def test_a_data_parallel_config_builds_gangs_of_bella_dp_servers() -> None:
    from ray_worker.serve.dp_server import dp_server_class
    from ray_worker.serve.llm_server import server_class

    llm = _llm("deepseek-r1.yaml")
    deployment = _build(llm)
    cls = deployment.func_or_class
    assert cls is dp_server_class()
    assert cls.__name__ == "BellaDPServer"
    assert issubclass(cls, server_class())
    assert issubclass(cls, DPServer)

    gang = deployment._deployment_config.gang_scheduling_config
    assert gang is not None
    assert gang.gang_size == 8
    assert gang.gang_placement_strategy == GangPlacementStrategy.PACK
    assert gang.runtime_failure_policy == GangRuntimeFailurePolicy.RESTART_GANG

    autoscaling = deployment._deployment_config.autoscaling_config
    expected = serve_replica_bounds(llm["deployment_config"], 8)
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (
        expected.min_replicas,
        expected.max_replicas,
    )
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (8, 16)
    # Per rank: Serve's replica is one rank with one engine of max_num_seqs.
    assert autoscaling.target_ongoing_requests == 64
    bundles = deployment._replica_config.placement_group_bundles
    assert sum(b.get("GPU", 0) for b in bundles) == layout_of(llm).gpus_per_rank


@pytest.mark.usefixtures("no_ray_driver")
def test_a_config_without_data_parallelism_builds_as_before() -> None:
    from ray_worker.serve.llm_server import server_class

    deployment = _build(_llm("deepseek.yaml"))
    assert deployment.func_or_class is server_class()
    assert deployment._deployment_config.gang_scheduling_config is None
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 8)


def test_the_dp_server_reaches_dp_servers_constructor_first() -> None:
    """The mixin's ``super()`` calls (constructor, deployment options) reach ``DPServer``'s,
    whose constructor takes what the mixin passes on (Ray's ``LLMServer`` parameters)."""
    from ray_worker.serve.dp_server import dp_server_class
    from ray_worker.serve.llm_server import _TaskServingMixin

    mro = dp_server_class().__mro__
    assert mro.index(_TaskServingMixin) < mro.index(DPServer) < mro.index(RayLLMServer)
    for name in ("__init__", "get_deployment_options"):
        assert name in vars(DPServer.__mro__[1]), name  # Ray's internal DPServer defines it
    assert inspect.signature(DPServer.__init__) == inspect.signature(RayLLMServer.__init__)
