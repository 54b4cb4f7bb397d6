"""The answering kit: what a host needs to answer tasks, built one way for the poller and
for every LLM replica.

This module owns the host's ``QueueClient`` (HTTP complete: one attempt per call) behind its
``Outbox`` (which retries each answer until its task expires), its ``EventBusClient`` (this
node's publisher actor), finding the event bus (``GET /v1/queue/eventbus``, retried with
backoff while Bella-Queue is away), reading whether Bella-Queue's Redis redelivers level-1
tasks (``ray_worker.serve.redelivery``), and the close: what the outbox still holds after a
few seconds goes to a live poller (``hand_over_answers``), then the clients close.

It must not hold task or take logic: the hosts (``QueuePoller`` in ``ray_worker.serve.poller_host``,
``ReplicaTasks`` in ``ray_worker.serve.task_host``) wire it to their plain classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pydantic import SecretStr
from ray import serve

from ray_worker.aio import SPREAD, Backoff
from ray_worker.bella.client import QueueClient, RetryPolicy
from ray_worker.config import DispatcherConfig, PublisherOptions
from ray_worker.errors import WorkerError
from ray_worker.eventbus.client import EventBusClient
from ray_worker.hop import POLLER_DEPLOYMENT
from ray_worker.metrics import WorkerMetrics
from ray_worker.serve.ray_errors import translate_ray_error
from ray_worker.serve.redelivery import redelivery_missing
from ray_worker.task.outbox import Outbox

logger = logging.getLogger(__name__)

__all__ = ["AnsweringKit", "hand_over_answers"]

_CONNECT_BACKOFF_S = (0.5, 10.0)
"""First and longest wait between tries to find the event bus."""


class AnsweringKit:
    """A host's queue client, outbox and event-bus client, with their start and close."""

    def __init__(
        self,
        queue_url: str,
        apikey: SecretStr,
        *,
        timeout_s: float,
        dispatch: DispatcherConfig,
        publisher: PublisherOptions,
        eventbus_url: str | None,
        app_name: str,
        client_id: str,
        metrics: WorkerMetrics,
    ) -> None:
        self.app_name = app_name
        self.client = QueueClient(
            queue_url,
            apikey,
            timeout_s=timeout_s,
            complete_max_connections=dispatch.complete_max_connections,
            # One attempt per call: the outbox owns the retries and their deadline.
            complete_retry=RetryPolicy(attempts=1),
        )
        self.outbox = Outbox(self.client, dispatch, metrics=metrics, clock=self.client.clock.now_s)
        # Bella-Queue's clock: the publisher trims streams (MINID) by the server's time.
        self.events = EventBusClient(app_name, client_id, publisher, clock=self.client.clock)
        self._eventbus_url = eventbus_url
        self.bus_url = ""
        """The event bus's Redis URL once ``connect`` found it."""
        self.error: str | None = None
        """Why the event bus is not reached yet (None once it is)."""
        self.ready = asyncio.Event()
        """Set once ``connect`` attached to the publisher: online answers can leave."""

    async def connect(self) -> str:
        """Find the event bus (``eventbus_url`` overrides the URL Bella-Queue reports) and
        attach to this node's publisher, retrying with backoff while either fails; returns
        the bus's URL."""
        backoff = Backoff(*_CONNECT_BACKOFF_S, jitter=SPREAD)
        while True:
            try:
                eventbus = await self.client.eventbus()
            except WorkerError as err:
                self.error = f"GET /v1/queue/eventbus failed: {err}"
            else:
                url = self._eventbus_url or eventbus.url
                try:
                    await self.events.start(url, eventbus.topic)
                    break
                except WorkerError as err:
                    self.error = f"event bus not reachable yet: {err}"
            wait_s = backoff.next_s()
            logger.warning("%s; retrying in %.1fs", self.error, wait_s)
            await asyncio.sleep(wait_s)
        self.bus_url = url
        self.error = None
        self.ready.set()
        return url

    async def redelivers(self, believed: bool) -> bool:
        """Whether the Redis of Bella-Queue's queues fires the redelivery timer, read now
        (``ray_worker.serve.redelivery``); ``believed`` when it cannot be read (the bus not
        found yet, or the check failed: a check never stops a start or a stop). A change is
        logged."""
        if not self.bus_url:
            return believed
        try:
            why = await redelivery_missing(self.bus_url)
        except Exception as err:
            logger.debug("redelivery check failed: %r", err)
            return believed
        redelivers = why is None
        if redelivers != believed:
            if why is not None:
                logger.warning("%s", why)
            else:
                logger.info("Bella-Queue's redelivery works again: level-1 tasks are left to it")
        return redelivers

    async def aclose(self, *, settle_s: float, hand_over_s: float, close_s: float) -> int:
        """The outbox delivers what it can within ``settle_s``; what is left goes to a live
        poller within ``hand_over_s`` (``hand_over_answers``); the event-bus client gets
        ``close_s`` to close, then the queue client closes. Returns how many answers were
        given up (each logged at ERROR with its task id)."""
        undelivered = await hand_over_answers(
            self.outbox, self.app_name, settle_s=settle_s, timeout_s=hand_over_s
        )
        if undelivered:
            logger.error(
                "%d answers were not delivered before the stop (see the errors above)",
                undelivered,
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.events.aclose(), close_s)
        await self.client.aclose()
        return undelivered


async def hand_over_answers(
    outbox: Outbox,
    app_name: str,
    *,
    settle_s: float,
    timeout_s: float = 10.0,
    deployment_name: str = POLLER_DEPLOYMENT,
) -> int:
    """At a stop: deliver what ``outbox`` can within ``settle_s``, then hand what is left to a
    live ``QueuePoller`` replica of ``app_name`` (``adopt_answers``: its outbox keeps retrying
    each until its task's deadline), so a downscale or redeploy during a Bella-Queue outage
    loses no answer. A poller that refuses (it stops too) or cannot be reached is asked again
    (Serve routes the next call to a live replica, the new one of a redeploy) until
    ``timeout_s``; what no poller takes then (the whole app stops, say) is given up, logged at
    ERROR per task id. Returns how many were given up."""
    if await outbox.settle(settle_s) == 0:
        return await outbox.drain(0)
    answers = outbox.hand_over()
    deadline = time.monotonic() + timeout_s
    handle = serve.get_deployment_handle(deployment_name, app_name, _record_telemetry=False)
    while True:
        try:
            left_s = max(deadline - time.monotonic(), 0.1)
            taken = await asyncio.wait_for(handle.adopt_answers.remote(answers), left_s)
            break
        except Exception as err:
            if time.monotonic() >= deadline:
                outbox.lost(
                    answers, f"no live poller took it at the stop: {translate_ray_error(err)}"
                )
                return len(answers)
            await asyncio.sleep(0.5)
    logger.warning(
        "handed %d undelivered answers to a live poller (it retries them until their tasks expire)",
        taken,
    )
    return 0
