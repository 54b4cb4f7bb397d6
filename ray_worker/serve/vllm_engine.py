"""The vLLM engine of the LLM replicas: Ray's ``VLLMEngine`` plus what Bella tasks need.

``BellaVLLMEngine`` adds request parsing, abort by request id and a stat logger for the load
report. Importing vLLM costs seconds and hundreds of MB, so the class is made on first
attribute access (module ``__getattr__``), which also keeps it picklable by reference.

The engine's processes (``VLLM::EngineCore`` and its ``VLLM::Worker``, started with
``multiprocessing``) die with their parent: vLLM only stops them from a live parent
(``AsyncLLM.shutdown``, finalizers), so a replica killed with SIGKILL, or one that Ray tears
down when ``serve run`` aborts on SIGTERM, would leave them running with the GPU memory held.
``_die_with_parent`` makes every process started while the engine starts, and every process
those start, ask the kernel for SIGKILL when its parent thread goes
(``prctl(PR_SET_PDEATHSIG)``, Linux only; elsewhere nothing changes). The engine is started on
the replica's long-lived event-loop thread, which lives as long as the replica. A CPU engine
whose model runs in the engine process (``uni``) has that process bound to cores right after
it started (``engine_cpus``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing.process
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ray_worker.proc import die_with_parent
from ray_worker.serve.engine_cpus import bind_engine_process
from ray_worker.serve.llm_config import VLLM_DEFAULT_MAX_NUM_SEQS

if TYPE_CHECKING:
    BellaVLLMEngine: type

logger = logging.getLogger(__name__)

__all__ = ["BellaVLLMEngine", "engine_class"]

_start_lock = threading.Lock()
_ORIGINAL_START = multiprocessing.process.BaseProcess.start
_hook_installed = False
_on_engine_started: Callable[[int], object] | None = None
"""Called with the pid of each engine process started in a ``_die_with_parent`` block."""


def _child_main(parent_pid: int, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The target of an engine process: die with the parent, pass that on, run ``target``."""
    global _on_engine_started
    die_with_parent(parent_pid)
    _on_engine_started = None  # a forked child holds the parent's: it binds nothing itself
    _install_start_hook()  # the processes this one starts (vLLM's Workers) die with it
    return target(*args, **kwargs)


def _start_dying_with_parent(self: multiprocessing.process.BaseProcess) -> None:
    target = getattr(self, "_target", None)
    wrapped = isinstance(target, functools.partial) and target.func is _child_main
    if target is not None and not wrapped:
        self._target = functools.partial(_child_main, os.getpid(), target)  # type: ignore[attr-defined]
    _ORIGINAL_START(self)
    started = _on_engine_started
    if started is not None and self.name.startswith("EngineCore") and self.pid is not None:
        started(self.pid)


def _install_start_hook() -> bool:
    """Wrap ``multiprocessing`` process starts in this process (once); False off Linux."""
    global _hook_installed
    if not sys.platform.startswith("linux"):
        return False
    with _start_lock:
        if not _hook_installed:
            multiprocessing.process.BaseProcess.start = _start_dying_with_parent  # type: ignore[method-assign]
            _hook_installed = True
    return True


def _uninstall_start_hook() -> None:
    global _hook_installed
    with _start_lock:
        if _hook_installed:
            multiprocessing.process.BaseProcess.start = _ORIGINAL_START  # type: ignore[method-assign]
            _hook_installed = False


@contextlib.contextmanager
def _die_with_parent(on_engine_started: Callable[[int], object] | None = None) -> Iterator[None]:
    """Processes started (with ``multiprocessing``) inside this block die with this process;
    ``on_engine_started`` gets the pid of each engine process (``EngineCore...``) among them."""
    global _on_engine_started
    installed_here = not _hook_installed and _install_start_hook()
    _on_engine_started = on_engine_started
    try:
        yield
    finally:
        _on_engine_started = None
        if installed_here:
            _uninstall_start_hook()


def _honour_executor_backend(llm_config: Any, vllm_config: Any) -> bool:
    """Run the model in the engine process itself when the config asks for ``uni``; True then.

    Ray Serve LLM sets ``distributed_executor_backend: mp`` for every CPU deployment, which
    gives the engine a separate model process; its engine process then waits for every step
    by spinning (``sched_yield``) on shared memory and keeps a core busy that the replica and
    the publisher need on a small CPU machine. A one-process deployment (tensor and pipeline
    parallel size 1) that names ``uni`` in ``engine_kwargs`` gets it; its engine process is then
    bound to cores as vLLM binds a model process (``engine_cpus``).
    """
    asked = (getattr(llm_config, "engine_kwargs", None) or {}).get("distributed_executor_backend")
    parallel = vllm_config.parallel_config
    if asked != "uni" or parallel.world_size != 1:
        return False
    if str(getattr(vllm_config.device_config, "device_type", "")) != "cpu":
        return False
    parallel.distributed_executor_backend = "uni"
    logger.info("the model runs in the engine process (distributed_executor_backend: uni)")
    return True


def _make_vllm_engine_class() -> type:
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingChatRequest,
        EmbeddingCompletionRequest,
    )
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    class _LoadStatLogger(AggregateStatLoggerBase):
        """Keeps the latest scheduler stats per engine (vLLM only hands them to stat loggers)."""

        def __init__(self, vllm_config: Any, engine_indexes: list[int]) -> None:
            self.latest: dict[int, Any] = {}

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                self.latest[engine_idx] = scheduler_stats

        def log_engine_initialized(self) -> None:
            pass

    request_models: dict[str, Any] = {
        "/v1/chat/completions": ChatCompletionRequest,
        "/v1/completions": CompletionRequest,
    }

    class BellaVLLMEngine(VLLMEngine):
        """Ray's ``VLLMEngine`` plus what Bella tasks need: request parsing, abort, load."""

        supports_priority = False
        _max_num_seqs = VLLM_DEFAULT_MAX_NUM_SEQS
        _load_logger: Any = None

        def _start_async_llm_engine(
            self, vllm_engine_args: Any, vllm_engine_config: Any, placement_group: Any
        ) -> Any:
            # A model in the engine process is bound to cores as vLLM binds its model process.
            uni_cpu = _honour_executor_backend(self.llm_config, vllm_engine_config)
            with _die_with_parent(bind_engine_process if uni_cpu else None):
                client = super()._start_async_llm_engine(
                    vllm_engine_args, vllm_engine_config, placement_group
                )
            scheduler = vllm_engine_config.scheduler_config
            self._max_num_seqs = int(scheduler.max_num_seqs)
            self.supports_priority = str(scheduler.policy) == "priority"
            manager = getattr(client, "logger_manager", None)
            if manager is not None:
                self._load_logger = _LoadStatLogger(vllm_engine_config, [0])
                manager.stat_loggers.append(self._load_logger)
            else:
                logger.warning(
                    "vLLM runs without stats (disable_log_stats); the load report has no "
                    "KV-cache usage"
                )
            return client

        async def shutdown(self) -> None:
            """Ray's shutdown, then the engine's processes (Ray's leaves them running)."""
            try:
                await super().shutdown()
            finally:
                client = self._engine_client
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.shutdown()

        def parse_request(
            self, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
        ) -> Any:
            body = {**data, "request_id": request_id, "priority": priority}
            model = request_models.get(endpoint)
            if model is None:
                model = EmbeddingChatRequest if "messages" in body else EmbeddingCompletionRequest
            return model.model_validate(body)

        async def abort(self, request_id: str) -> None:
            client = self._engine_client
            if client is None:
                return
            prefixes = [f"{p}-{request_id}" for p in ("chatcmpl", "cmpl", "embd")]
            known = getattr(client.output_processor, "external_req_ids", None)
            if known is None:
                ids = prefixes
            else:
                # Multi-prompt requests get "-<i>" / "_<i>" suffixes on the external id.
                ids = [
                    rid
                    for rid in list(known)
                    if any(rid == p or rid.startswith((p + "-", p + "_")) for p in prefixes)
                ]
            if ids:
                await client.abort(ids)

        def is_dead(self) -> bool:
            """Whether vLLM's engine core died (``AsyncLLM.errored``: its process is gone or
            it failed): every request fails from then on."""
            client = self._engine_client
            return bool(client is not None and getattr(client, "errored", False))

        def get_load(self) -> dict[str, Any]:
            client = self._engine_client
            in_flight = (
                0 if client is None else client.output_processor.get_num_unfinished_requests()
            )
            stats = None
            if self._load_logger is not None and self._load_logger.latest:
                stats = self._load_logger.latest.get(0) or next(
                    iter(self._load_logger.latest.values())
                )
            if stats is not None:
                running = min(int(stats.num_running_reqs), in_flight)
                kv = float(stats.kv_cache_usage) if in_flight else 0.0
            else:
                running = min(in_flight, self._max_num_seqs)
                kv = 0.0
            return {
                "running": running,
                "waiting": in_flight - running,
                "kv_cache_usage": min(1.0, max(0.0, kv)),
                "max_num_seqs": self._max_num_seqs,
                "engine": "vllm",
            }

    BellaVLLMEngine.__module__ = __name__
    BellaVLLMEngine.__qualname__ = "BellaVLLMEngine"
    return BellaVLLMEngine


def engine_class() -> type:
    """``BellaVLLMEngine`` (imports vLLM on first call)."""
    cls: type = globals().get("BellaVLLMEngine") or __getattr__("BellaVLLMEngine")
    return cls


def __getattr__(name: str) -> Any:
    if name != "BellaVLLMEngine":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _make_vllm_engine_class()
    globals()[name] = cls
    return cls
