"""The Serve application: ``serve run configs/<name>.yaml`` builds it with ``build_app``.

This module owns the application graph and the ``QueuePoller`` deployment, a thin wrapper
that wires the control plane's plain classes together inside one replica:

    QueuePoller ── Poller ── Dispatcher ──▶ LLM deployments (BellaLLMServer, one per model):
         │                                  each replica's TaskRunner runs and answers the
         │                                  whole task through its node's RedisPublisher
         │                                  actor (online) or HTTP complete (offline)
         └── CapacityTracker ◀── load reports pushed by every LLM replica

It must not hold business logic: that lives in ``worker``, ``task`` and ``eventbus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import SecretStr
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ray_worker.bella.client import QueueClient, RetryPolicy
from ray_worker.config import STOP_MARGIN_S, EnvSettings, WorkerAppArgs, plaintext_url_warnings
from ray_worker.errors import (
    BadRequestError,
    ConfigError,
    WorkerError,
)
from ray_worker.eventbus.actor import EventBusClient
from ray_worker.metrics import WorkerMetrics
from ray_worker.proc import tolerate_surrogates_in_output
from ray_worker.serve.handles import POLLER_DEPLOYMENT, ServeReplicas, hand_over_answers
from ray_worker.serve.redelivery import redelivery_missing
from ray_worker.task.outbox import Outbox
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher
from ray_worker.worker.poller import Poller, make_pools
from ray_worker.worker.status_cache import StatusCache

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

logger = logging.getLogger(__name__)

__all__ = ["QueuePoller", "build_app"]

_STATUS_GAUGE_PERIOD_S = 1.0
_OUTBOX_KEYS = ("outbox_", "complete_")
"""Keys of a replica's load report that are its outbox figures (``Outbox.stats``)."""
_STATUS_MAX_AGE_S = 0.2
"""``GET /bella`` is rebuilt at most this often (StatusCache): fresh enough for a person or a
script watching a task's state, few builds however many call."""
_PUBLISHER_MAX_AGE_S = 1.0
"""The publisher actor is asked for its figures at most this often (one fan-out a second)."""
_STATUS_MAX_WAITING = 8
"""HTTP callers that wait for a rebuild of the status; the others get the previous copy."""


@serve.deployment(
    name=POLLER_DEPLOYMENT,
    num_replicas=1,
    max_ongoing_requests=100_000,
    health_check_period_s=5,
    health_check_timeout_s=30,
    # build_app sets it from the stop budget: the poller outlives its replicas' stop.
    # I/O-bound: takes no CPU slot from the LLM replicas (a CPU-only cluster may have none left).
    ray_actor_options={"num_cpus": 0},
    # Replicas report load every 0.5 s and publishes are per batch: no access log per call.
    logging_config={"enable_access_log": False},
)
class QueuePoller:
    """The control plane: takes tasks and hands each to an LLM replica. One replica only."""

    def __init__(
        self,
        args: dict[str, Any],
        apikey: SecretStr,
        llm_handles: dict[str, DeploymentHandle[Any]],
    ) -> None:
        tolerate_surrogates_in_output()
        self.args = WorkerAppArgs.model_validate(args)
        queue_url = self.args.queue_url
        if queue_url is None:  # resolved() guarantees it; kept for the type checker
            raise ConfigError("queue_url is not set")
        self.metrics = WorkerMetrics()
        self.capacity = CapacityTracker(self.args.capacity, self.args.model_ids())
        dispatch = self.args.dispatcher
        self.client = QueueClient(
            queue_url,
            apikey,
            timeout_s=self.args.poller.take_timeout_s,
            complete_max_connections=dispatch.complete_max_connections,
            # One attempt per call: the outbox owns the retries and their deadline.
            complete_retry=RetryPolicy(attempts=1),
        )
        self.outbox = Outbox(
            self.client, dispatch, metrics=self.metrics, clock=self.client.clock.now_s
        )
        # The poller answers only what never reached a replica, through its node's publisher.
        context = serve.get_replica_context()
        self.events = EventBusClient(
            context.app_name,
            f"poller-{context.replica_id.unique_id}",
            self.args.publisher,
            clock=self.client.clock,
        )
        self.dispatcher = Dispatcher(
            replicas=ServeReplicas(llm_handles),
            events=self.events,
            completer=self.outbox,
            capacity=self.capacity,
            queues=self.args.queues,
            served_models=self.args.model_ids(),
            lora_models=self.args.lora_model_ids(),
            config=dispatch,
            metrics=self.metrics,
            clock=self.client.clock.now_ms,
            redelivers=self.args.poller.process_timeout_s > 0,
        )
        pools = make_pools(
            self.args.queues, {q.name: self.args.queue_model(q) for q in self.args.queues}
        )
        scale_to_zero = set(self.args.scale_to_zero_models())
        for pool in pools:
            pool.probe_at_zero = pool.model_id in scale_to_zero
        self.poller = Poller(
            taker=self.client,
            dispatcher=self.dispatcher,
            capacity=self.capacity,
            pools=pools,
            config=self.args.poller,
            metrics=self.metrics,
        )
        self.state = "starting"
        self._complete_retries_seen = 0
        self._outboxes: dict[str, tuple[str, float, dict[str, Any]]] = {}
        """replica id -> (model id, monotonic time, outbox figures of its last load report)."""
        self.startup_error: str | None = None
        # GET /bella and the publisher's figures are rebuilt at most once per max age, however
        # many callers; the publisher's callers are status() builds, few, so they all wait.
        self._http_status = StatusCache(
            self._render_status, max_age_s=_STATUS_MAX_AGE_S, max_waiting=_STATUS_MAX_WAITING
        )
        self._publisher_cache: StatusCache[dict[str, Any] | None] = StatusCache(
            self._fetch_publisher_stats, max_age_s=_PUBLISHER_MAX_AGE_S, max_waiting=None
        )
        self._bus_url = ""
        self._main = asyncio.get_running_loop().create_task(self._start(), name="poller-start")
        self._gauges = asyncio.get_running_loop().create_task(self._export_gauges())

    async def _start(self) -> None:
        """Register queues (optional), find the event bus, configure the publisher, poll."""
        if self.args.register_queues:
            await self._register_queues()
        wait = 0.5
        while True:
            try:
                eventbus = await self.client.eventbus()
                break
            except WorkerError as err:
                self.startup_error = f"GET /v1/queue/eventbus failed: {err}"
                self.state = "waiting for Bella-Queue"
                logger.warning("%s; retrying in %.1fs", self.startup_error, wait)
                await asyncio.sleep(wait * random.uniform(0.75, 1.25))
                wait = min(wait * 2, 10.0)
        url = self.args.eventbus_url or eventbus.url
        for warning in plaintext_url_warnings(queue_url=self.args.queue_url, eventbus_url=url):
            logger.warning("%s", warning)
        await self.events.start(url, eventbus.topic)
        self._bus_url = url
        await self._check_redelivery()
        self.startup_error = None
        self.state = "running"
        logger.info(
            "polling %s with %s", [q.name for q in self.args.queues], self.args.poller.strategy
        )
        self.poller.start()

    async def _check_redelivery(self) -> None:
        """Leave level-1 tasks no replica could run for redelivery only while the Redis of
        Bella-Queue's queues fires the redelivery timer (``ray_worker.serve.redelivery``)."""
        if self.args.poller.process_timeout_s <= 0 or not self._bus_url:
            return
        with contextlib.suppress(Exception):  # a check never stops the start or the stop
            why = await redelivery_missing(self._bus_url)
            if (why is None) != self.dispatcher.redelivers:
                self.dispatcher.redelivers = why is None
                if why is not None:
                    logger.warning("%s", why)

    async def _register_queues(self) -> None:
        endpoint = "/v1/chat/completions"
        for base in dict.fromkeys(q.base for q in self.args.queues):
            try:
                await self.client.register(base, endpoint)
                logger.info("registered queue %s", base)
            except BadRequestError:
                pass  # already registered
            except WorkerError as err:
                logger.warning("could not register queue %s: %s", base, err)

    async def _export_gauges(self) -> None:
        while True:
            await asyncio.sleep(_STATUS_GAUGE_PERIOD_S)
            for model_id, snap in self.capacity.snapshot().items():
                self.metrics.set("replicas", snap["replicas"], model=model_id)
                self.metrics.set(
                    "tasks_in_flight",
                    snap["in_flight_online"] + snap["in_flight_offline"],
                    model=model_id,
                )
                self.metrics.set("remaining_capacity", snap["remaining_online"], model=model_id)
            retries = self.client.counters.complete_retries
            if retries > self._complete_retries_seen:
                self.metrics.inc("complete_retries", retries - self._complete_retries_seen)
                self._complete_retries_seen = retries

    # -- methods called through handles and HTTP -----------------------------------------

    async def adopt_answers(self, answers: list[dict[str, Any]]) -> int:
        """Undelivered HTTP answers a stopping LLM replica (or poller) handed over
        (``ray_worker.serve.handles.hand_over_answers``): this outbox retries each until its
        task's deadline. Raises while this poller stops too (the caller tries another)."""
        return self.outbox.adopt(answers)

    async def report_load(self, load: dict[str, Any]) -> dict[str, Any]:
        """An LLM replica's load report (pushed every ``load_report_interval_s``).

        The answer carries the backlog of the replica's model, which the replica reports to
        the autoscaling policy (``ray_worker.serve.autoscaling``).
        """
        self.capacity.report(load)
        model_id = str(load.get("model_id", ""))
        if "outbox_entries" in load:
            figures = {k: v for k, v in load.items() if k.startswith(_OUTBOX_KEYS)}
            self._outboxes[str(load.get("replica_id"))] = (model_id, time.monotonic(), figures)
        return {"backlog": self.poller.backlog(model_id) if model_id else 0}

    def _outbox_status(self, model_id: str) -> dict[str, Any]:
        """The outboxes of ``model_id``'s replicas reporting lately, summed (and per replica)."""
        horizon = time.monotonic() - self.args.capacity.load_stale_after_s
        for rid in [r for r, (_, at, _) in self._outboxes.items() if at < horizon]:
            del self._outboxes[rid]  # a replica gone (its last report is stale)
        replicas = {
            rid: figures
            for rid, (model, at, figures) in self._outboxes.items()
            if model == model_id and at >= horizon
        }
        total: dict[str, Any] = {}
        for figures in replicas.values():
            for key, value in figures.items():
                if isinstance(value, int | float) and not key.startswith("outbox_max_"):
                    total[key] = total.get(key, 0) + value
        total.pop("outbox_oldest_age_s", None)
        ages = [f.get("outbox_oldest_age_s") for f in replicas.values()]
        total["outbox_oldest_age_s"] = max((a for a in ages if a is not None), default=None)
        return {**total, "replicas": replicas}

    async def status(self) -> dict[str, Any]:
        """The worker's state: per pool take state, capacity and the replicas' outboxes."""
        polled = self.poller.status()
        for pool in polled.get("pools", []):
            pool["outbox"] = self._outbox_status(str(pool.get("model", "")))
        return {
            "state": self.state,
            "startup_error": self.startup_error,
            "queues": [q.name for q in self.args.queues],
            "strategy": self.args.poller.strategy.value,
            **polled,
            # False: level-1 tasks are answered 503 rather than left for redelivery.
            "redelivers": self.dispatcher.redelivers,
            "answered": dict(self.dispatcher.answered),
            "cancelled": self.dispatcher.cancelled,
            "tokens": dict(self.dispatcher.tokens),
            # Bella-Queue's clock minus ours, from its Date headers (deadlines account for it).
            "clock_offset_ms": self.client.clock.offset_ms,
            "duplicates": int(self.metrics.total("duplicates")),
            "latency_mean_s": {
                "take_latency_s": self.metrics.mean("take_latency_s"),
                # From the replicas' outcomes: put to run start, run start to first event.
                **self.dispatcher.timing_means(),
            },
            "complete_retries": self.client.counters.complete_retries,
            "events": self.events.stats(),
            "publisher": await self._publisher_stats(),
        }

    async def _publisher_stats(self) -> dict[str, Any] | None:
        """This node's publisher actor: buffered, published, and what it gave up (tasks whole,
        events by kind) after Redis outages. None while it is not reachable. One call to the
        actor per ``_PUBLISHER_MAX_AGE_S`` at most, shared by concurrent callers."""
        return await self._publisher_cache.get()

    async def _fetch_publisher_stats(self) -> dict[str, Any] | None:
        actor = self.events.actor if self.events.started else None
        if actor is None:
            return None
        try:
            stats: dict[str, Any] = await asyncio.wait_for(actor.stats.remote(), 5)
        except Exception:
            return None
        return stats

    async def __call__(self, request: Request) -> Response:
        """``GET /<route_prefix>``: the status as JSON, from a copy rebuilt at most once per
        ``_STATUS_MAX_AGE_S`` however many call (Serve's port may answer anyone: README
        "Observe"). Callers that come during a rebuild wait for it, ``_STATUS_MAX_WAITING`` at
        most; the others get the previous copy at once, or a 503 with ``Retry-After: 1`` while
        there is none yet."""
        body = await self._http_status.get()
        if body is None:
            return JSONResponse(
                {"error": "the status is being built; retry"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        return Response(body, media_type="application/json")

    async def _render_status(self) -> bytes:
        return bytes(JSONResponse(await self.status()).body)

    async def check_health(self) -> None:
        """Serve health check: fails when start-up or a take loop died, or when this node's
        event-bus publisher actor reports its writer (or lease watchdog) dead."""
        if self._main.done() and not self._main.cancelled() and self._main.exception():
            raise RuntimeError(f"start-up failed: {self._main.exception()!r}")
        failure = self.poller.failure()
        if failure is not None:
            raise RuntimeError(f"a take loop died: {failure!r}")
        if self.events.started:
            try:
                # A dead publisher is replaced there (re-attach); only one that stays broken
                # fails the check.
                await asyncio.wait_for(self.events.check_health(), 30)
            except Exception as exc:
                raise RuntimeError(f"the event-bus publisher is unhealthy: {exc!r}") from None

    async def __del__(self) -> None:
        """Drain: stop taking at once, wait for the tasks in flight while their replicas
        finish them within the stop budget (``poller.drain_timeout_s``; the replicas cut what
        runs past it), close the clients."""
        self.state = "draining"
        self._main.cancel()
        self._gauges.cancel()
        await self.poller.stop()
        await self._check_redelivery()
        left = await self.dispatcher.drain(self.args.poller.drain_timeout_s + STOP_MARGIN_S)
        if left:
            logger.warning("stopped waiting for %d tasks; their replicas answer them", left)
        # What its outbox still holds (its own answers, and those stopping replicas handed it)
        # goes to the next poller of a redeploy; with the whole app stopping it is given up.
        undelivered = await hand_over_answers(
            self.outbox, serve.get_replica_context().app_name, settle_s=5.0
        )
        if undelivered:
            logger.error("%d HTTP answers could not be delivered", undelivered)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.events.aclose(), 10)
        await self.client.aclose()
        self.state = "stopped"


def build_app(args: dict[str, Any]) -> Application:
    """Typed app builder for ``serve run``: validates ``args`` as ``WorkerAppArgs``.

    Each ``llm_configs`` entry is parsed into an ``LLMConfig`` once; every default the worker
    derives from it (``ray_worker.serve.llm_config``) reads that parsed config.
    """
    from ray_worker.serve.llm_config import as_llm_config, with_backlog_autoscaling
    from ray_worker.serve.llm_server import build_llm_deployment

    app_args = WorkerAppArgs.model_validate(args).resolved()
    apikey = EnvSettings().require_apikey()
    configs = [
        with_backlog_autoscaling(as_llm_config(c), app_args.capacity.target_ratio)
        for c in app_args.llm_configs
    ]
    if app_args.engine == "vllm":
        configs = [_local_model_source(c) for c in configs]
    runner = app_args.runner_settings().model_dump(mode="json")
    llm_apps = {
        cfg.model_id: build_llm_deployment(
            cfg,
            engine=app_args.engine,
            load_report_interval_s=app_args.capacity.load_report_interval_s,
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
