"""The Serve application: ``serve run configs/<name>.yaml`` builds it with ``build_app``.

This module owns the application graph, built in the ``serve run`` process: the
``QueuePoller`` deployment (``ray_worker.serve.poller_host``) bound to one LLM deployment per
``llm_configs`` entry (``ray_worker.serve.llm_server``), each replica of which hosts a task
runner (``ray_worker.serve.task_host``). It must not hold business logic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ray.serve import Application

from ray_worker.config import DEFAULT_ENGINE, STOP_MARGIN_S, EnvSettings, WorkerAppArgs
from ray_worker.errors import ConfigError
from ray_worker.serve.poller_host import QueuePoller

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

__all__ = ["build_app"]


def build_app(args: dict[str, Any]) -> Application:
    """Typed app builder for ``serve run``: validates ``args`` as ``WorkerAppArgs``.

    Each ``llm_configs`` entry is parsed into an ``LLMConfig`` once; every default the worker
    derives from it (``ray_worker.serve.llm_config``) reads that parsed config.
    """
    from ray_worker.serve.llm_config import (
        as_llm_config,
        with_backlog_autoscaling,
        with_online_seats,
    )
    from ray_worker.serve.llm_server import build_llm_deployment

    app_args = WorkerAppArgs.model_validate(args).resolved()
    apikey = EnvSettings().require_apikey()
    capacity = app_args.capacity
    configs = [
        with_online_seats(
            with_backlog_autoscaling(as_llm_config(c), capacity.target_ratio),
            capacity.online_reserve_ratio,
            capacity.max_preemptions,
        )
        for c in app_args.llm_configs
    ]
    if app_args.engine == DEFAULT_ENGINE:
        configs = [_local_model_source(c) for c in configs]
    runner = app_args.runner_settings().model_dump(mode="json")
    llm_apps = {
        cfg.model_id: build_llm_deployment(
            cfg,
            engine=app_args.engine,
            load_report_interval_s=capacity.load_report_interval_s,
            load_heartbeat_s=capacity.report_heartbeat_s,
            bella=runner,
            apikey=apikey,
        )
        for cfg in configs
    }
    # The poller waits for its replicas' stop (budget + margin), then for its own answers.
    stop_s = app_args.poller.drain_timeout_s + 2 * STOP_MARGIN_S
    # Serve's decorator hides .bind from the type checker; the bound graph is an Application.
    poller = (
        cast(Any, QueuePoller)
        .options(graceful_shutdown_timeout_s=stop_s)
        .bind(app_args.model_dump(mode="json"), apikey, llm_apps)
    )
    return cast(Application, poller)


def _local_model_source(llm_config: LLMConfig) -> LLMConfig:
    """Resolve a relative local ``model_source`` against the cwd of ``serve run``.

    Ray workers run elsewhere, so they need an absolute path. A missing local path is a clear
    error that says how to build the tiny test model (the worker never builds models itself).
    """
    loading = llm_config.model_loading_config
    source = loading.get("model_source") if isinstance(loading, dict) else loading.model_source
    if not isinstance(source, str) or not source.startswith((".", "/", "~")):
        return llm_config  # a hub id or an object-store URI: vLLM resolves it
    path = Path(source).expanduser().resolve()
    if not (path / "config.json").exists():
        raise ConfigError(
            f"model_source {source!r} does not exist ({path}); "
            "for the tiny test model run `make tiny-model` or `ray-worker tiny-model`"
        )
    resolved: Any = (
        {**loading, "model_source": str(path)}
        if isinstance(loading, dict)
        else loading.model_copy(update={"model_source": str(path)})
    )
    return llm_config.model_copy(update={"model_loading_config": resolved})
