"""The worker's async HTTP client of Bella-Queue: register, take, complete, and what it reads.

This module owns the calls the worker makes (§1.1, §1.2, §1.4, §1.5, §1.7): registering its
queues, takes (one unreadable entry rejected, the rest kept), ``complete`` with its own
connection pool and its retry policy, the event-bus settings, a queue's metadata and stats.
:class:`QueueClient` builds on :class:`~ray_worker.bella.producer.ProducerClient` (task and
batch status, which the cancel watch reads; the producer's puts, files and batches, which dev
tools and tests send through the same client), and that on
:class:`~ray_worker.bella.transport.BellaHttp` (the session, the envelopes and the error
mapping: every failure leaves as a class from :mod:`ray_worker.errors`).

It must not log or ``repr`` the API key, nor a task's ``ak``, nor put either in an exception.
It must not retry anything but ``complete`` (puts and takes are not idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr, ValidationError

from ray_worker.aio import jittered
from ray_worker.bella.http11 import KeptHttp11, usable_for
from ray_worker.bella.producer import BlockingResult, ProducerClient, SSEEvent
from ray_worker.bella.protocol import (
    EventBusConfig,
    RegisterRequest,
    TakeRequest,
    TakeResponse,
    describe_validation,
)
from ray_worker.bella.transport import parse_body
from ray_worker.errors import AuthenticationError, BadRequestError, QueueUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff for ``complete``.

    ``attempts`` counts the first call; retry ``n`` (1-based) waits
    ``min(max_delay_s, base_delay_s * 2 ** (n - 1))`` scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``.
    """

    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter must be within [0, 1]")

    def delay_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        base = min(self.max_delay_s, self.base_delay_s * 2.0 ** max(0, retry - 1))
        if self.jitter == 0 or base == 0:
            return base
        return jittered(base, (1 - self.jitter, 1 + self.jitter), rng)


@dataclass
class QueueClientCounters:
    """Counters metrics code reads; plain ints, only ever incremented."""

    complete_retries: int = 0
    """Retries of ``complete`` after a retryable fault (the first attempt is not counted)."""
    complete_failures: int = 0
    """``complete`` calls that gave up and raised."""


class QueueClient(ProducerClient):
    """The Bella-Queue HTTP API, async; one instance per actor, closed with :meth:`aclose`.

    ``base_url`` is the server root (``http://127.0.0.1:8080``); paths are added here.
    """

    def __init__(
        self,
        base_url: str,
        apikey: str | SecretStr,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 100,
        complete_max_connections: int = 32,
        complete_retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_connections < 1 or complete_max_connections < 1:
            raise ValueError("max_connections and complete_max_connections must be at least 1")
        super().__init__(
            base_url,
            apikey,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            transport=transport,
        )
        self.complete_retry = complete_retry or RetryPolicy()
        self.counters = QueueClientCounters()
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._rng = random.Random()
        # Completes get a pool of their own: a burst of answers retried through an outage
        # cannot hold every connection a take needs, nor long takes starve the answers.
        self._complete_client = self._http(complete_max_connections, transport)
        # Takes, most of them empty while the worker idles, go over kept connections of their
        # own at a tenth of httpx's CPU (see http11); an injected transport (tests) or a URL
        # httpx must handle (a proxy, credentials in it) keeps them on httpx.
        self._take_http: KeptHttp11 | None = None
        if transport is None and usable_for(self.base_url):
            self._take_http = KeptHttp11(
                self.base_url, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s
            )

    async def aclose(self) -> None:
        """Close the connection pools."""
        try:
            await self._complete_client.aclose()
            if self._take_http is not None:
                await self._take_http.aclose()
        finally:
            await super().aclose()

    # ----------------------------------------------------------------------------------
    # /v1/queue
    # ----------------------------------------------------------------------------------

    async def register(self, queue: str, endpoint: str) -> str:
        """``POST /v1/queue/register``; returns the queue name the server echoes (§1.1)."""
        body = RegisterRequest(queue=queue, endpoint=endpoint).to_wire()
        response = await self._request("POST", "/v1/queue/register", json_body=body)
        return self._string(response)

    async def take(self, request: TakeRequest) -> TakeResponse:
        """``POST /v1/queue/take`` (§1.4).

        Parsed one entry at a time: an entry the Task model cannot read lands in
        ``TakeResponse.rejected`` (the server has already popped it; the caller answers or
        logs it), and the rest of the answer is kept, also when one task is nested too deeply
        for the JSON parser (``TakeResponse.from_text``).

        A take that times out here may have been served: the server pops the tasks before it
        answers, and nothing tells it the answer never arrived. Level-0 tasks so lost are
        never answered (their producers' own waits end them); level-1 tasks come back after
        ``process_timeout`` when it was sent (§2.5), and are otherwise left ``queued``.
        """
        what = "POST /v1/queue/take"
        response = await self._request(
            "POST", "/v1/queue/take", json_body=request.to_wire(), kept=self._take_http
        )
        try:
            parsed = TakeResponse.from_text(response.text)
        except ValueError as exc:
            self._bad_body(response, what, str(exc))
        for invalid in parsed.rejected:
            task_id = invalid.raw.get("task_id") if isinstance(invalid.raw, dict) else None
            task_id = task_id if isinstance(task_id, str) else None
            logger.error(
                "skipping unreadable task %r from %r: %s",
                task_id,
                invalid.queue,
                invalid.reason,
                extra={"task_id": task_id, "queue": invalid.queue},
            )
        return parsed

    async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
        """``POST /v1/queue/{task_id}/complete``, retried on retryable faults (§1.5).

        Complete is idempotent on the server, so repeating it after a timeout is safe.
        Timeouts, connection errors, 5xx and answers from a gateway in front of Bella-Queue
        (:class:`QueueGatewayError`) are retried per ``complete_retry``, waiting at least
        their ``Retry-After`` (up to the policy's ``max_delay_s``); Bella-Queue's own 4xx and
        401 are not. After the last attempt the last error is raised. Completes use their
        own connection pool (``complete_max_connections``), apart from takes and every other
        call. An LLM replica makes one attempt per call and retries from its outbox
        (``ray_worker.task.outbox``) until the task expires.
        """
        path = f"/v1/queue/{quote(task_id, safe='')}/complete"
        body = dict(result)
        policy = self.complete_retry
        attempt = 1
        while True:
            try:
                await self._request("POST", path, json_body=body, client=self._complete_client)
                return
            except QueueUnavailableError as exc:
                if attempt >= policy.attempts:
                    self.counters.complete_failures += 1
                    logger.error(
                        "complete of %s failed after %d attempts: %s",
                        task_id,
                        attempt,
                        exc,
                        extra={"task_id": task_id, "attempt": attempt},
                    )
                    raise
                delay_s = policy.delay_s(attempt, self._rng)
                if exc.retry_after_s is not None:
                    delay_s = max(delay_s, min(exc.retry_after_s, policy.max_delay_s))
                self.counters.complete_retries += 1
                logger.warning(
                    "complete of %s failed (attempt %d/%d): %s; retrying in %.2f s",
                    task_id,
                    attempt,
                    policy.attempts,
                    exc,
                    delay_s,
                    extra={"task_id": task_id, "attempt": attempt},
                )
                await self._sleep(delay_s)
                attempt += 1
            except (AuthenticationError, BadRequestError):
                self.counters.complete_failures += 1
                raise

    async def eventbus(self) -> EventBusConfig:
        """``GET /v1/queue/eventbus``: the Redis URL (may embed a password) and topic (§1.2)."""
        what = "GET /v1/queue/eventbus"
        response = await self._request("GET", "/v1/queue/eventbus")
        body = self._json_object(response, what)
        try:
            return EventBusConfig.model_validate(body)
        except ValidationError as exc:
            self._bad_body(response, what, describe_validation(exc))

    async def metadata(self, queue: str) -> dict[str, Any] | None:
        """``GET /v1/queue/{queue}/metadata``: ``{endpoint, queue}``, ``None`` if unknown."""
        what = "GET /v1/queue/{queue}/metadata"
        response = await self._request("GET", f"/v1/queue/{quote(queue, safe='')}/metadata")
        if parse_body(response) is None:
            return None
        return self._json_object(response, what)

    async def stats(self, full_queue_name: str) -> dict[str, Any]:
        """``GET /v1/queue/{queue:level}/stats``: the server's queue counters (§1.7)."""
        what = "GET /v1/queue/{queue}/stats"
        path = f"/v1/queue/{quote(full_queue_name, safe=':')}/stats"
        response = await self._request("GET", path)
        if parse_body(response) is None:
            return {}
        return self._json_object(response, what)


__all__ = [
    # Re-exported: the answers of the producer calls a QueueClient carries.
    "BlockingResult",
    "QueueClient",
    "QueueClientCounters",
    "RetryPolicy",
    "SSEEvent",
]
