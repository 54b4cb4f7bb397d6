"""Hosting the control plane inside the ``QueuePoller`` replica: its parts, its start and stop.

This module owns the ``QueuePoller`` Serve deployment, a thin wrapper that wires the control
plane's plain classes together inside one replica:

    QueuePoller ── Poller ── Dispatcher ──▶ LLM deployments (BellaLLMServer, one per model):
         │                                  each replica's TaskRunner runs and answers the
         │                                  whole task through its node's RedisPublisher
         │                                  actor (online) or HTTP complete (offline)
         ├── CapacityTracker ◀── load reports pushed by every LLM replica
         └── AnsweringKit (``serve/answering.py``): the poller's own answers

It also serves ``GET /bella`` (``ray_worker.worker.status``) and adopts the answers stopping
replicas hand over. It runs in the poller only; it must not hold business logic: that lives in
``worker``, ``task`` and ``eventbus``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ray_worker.bella.protocol import DEFAULT_ENDPOINT
from ray_worker.config import STOP_MARGIN_S, WorkerAppArgs, plaintext_url_warnings
from ray_worker.errors import BadRequestError, ConfigError, WorkerError
from ray_worker.hop import POLLER_DEPLOYMENT, ReplicaLoad
from ray_worker.metrics import WorkerMetrics
from ray_worker.proc import tolerate_surrogates_in_output
from ray_worker.serve.answering import AnsweringKit
from ray_worker.serve.handles import ServeReplicas
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher
from ray_worker.worker.poller import Poller, make_pools
from ray_worker.worker.status import ReplicaOutboxes, poller_status
from ray_worker.worker.status_cache import StatusCache

logger = logging.getLogger(__name__)

__all__ = ["QueuePoller"]

_STATUS_GAUGE_PERIOD_S = 1.0
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
        # The poller answers only what never reached a replica, through its node's publisher.
        context = serve.get_replica_context()
        self.kit = AnsweringKit(
            queue_url,
            apikey,
            timeout_s=self.args.poller.take_timeout_s,
            dispatch=dispatch,
            publisher=self.args.publisher,
            eventbus_url=self.args.eventbus_url,
            app_name=context.app_name,
            client_id=f"poller-{context.replica_id.unique_id}",
            metrics=self.metrics,
        )
        self.client = self.kit.client
        self.dispatcher = Dispatcher(
            replicas=ServeReplicas(llm_handles),
            events=self.kit.events,
            completer=self.kit.outbox,
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
        self.outboxes = ReplicaOutboxes(self.args.capacity.load_stale_after_s)
        # GET /bella and the publisher's figures are rebuilt at most once per max age, however
        # many callers; the publisher's callers are status() builds, few, so they all wait.
        self._http_status = StatusCache(
            self._render_status, max_age_s=_STATUS_MAX_AGE_S, max_waiting=_STATUS_MAX_WAITING
        )
        self._publisher_cache: StatusCache[dict[str, Any] | None] = StatusCache(
            self._fetch_publisher_stats, max_age_s=_PUBLISHER_MAX_AGE_S, max_waiting=None
        )
        self._main = asyncio.get_running_loop().create_task(self._start(), name="poller-start")
        self._gauges = asyncio.get_running_loop().create_task(self._export_gauges())

    async def _start(self) -> None:
        """Register queues (optional), find the event bus, configure the publisher, poll."""
        if self.args.register_queues:
            await self._register_queues()
        url = await self.kit.connect()
        for warning in plaintext_url_warnings(queue_url=self.args.queue_url, eventbus_url=url):
            logger.warning("%s", warning)
        await self._check_redelivery()
        self.state = "running"
        logger.info(
            "polling %s with %s", [q.name for q in self.args.queues], self.args.poller.strategy
        )
        self.poller.start()

    async def _check_redelivery(self) -> None:
        """Leave level-1 tasks no replica could run for redelivery only while the Redis of
        Bella-Queue's queues fires the redelivery timer (``ray_worker.serve.redelivery``)."""
        if self.args.poller.process_timeout_s > 0:
            self.dispatcher.redelivers = await self.kit.redelivers(self.dispatcher.redelivers)

    async def _register_queues(self) -> None:
        endpoint = DEFAULT_ENDPOINT
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
        (``ray_worker.serve.answering.hand_over_answers``): this outbox retries each until its
        task's deadline. Raises while this poller stops too (the caller tries another)."""
        return self.kit.outbox.adopt(answers)

    async def report_load(self, report: dict[str, Any]) -> dict[str, Any]:
        """An LLM replica's load report (``ray_worker.hop.ReplicaLoad``, pushed when it
        changes and every ``load_heartbeat_s``).

        The answer carries the backlog of the replica's model, which the replica reports to
        the autoscaling policy (``ray_worker.serve.autoscaling``).
        """
        load = ReplicaLoad.from_report(report)
        self.capacity.report(load)
        self.outboxes.report(load)
        return {"backlog": self.poller.backlog(load.model_id) if load.model_id else 0}

    async def status(self) -> dict[str, Any]:
        """The worker's state: per pool take state, capacity and the replicas' outboxes
        (``ray_worker.worker.status``)."""
        state = self.state
        if state == "starting" and self.kit.error is not None:
            state = "waiting for Bella-Queue"
        return poller_status(
            state=state,
            startup_error=self.kit.error,
            args=self.args,
            poller=self.poller,
            dispatcher=self.dispatcher,
            outboxes=self.outboxes,
            clock_offset_ms=self.client.clock.offset_ms,
            complete_retries=self.client.counters.complete_retries,
            metrics=self.metrics,
            events=self.kit.events.stats(),
            publisher=await self._publisher_stats(),
        )

    async def _publisher_stats(self) -> dict[str, Any] | None:
        """This node's publisher actor: buffered, published, and what it gave up (tasks whole,
        events by kind) after Redis outages. None while it is not reachable. One call to the
        actor per ``_PUBLISHER_MAX_AGE_S`` at most, shared by concurrent callers."""
        return await self._publisher_cache.get()

    async def _fetch_publisher_stats(self) -> dict[str, Any] | None:
        events = self.kit.events
        actor = events.actor if events.started else None
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
        if self.kit.events.started:
            try:
                # A dead publisher is replaced there (re-attach); only one that stays broken
                # fails the check.
                await asyncio.wait_for(self.kit.events.check_health(), 30)
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
        await self.kit.aclose(settle_s=5.0, hand_over_s=10.0, close_s=10.0)
        self.state = "stopped"
