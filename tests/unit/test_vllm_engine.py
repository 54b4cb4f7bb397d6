"""The vLLM engine's executor choice (``uni`` on a one-process CPU deployment that asks for
it), and the engine processes its start hook reports (to bind them to cores)."""

from __future__ import annotations

import multiprocessing
from types import SimpleNamespace
from typing import Any

import pytest

from ray_worker.serve.llm_config import as_llm_config
from ray_worker.serve.vllm_engine import _die_with_parent, _honour_executor_backend


def _llm_config(**engine_kwargs: Any) -> Any:
    return as_llm_config(
        {
            "model_loading_config": {"model_id": "tiny", "model_source": "/models/tiny"},
            "accelerator_config": {"kind": "cpu"},
            "engine_kwargs": engine_kwargs,
        }
    )


def _vllm_config(device: str = "cpu", world_size: int = 1) -> Any:
    # What Ray Serve LLM hands the engine for every CPU deployment: ``mp``.
    parallel = SimpleNamespace(world_size=world_size, distributed_executor_backend="mp")
    return SimpleNamespace(
        parallel_config=parallel, device_config=SimpleNamespace(device_type=device)
    )


def test_uni_asked_on_one_cpu_process_is_honoured() -> None:
    config = _vllm_config()
    assert _honour_executor_backend(_llm_config(distributed_executor_backend="uni"), config)
    assert config.parallel_config.distributed_executor_backend == "uni"


@pytest.mark.parametrize(
    ("engine_kwargs", "device", "world_size"),
    [
        ({}, "cpu", 1),  # not asked: Ray's choice stands
        ({"distributed_executor_backend": "mp"}, "cpu", 1),
        ({"distributed_executor_backend": "uni"}, "cpu", 2),  # tensor parallel needs processes
        ({"distributed_executor_backend": "uni"}, "cuda", 1),  # GPUs keep Ray's executor
    ],
)
def test_everything_else_keeps_rays_executor(
    engine_kwargs: dict[str, Any], device: str, world_size: int
) -> None:
    config = _vllm_config(device, world_size)
    assert not _honour_executor_backend(_llm_config(**engine_kwargs), config)
    assert config.parallel_config.distributed_executor_backend == "mp"


def _exit_at_once() -> None:
    pass


def test_engine_processes_started_in_the_block_are_reported_by_pid() -> None:
    started: list[int] = []
    with _die_with_parent(on_engine_started=started.append):
        engine = multiprocessing.Process(target=_exit_at_once, name="EngineCore")
        other = multiprocessing.Process(target=_exit_at_once, name="resource-helper")
        engine.start()
        other.start()
    after = multiprocessing.Process(target=_exit_at_once, name="EngineCore")
    after.start()
    for proc in (engine, other, after):
        proc.join(30)
    assert started == [engine.pid]
