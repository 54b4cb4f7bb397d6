"""The LLM deployment: a ``ray.serve.llm`` ``LLMServer`` subclass that runs Bella tasks.

This module owns the replica side: ``BellaLLMServer.run`` runs and answers one whole task
through the replica's task host (``task_host``); ``run_task`` builds the OpenAI request model
from a task's raw ``data`` inside the replica, runs it on the engine with the task's priority
and request id, and yields OpenAI dicts (stream chunks, or one full response); ``abort`` frees
a request's engine slot; ``get_load`` reports the engine's live load and the tasks held for
the capacity tracker. ``build_llm_deployment`` builds the Serve deployment from an
``LLMConfig`` so operators keep every vLLM and Serve knob.

Engines are classes passed in, the way Ray LLM injects them (``engine_cls=``): the vLLM engine
is ``ray_worker.serve.vllm_engine.BellaVLLMEngine``; the simulated engine
(``ray_worker.serve.sim_engine.SimEngine``) is passed for configs that select it
(``experimental_configs.bella_sim_engine``), with the same entry points.

Importing this module is cheap: ``ray.serve.llm`` imports vLLM (about 6-8 s and 700 MB here), so
``BellaLLMServer`` is created on first attribute access (module ``__getattr__``), which also
keeps it picklable by reference for Serve.

Ray internals, checked against Ray 2.60.0 (``RAY_VERSION_CHECKED``;
``tests/unit/test_llm_server_seams.py`` fails when one changes): the server keeps to what
``LLMServer`` offers publicly (the ``__init__``/``sync_init`` constructors with their
``engine_cls``/``model_downloader`` injection, ``start``, ``check_health``, ``__del__``,
``get_deployment_options``, the ``engine`` attribute, ``serve.get_replica_context()``), except
where Ray offers no public way:

- ``LLMServer._get_default_engine_class()`` (overridden): the engine of a replica given no
  ``engine_cls``: ``BellaVLLMEngine``, unless Ray's ``RAYLLM_VLLM_ENGINE_CLS`` escape hatch names
  another. Passing ``engine_cls=`` instead would override that escape hatch, and
  ``ray_worker.dev.check_gpu_stack`` asks this method which engine a deployment runs.
- ``LLMServer._load_model`` (called): the LoRA loader Ray wraps in ``serve.multiplexed`` for
  this replica (its LRU of adapters, and the model ids Serve routes by); a loader of our own
  would keep a second LRU beside Ray's and report to Serve twice.
- Serve's stop flag (read by ``serve_stopping_replica``): the replica actor object Ray keeps for
  this process (``ray._private.worker.global_worker.actors[actor_id]``), its ``_replica_impl``
  and that one's ``_shutting_down``; Serve tells a replica's code of a stop only by
  ``__del__``, once no request runs.

Every other private name of the server is its own (``_TaskServingMixin``; the test checks that
none shadows one of ``LLMServer``'s). ``_RayLLMServer`` types the part of ``LLMServer`` the
server uses, for mypy (Ray's own methods are unannotated).

Priority: vLLM schedules a *lower* value first (``ray_worker.hop.PRIORITY_ONLINE`` 0
for level-0 tasks, ``PRIORITY_OFFLINE`` 1 for level-1 tasks); deployments built here run vLLM
with ``scheduling_policy="priority"`` unless the operator chose another policy (then priority
is ignored rather than rejected).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ray_worker.config import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_ENGINE,
    STOP_MARGIN_S,
    Engine,
    ReasoningField,
    adapter_of,
)
from ray_worker.errors import (
    EngineDeadError,
    EngineError,
    InvalidTaskError,
    ModelNotFoundError,
    WorkerError,
)
from ray_worker.hop import PRIORITY_ONLINE, SUPPORTED_ENDPOINTS, ReplicaLoad, done, outcome
from ray_worker.serve.engine_io import check_body, decode_item, map_exception
from ray_worker.serve.llm_config import lora_path_of, sim_settings, with_worker_defaults
from ray_worker.serve.reasoning import apply_reasoning_field

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.llm import LLMConfig

    # Created on first access by the module ``__getattr__`` below.
    BellaLLMServer: type

    class _RayLLMServer:
        """What the server uses of Ray's ``LLMServer`` (Ray 2.60.0), typed."""

        engine: Any
        _load_model: Callable[[str], Awaitable[Any]]

        # Serve awaits a deployment's async constructor; mypy wants __init__ to return None.
        async def __init__(  # type: ignore[misc]
            self,
            llm_config: LLMConfig,
            *,
            engine_cls: type | None = None,
            model_downloader: type | None = None,
        ) -> None: ...

        @classmethod
        def sync_init(
            cls,
            llm_config: LLMConfig,
            *,
            engine_cls: type | None = None,
            model_downloader: type | None = None,
        ) -> Any: ...

        async def start(self) -> None: ...

        def _get_default_engine_class(self) -> type: ...

        @classmethod
        def get_deployment_options(cls, llm_config: LLMConfig) -> dict[str, Any]: ...

        async def check_health(self) -> None: ...

        async def __del__(self) -> None: ...

    _Base = _RayLLMServer
else:
    _Base = object

logger = logging.getLogger(__name__)

__all__ = [
    "ENDPOINTS",
    "RAY_PRIVATE_OVERRIDES",
    "RAY_PUBLIC_OVERRIDES",
    "RAY_VERSION_CHECKED",
    "BellaLLMServer",
    "build_llm_deployment",
    "serve_stopping_replica",
    "server_class",
]

ENDPOINTS: dict[str, str] = dict(
    zip(SUPPORTED_ENDPOINTS, ("chat", "completions", "embeddings"), strict=True)
)
"""Task endpoints served, and the engine method each runs."""

RAY_VERSION_CHECKED = "2.60.0"
"""The Ray release whose internals this module was checked against (see the module docstring)."""
RAY_PRIVATE_OVERRIDES = ("_get_default_engine_class",)
"""Private ``LLMServer`` methods the server overrides: same parameters as Ray's."""
RAY_PUBLIC_OVERRIDES = (
    "__init__",
    "sync_init",
    "start",
    "check_health",
    "__del__",
    "get_deployment_options",
)
"""Public ``LLMServer`` methods the server overrides: Ray's parameters (the constructor adds
keyword-only ones of its own)."""

_ABORTED_STATUS = 499  # client closed request: the caller aborted it
_STOP_POLL_S = 0.25
"""How often a replica looks whether Serve began stopping it."""


def serve_stopping_replica() -> bool:
    """Whether Serve began the graceful shutdown of the replica this code runs in.

    Serve tells a replica's code of a stop only by calling ``__del__``, and only once no
    request is ongoing: for a replica whose requests are whole tasks, after they all ended
    or Serve's ``graceful_shutdown_timeout_s`` killed it. The worker needs to know at once
    (stop taking, start the budget), so it reads Serve's own flag: the replica actor object
    Ray keeps for this process (``global_worker.actors``), its ``_replica_impl`` (a
    ``Replica``) and that one's ``_shutting_down``, set first thing by
    ``_perform_graceful_shutdown`` (Ray internals: see the module docstring); if they are
    missing this reads False and the stop begins at ``__del__``.
    """
    try:
        from ray._private.worker import global_worker

        actor = global_worker.actors.get(global_worker.actor_id)
    except Exception:
        return False
    impl = getattr(actor, "_replica_impl", None)
    return bool(getattr(impl, "_shutting_down", False))


# ---------------------------------------------------------------------------------------------
# The server logic, as a mixin over Ray's LLMServer (kept free of vLLM imports)


class _Inflight:
    __slots__ = ("aborted", "started")

    def __init__(self) -> None:
        self.aborted = False
        self.started = time.monotonic()


class _TaskServingMixin(_Base):
    """``run_task`` / ``abort`` / ``get_load`` over whichever engine ``LLMServer`` started.

    Mixed in before ``LLMServer``; the engine must offer, besides Ray's ``LLMEngine`` methods,
    ``parse_request(endpoint, data, *, request_id, priority)``, ``async abort(request_id)``,
    ``get_load() -> dict`` and a ``supports_priority`` attribute.
    """

    # The worker app's DispatcherConfig.reasoning_field; DeepSeek's name elsewhere.
    _reasoning_field: ReasoningField = "reasoning_content"
    # Set by _init_state.
    _config: LLMConfig
    _engine_cls_given: type | None
    _inflight: dict[str, _Inflight]
    _engine_dead: bool
    _replica_id: str | None
    _warned_priority: bool
    _load_reporter: Any
    _tasks: Any
    _stop_watch: asyncio.Task[None] | None

    # -- construction -----------------------------------------------------------------------

    # Serve awaits a deployment's async constructor; mypy wants __init__ to return None.
    async def __init__(  # type: ignore[misc]
        self,
        llm_config: LLMConfig,
        *,
        engine_cls: type | None = None,
        model_downloader: type | None = None,
        load_report_interval_s: float | None = None,
        load_heartbeat_s: float | None = None,
        bella: Mapping[str, Any] | None = None,
        apikey: Any = None,
    ) -> None:
        from ray_worker.proc import tolerate_surrogates_in_output

        tolerate_surrogates_in_output()
        self._init_state(llm_config, engine_cls)
        # Ray's constructor starts the engine (``start``).
        await super().__init__(llm_config, engine_cls=engine_cls, model_downloader=model_downloader)
        if bella is not None:
            # In the worker app: this replica runs and answers whole tasks (``run``).
            from ray import serve

            from ray_worker.serve.llm_config import seats_of
            from ray_worker.serve.task_host import ReplicaTasks
            from ray_worker.task.seats import Seats

            seats = seats_of(self._config)
            self._tasks = ReplicaTasks(
                bella,
                apikey,
                stream=self.run_task,
                model_id=str(self._config.model_id),
                app_name=serve.get_replica_context().app_name,
                client_id=f"replica-{self._get_replica_id()}",
                replica_id=self._get_replica_id(),
                seats=None
                if seats is None
                else Seats(seats[0], seats[1], max_preemptions=seats[2]),
            )
            self._reasoning_field = self._tasks.settings.dispatcher.reasoning_field
            self._stop_watch = asyncio.get_running_loop().create_task(
                self._watch_stop(), name="replica-stop-watch"
            )
        if load_report_interval_s:
            from ray_worker.serve.load_report import LoadReporter

            self._load_reporter = LoadReporter(
                self.get_load, load_report_interval_s, heartbeat_s=load_heartbeat_s
            )
            self._load_reporter.start()

    def _init_state(self, llm_config: LLMConfig, engine_cls: type | None) -> None:
        """The server's own state, set before Ray's constructor starts the engine."""
        self._config = llm_config
        self._engine_cls_given = engine_cls
        self._inflight = {}
        self._engine_dead = False
        self._replica_id = None
        self._warned_priority = False
        self._load_reporter = None
        self._tasks = None
        self._stop_watch = None

    @classmethod
    def sync_init(
        cls,
        llm_config: LLMConfig,
        *,
        engine_cls: type | None = None,
        model_downloader: type | None = None,
    ) -> Any:
        """Ray's synchronous constructor: an unstarted server (``await server.start()``), with
        no task host nor load reports."""
        server = super().sync_init(
            llm_config, engine_cls=engine_cls, model_downloader=model_downloader
        )
        server._init_state(llm_config, engine_cls)
        return server

    def _get_default_engine_class(self) -> type:
        # build_llm_deployment passes the simulated engine as engine_cls; this is vLLM's.
        if os.environ.get("RAYLLM_VLLM_ENGINE_CLS"):
            return super()._get_default_engine_class()
        from ray_worker.serve.vllm_engine import engine_class

        return engine_class()

    async def start(self) -> None:
        """Start the engine: Ray's ``start`` for vLLM; a simulated engine starts alone (Ray's
        telemetry push after the start builds a vLLM engine config and blocks on an actor)."""
        if sim_settings(self._config) is None:
            await super().start()
            return
        engine_cls = self._engine_cls_given or self._get_default_engine_class()
        self.engine = engine_cls(self._config)
        await self.engine.start()

    @classmethod
    def get_deployment_options(cls, llm_config: LLMConfig) -> dict[str, Any]:
        """Serve options from the ``LLMConfig``; simulated replicas need no placement group."""
        if sim_settings(llm_config) is None:
            return super().get_deployment_options(llm_config)
        options = copy.deepcopy(llm_config.deployment_config)
        actor_options = options.setdefault("ray_actor_options", {})
        actor_options.setdefault("num_cpus", 0.05)
        if llm_config.runtime_env:
            actor_options["runtime_env"] = {
                **actor_options.get("runtime_env", {}),
                **llm_config.runtime_env,
            }
        return options

    async def _watch_stop(self) -> None:
        """Begin the task host's stop as soon as Serve begins stopping this replica, and
        notice an engine that died while no task ran."""
        # Polled: Serve and vLLM set plain attributes, they signal no event.
        while not serve_stopping_replica():
            self._engine_died()
            await asyncio.sleep(_STOP_POLL_S)
        self._tasks.begin_stop()

    def _engine_died(self) -> bool:
        """Whether the engine died (vLLM's engine core gone): then this replica refuses new
        tasks, reports no capacity and fails its health check, so Serve replaces it."""
        if not self._engine_dead:
            is_dead = getattr(self.engine, "is_dead", None)
            if callable(is_dead) and is_dead():
                self._engine_dead = True
                logger.error(
                    "the engine died: this replica takes no more tasks; those that had not "
                    "begun answering run on another replica; Serve replaces it at its next "
                    "health check"
                )
        return self._engine_dead

    async def __del__(self) -> None:
        watch = getattr(self, "_stop_watch", None)
        if watch is not None:
            watch.cancel()
        tasks = getattr(self, "_tasks", None)
        if tasks is not None:
            # Serve waited for the ongoing ``run`` calls already (the stop budget cut what ran
            # past it); this delivers what the outbox holds and closes the clients.
            with contextlib.suppress(Exception):
                await tasks.aclose()
        reporter = getattr(self, "_load_reporter", None)
        if reporter is not None:
            with contextlib.suppress(Exception):
                await reporter.stop()
        await super().__del__()

    async def check_health(self) -> None:
        """Serve health check: the engine's, and the task host's start-up."""
        if self._engine_died():
            raise EngineDeadError("the engine of this replica died")
        await super().check_health()
        tasks = getattr(self, "_tasks", None)
        if tasks is not None:
            tasks.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve custom autoscaling metrics: the backlog the poller sees for this model (0
        until the poller answers a report) and the answers this replica's outbox holds.

        Read by ``ray_worker.serve.autoscaling.backlog_policy``.
        """
        from ray_worker.serve.autoscaling import BACKLOG_METRIC, UNDELIVERED_METRIC

        reporter = getattr(self, "_load_reporter", None)
        tasks = getattr(self, "_tasks", None)
        return {
            BACKLOG_METRIC: float(reporter.backlog) if reporter is not None else 0.0,
            UNDELIVERED_METRIC: float(tasks.outbox.entries) if tasks is not None else 0.0,
        }

    # -- entry points -----------------------------------------------------------------------

    async def run(self, task: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Run and answer one whole Bella task (the worker app's poller calls this).

        Yields the messages of a run (``ray_worker.hop``). The task's work outlives this
        call: cancelling it does not stop the task.
        """
        if self._tasks is None:
            raise EngineError("this LLM deployment was not built by the worker app: no task host")
        if self._engine_died():
            # Refused as an outcome, not an exception: Serve would log a traceback per call;
            # ``retry``: the poller runs the task on another replica.
            yield done(outcome(str(task.get("task_id", "")), retry=True))
            return
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
        model_id = self._config.model_id
        requested = data.get("model")
        body = dict(data)
        body["model"] = model_id
        if requested not in (None, "") and requested != model_id:
            if (
                getattr(self._config, "lora_config", None) is None
                or not isinstance(requested, str)
                or adapter_of(requested, model_id) is None
            ):
                raise ModelNotFoundError(f"The model `{requested}` does not exist.", "model")
            await self._load_adapter(requested)
            body["model"] = requested  # vLLM picks the loaded adapter by this name
        check_body(endpoint, body)
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
            raise map_exception(err, parsing=True) from None

        entry = _Inflight()
        self._inflight[request_id] = entry
        stream = getattr(self.engine, method)(request)
        # vLLM names a reasoning model's thinking ``reasoning``; answers use the configured name.
        reasoning_field: ReasoningField = self._reasoning_field if method == "chat" else "reasoning"
        finished = False
        try:
            try:
                async for item in stream:
                    for out in decode_item(item):
                        if entry.aborted:
                            break
                        yield apply_reasoning_field(out, reasoning_field)
                    if entry.aborted:
                        break
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as err:
                finished = True
                mapped = map_exception(err)
                if not isinstance(mapped, EngineDeadError) and self._engine_died():
                    # vLLM's serving layer may report the death as a plain 500.
                    mapped = EngineDeadError(f"the engine died: {mapped}")
                raise mapped from None
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
        held: dict[str, Any] = self._tasks.held() if self._tasks is not None else {}
        load = ReplicaLoad(
            replica_id=self._get_replica_id(),
            model_id=str(self._config.model_id),
            running=int(raw.get("running", 0)),
            waiting=int(raw.get("waiting", 0)),
            kv_cache_usage=float(raw.get("kv_cache_usage", 0.0)),
            max_num_seqs=int(raw.get("max_num_seqs", 1)),
            draining=self._engine_died() or (self._tasks is not None and self._tasks.stopping),
            held_ids=frozenset(held.get("held_ids", ())),
            held_online=int(held.get("held_online", 0)),
            held_offline=int(held.get("held_offline", 0)),
            offline_width=int(held.get("offline_width", 0)),
            online_seats=int(held.get("online_seats", 0)),
            seats_online_in_use=int(held.get("seats_online_in_use", 0)),
            seats_offline_in_use=int(held.get("seats_offline_in_use", 0)),
            preemptions=int(held.get("preemptions", 0)),
            **self._gang(),
            in_flight=len(self._inflight),
            engine=str(raw.get("engine", DEFAULT_ENGINE)),
            ts=time.time(),
            outbox=self._tasks.outbox_load() if self._tasks is not None else {},
        )
        return load.as_report()

    # -- helpers ----------------------------------------------------------------------------

    def _gang(self) -> dict[str, Any]:
        """This replica's data-parallel group, for the load report (none outside Serve or
        outside a gang): the poller counts a group's seats only while all its ranks report."""
        try:
            from ray import serve

            gang = serve.get_replica_context().gang_context
        except Exception:
            return {}
        if gang is None:
            return {}
        return {"gang_id": str(gang.gang_id), "dp_rank": gang.rank, "dp_size": gang.world_size}

    async def _load_adapter(self, lora_model_id: str) -> None:
        """Load ``base:adapter`` into this replica (Serve's multiplexed LRU) and the engine."""
        try:
            disk = await self._load_model(lora_model_id)
            await self.engine.resolve_lora(disk)
        except WorkerError:
            raise
        except Exception as err:
            raise EngineError(f"loading adapter {lora_model_id!r} failed: {err}") from None

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

                self._replica_id = serve.get_replica_context().replica_tag
            except Exception:
                self._replica_id = f"{socket.gethostname()}:{os.getpid()}"
        return self._replica_id


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


def __getattr__(name: str) -> Any:
    if name != "BellaLLMServer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _make_server_class()
    globals()[name] = cls
    return cls


def server_class() -> type:
    """``BellaLLMServer`` (imports ``ray.serve.llm`` and vLLM on first call)."""
    cls: type = globals().get("BellaLLMServer") or __getattr__("BellaLLMServer")
    return cls


def _set_stop_budget(cfg: LLMConfig, drain_timeout_s: float) -> None:
    """Serve's ``graceful_shutdown_timeout_s`` (its force-kill deadline for a stopping replica;
    Serve's own default is 20 s) becomes the stop budget (``poller.drain_timeout_s``,
    ``DEFAULT_DRAIN_TIMEOUT_S`` by default) plus ``STOP_MARGIN_S``, unless the operator set it;
    one set below that is kept, with a warning: tasks then die at Serve's deadline."""
    needed = drain_timeout_s + STOP_MARGIN_S
    deployment = cfg.deployment_config
    chosen = deployment.get("graceful_shutdown_timeout_s")
    if chosen is None:
        deployment["graceful_shutdown_timeout_s"] = needed
    elif float(chosen) < needed:
        logger.warning(
            "%s: graceful_shutdown_timeout_s %.0f s is below the stop budget "
            "(poller.drain_timeout_s %.0f s + %.0f s): a stopping replica is killed with its "
            "tasks before the budget ends",
            cfg.model_id,
            float(chosen),
            drain_timeout_s,
            STOP_MARGIN_S,
        )


def build_llm_deployment(
    llm_config: LLMConfig | Mapping[str, Any],
    *,
    name: str | None = None,
    engine: Engine = DEFAULT_ENGINE,
    load_report_interval_s: float | None = None,
    load_heartbeat_s: float | None = None,
    override_serve_options: Mapping[str, Any] | None = None,
    bella: Mapping[str, Any] | None = None,
    apikey: Any = None,
) -> Application:
    """The Serve application of one model: ``BellaLLMServer`` bound to ``llm_config``.

    Built with Ray's ``build_llm_deployment(deployment_cls=BellaLLMServer)`` after
    ``with_worker_defaults``. The deployment is named ``name`` (default: the model id with
    ``/`` and ``.`` replaced, as Ray LLM does). With ``load_report_interval_s``, every replica
    reads ``get_load()`` at that interval and pushes it to the app's ``QueuePoller`` when it
    changed, or ``load_heartbeat_s`` after the last push
    (``ray_worker.serve.load_report.LoadReporter``).

    A vLLM config with ``engine_kwargs.data_parallel_size`` > 1 is built with Ray's
    ``build_dp_deployment(deployment_cls=BellaDPServer)`` instead: one Serve replica per DP
    rank, gangs of ``data_parallel_size`` (``ray_worker.serve.data_parallel``). The simulated
    engine runs no data parallelism: such a config builds as any other there.
    """
    from ray.serve.llm import build_dp_deployment
    from ray.serve.llm import build_llm_deployment as ray_build_llm_deployment

    from ray_worker.serve.data_parallel import is_data_parallel, layout_of

    cfg = with_worker_defaults(llm_config, engine=engine)
    builder: Callable[..., Application] = ray_build_llm_deployment
    deployment_cls = server_class()
    if is_data_parallel(cfg) and sim_settings(cfg) is None:
        from ray_worker.serve.dp_server import dp_server_class

        layout_of(cfg)  # ConfigError for what DPServer would get wrong (a fixed rank...)
        builder, deployment_cls = build_dp_deployment, dp_server_class()
    options: dict[str, Any] = dict(override_serve_options or {})
    options["name"] = name or cfg.model_id.replace("/", "--").replace(".", "_")
    bind_kwargs: dict[str, Any] = {}
    if sim_settings(cfg) is not None:
        from ray_worker.serve.sim_engine import SimEngine

        bind_kwargs["engine_cls"] = SimEngine
    if cfg.lora_config is not None or lora_path_of(cfg) is not None:
        from ray_worker.serve.lora import BellaLoraLoader

        bind_kwargs["model_downloader"] = BellaLoraLoader
    if load_report_interval_s:
        bind_kwargs["load_report_interval_s"] = float(load_report_interval_s)
        if load_heartbeat_s:
            bind_kwargs["load_heartbeat_s"] = float(load_heartbeat_s)
    if bella is not None:
        # The worker app: replicas run and answer whole tasks (``RunnerSettings`` as a dict).
        bind_kwargs["bella"] = dict(bella)
        bind_kwargs["apikey"] = apikey
        _set_stop_budget(cfg, float(bella.get("drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S)))
    app: Application = builder(
        cfg,
        deployment_cls=deployment_cls,
        override_serve_options=options,
        bind_kwargs=bind_kwargs,
    )
    return app
