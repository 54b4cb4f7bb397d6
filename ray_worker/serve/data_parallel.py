"""Data-parallel LLM deployments (DP attention + expert parallelism): their replica arithmetic.

This module owns what a ``data_parallel_size`` > 1 ``LLMConfig`` means for the worker's
counts, as Ray 2.60's ``build_dp_deployment`` (``DPServer``) deploys it:

- each DP rank is one Serve replica running its own vLLM engine (vLLM's external DP load
  balancing: ``DPServer`` sets ``data_parallel_rank``), on ``tensor x pipeline`` GPUs, with its
  own ``max_num_seqs`` sequences: a group of ``data_parallel_size`` ranks has
  ``data_parallel_size x max_num_seqs`` seats;
- the ranks of one group are a Serve gang of ``data_parallel_size`` replicas, placed together
  (``PACK``), started and restarted as one (``RESTART_GANG``): a group is the unit Serve adds
  and removes;
- in the ``LLMConfig``'s ``deployment_config``, ``num_replicas`` and ``autoscaling_config``'s
  ``min_replicas`` / ``max_replicas`` / ``initial_replicas`` count groups: ``DPServer``
  multiplies them by ``data_parallel_size`` into Serve replicas (neither set: one group);
- ``target_ongoing_requests`` and ``max_ongoing_requests`` stay per Serve replica, i.e. per
  rank: an autoscaling policy (``ray_worker.serve.autoscaling``) answers in ranks, and Serve's
  ``GangSchedulingAutoscalingPolicy`` rounds its answer up to whole groups.

Pure functions and frozen dataclasses over a parsed ``LLMConfig`` or its mapping: no I/O, no
Ray import (``ray_worker.dev.check_gpu_stack`` compares them with Ray's own classes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray_worker.errors import ConfigError
from ray_worker.serve.llm_config import VLLM_DEFAULT_MAX_NUM_SEQS

__all__ = [
    "SERVE_DEFAULT_MAX_REPLICAS",
    "SERVE_DEFAULT_MIN_REPLICAS",
    "DataParallelLayout",
    "ReplicaBounds",
    "data_parallel_size",
    "is_data_parallel",
    "layout_of",
    "serve_replica_bounds",
]

SERVE_DEFAULT_MIN_REPLICAS = 1
"""Serve's ``AutoscalingConfig`` default ``min_replicas`` (Ray 2.60), in groups for DP."""
SERVE_DEFAULT_MAX_REPLICAS = 100
"""Serve's ``AutoscalingConfig`` default ``max_replicas`` (Ray 2.60), in groups for DP."""


@dataclass(frozen=True, slots=True)
class DataParallelLayout:
    """One model's parallel layout: ranks per group, GPUs and seats per rank and per group."""

    data_parallel_size: int = 1
    """Ranks per group (Serve replicas per gang); 1: not data-parallel."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_num_seqs: int = VLLM_DEFAULT_MAX_NUM_SEQS
    """Seats of one rank: its engine's ``max_num_seqs``."""

    @property
    def is_data_parallel(self) -> bool:
        """Whether the deployment is built as DP groups (gangs of ranks)."""
        return self.data_parallel_size > 1

    @property
    def ranks_per_group(self) -> int:
        """Serve replicas of one group: the gang size (1 without DP)."""
        return self.data_parallel_size

    @property
    def gpus_per_rank(self) -> int:
        """GPUs of one rank's engine (its placement bundles): tensor x pipeline."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def gpus_per_group(self) -> int:
        """GPUs of one group, placed together: the unit the cluster must fit."""
        return self.data_parallel_size * self.gpus_per_rank

    @property
    def seats_per_rank(self) -> int:
        """Sequences one rank (one Serve replica) runs at once."""
        return self.max_num_seqs

    @property
    def seats_per_group(self) -> int:
        """Sequences one group runs at once: ``data_parallel_size x max_num_seqs``."""
        return self.data_parallel_size * self.max_num_seqs

    def target_per_rank(self, target_ratio: float) -> int:
        """Tasks the worker holds per rank: Serve's per-replica ``target_ongoing_requests``."""
        return max(1, math.ceil(self.max_num_seqs * target_ratio))

    def target_per_group(self, target_ratio: float) -> int:
        """Tasks the worker holds per group (every rank's target)."""
        return self.data_parallel_size * self.target_per_rank(target_ratio)

    def serve_replicas(self, groups: int) -> int:
        """Serve replicas (ranks) of ``groups`` groups."""
        if groups < 0:
            raise ValueError("groups must not be negative")
        return groups * self.data_parallel_size

    def groups(self, serve_replicas: float) -> int:
        """Groups Serve runs for ``serve_replicas`` replicas: a partial group is a whole one
        (Serve rounds a policy's answer up to whole gangs)."""
        return math.ceil(max(0.0, serve_replicas) / self.data_parallel_size)

    def desired_groups(self, ongoing: float, backlog: float, target_ratio: float) -> int:
        """Groups the backlog policy's answer becomes: ``ceil((ongoing + backlog) / target)``
        ranks, with the per-rank target, rounded up to whole groups."""
        ranks = math.ceil(max(0.0, ongoing + backlog) / self.target_per_rank(target_ratio))
        return self.groups(ranks)


def _section(llm_config: Any, name: str) -> Mapping[str, Any]:
    """``engine_kwargs`` / ``deployment_config`` of an ``LLMConfig`` or of its mapping."""
    value = llm_config.get(name) if isinstance(llm_config, Mapping) else getattr(llm_config, name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a mapping")
    return value


def _positive_int(engine_kwargs: Mapping[str, Any], key: str) -> int:
    value = engine_kwargs.get(key)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"engine_kwargs.{key} must be a positive integer, not {value!r}")
    return value


def data_parallel_size(llm_config: Any) -> int:
    """``engine_kwargs.data_parallel_size`` of an ``LLMConfig`` or its mapping (1 when unset)."""
    return _positive_int(_section(llm_config, "engine_kwargs"), "data_parallel_size")


def layout_of(llm_config: Any, *, max_num_seqs: int | None = None) -> DataParallelLayout:
    """The layout of an ``LLMConfig`` (or its mapping); ``max_num_seqs`` overrides the seats
    per rank (a running engine's reported value).

    ``ConfigError`` for what ``DPServer`` would get wrong later: a rank the operator fixed
    (``data_parallel_rank``: Serve gives each replica its own) or several ranks per engine
    (``data_parallel_size_local`` > 1: each replica is one rank).
    """
    engine_kwargs = _section(llm_config, "engine_kwargs")
    dp = data_parallel_size(llm_config)
    if dp > 1:
        if engine_kwargs.get("data_parallel_rank") is not None:
            raise ConfigError(
                "engine_kwargs.data_parallel_rank is set per replica by Serve's DP gang; remove it"
            )
        if engine_kwargs.get("data_parallel_size_local") not in (None, 1):
            raise ConfigError(
                "engine_kwargs.data_parallel_size_local must be 1 or unset: each Serve replica "
                "of a data-parallel deployment runs one rank"
            )
    seats = max_num_seqs if max_num_seqs is not None else engine_kwargs.get("max_num_seqs")
    return DataParallelLayout(
        data_parallel_size=dp,
        tensor_parallel_size=_positive_int(engine_kwargs, "tensor_parallel_size"),
        pipeline_parallel_size=_positive_int(engine_kwargs, "pipeline_parallel_size"),
        max_num_seqs=int(seats or VLLM_DEFAULT_MAX_NUM_SEQS),
    )


def is_data_parallel(llm_config: Any) -> bool:
    """Whether ``llm_config`` deploys as DP groups (``engine_kwargs.data_parallel_size`` > 1)."""
    return data_parallel_size(llm_config) > 1


@dataclass(frozen=True, slots=True)
class ReplicaBounds:
    """Serve replicas of a deployment (ranks for DP): fixed, or autoscaling bounds."""

    num_replicas: int | None = None
    """Fixed replicas; None: autoscaling."""
    min_replicas: int | None = None
    max_replicas: int | None = None
    initial_replicas: int | None = None


def serve_replica_bounds(deployment_config: Mapping[str, Any], dp_size: int) -> ReplicaBounds:
    """The Serve replicas a ``deployment_config`` (counting groups) becomes under ``DPServer``.

    As Ray 2.60's ``DPServer.get_deployment_options``: ``num_replicas: auto``, or no
    ``num_replicas`` beside an ``autoscaling_config``, autoscales between Serve's defaults
    overlaid with the operator's bounds, each times ``dp_size``; a fixed ``num_replicas`` is
    times ``dp_size``; neither is one group. Without DP (``dp_size`` 1) the bounds are as
    written.
    """
    if dp_size < 1:
        raise ValueError("dp_size must be positive")
    num_replicas = deployment_config.get("num_replicas")
    autoscaling = deployment_config.get("autoscaling_config")
    if num_replicas == "auto" or (num_replicas is None and autoscaling is not None):
        bounds: dict[str, int | None] = {
            "min_replicas": SERVE_DEFAULT_MIN_REPLICAS,
            "max_replicas": SERVE_DEFAULT_MAX_REPLICAS,
            "initial_replicas": None,
        }
        for key in bounds:
            value = (autoscaling or {}).get(key)
            if value is not None:
                bounds[key] = int(value)
        return ReplicaBounds(
            **{k: None if v is None else v * dp_size for k, v in bounds.items()},
        )
    if num_replicas is None:
        return ReplicaBounds(num_replicas=dp_size)
    return ReplicaBounds(num_replicas=int(num_replicas) * dp_size)
