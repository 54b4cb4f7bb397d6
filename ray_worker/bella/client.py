"""Async HTTP client of the Bella-Queue API (``/v1/queue``, ``/v1/batches``, ``/v1/files``).

This module owns every HTTP call the package makes to Bella-Queue: one long-lived
``httpx.AsyncClient`` per :class:`QueueClient`, the spec's envelope quirks (§1.0: JSON
string literals, the callback-put ``{code, timestamp, data}`` wrapper, raw objects, error
objects, 401 with an empty body), SSE parsing of streaming puts, and the retry of
``complete``. It is the only module that sees httpx and its exceptions: every failure leaves
it as a class from :mod:`ray_worker.errors`.

Error mapping:

- httpx timeouts, connection and protocol errors → :class:`QueueUnavailableError` (no status);
- HTTP 5xx → ``QueueUnavailableError(server message, status_code, retry_after_s)``;
- HTTP 401 → :class:`AuthenticationError` (Bella-Queue's own 401 has an empty body, so a
  gateway's cannot be told from it; both mean the key was not accepted);
- a 4xx with Bella-Queue's error body ``{code, message, timestamp[, stacktrace]}`` (§1.0) →
  ``BadRequestError(server message, status_code)``: Bella-Queue itself refused the request;
- any other 3xx/4xx (HTML, empty, foreign JSON) → :class:`QueueGatewayError` (retryable): a
  gateway, WAF or proxy in front of Bella-Queue answered, not Bella-Queue;
- ``retry_after_s`` on the retryable ones is the answer's ``Retry-After`` (delay-seconds or
  an HTTP date, taken against the answer's own ``Date``), ``None`` without one;
- a 2xx whose body is not what the endpoint promises (not JSON, wrong shape) →
  ``QueueUnavailableError(..., status_code)``: the server, or a proxy in front of it,
  misbehaved, and a later call may well succeed.

It must not log or ``repr`` the API key, nor a task's ``ak``, nor put either in an exception.
It must not retry anything but ``complete`` (puts and takes are not idempotent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
from pydantic import SecretStr, ValidationError

from ray_worker.bella.clock import ServerClock
from ray_worker.bella.protocol import (
    DEFAULT_PUT_TIMEOUT_S,
    ONLINE_MAX_WAIT_S,
    QUEUE_NAME_HEADER,
    Batch,
    BatchRequest,
    EventBusConfig,
    PutRequest,
    RegisterRequest,
    ResponseMode,
    TakeRequest,
    TakeResponse,
    Task,
    describe_validation,
    redact_url,
)
from ray_worker.errors import (
    AuthenticationError,
    BadRequestError,
    QueueGatewayError,
    QueueUnavailableError,
)

logger = logging.getLogger(__name__)

ONLINE_WAIT_MARGIN_S = 30.0
"""Extra read time on blocking/streaming puts beyond the server's own wait."""

_ERROR_BODY_KEYS = frozenset({"code", "message", "timestamp", "stacktrace"})


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
        factor = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return base * factor


@dataclass
class QueueClientCounters:
    """Counters metrics code reads; plain ints, only ever incremented."""

    complete_retries: int = 0
    """Retries of ``complete`` after a retryable fault (the first attempt is not counted)."""
    complete_failures: int = 0
    """``complete`` calls that gave up and raised."""


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event of a streaming put.

    ``id`` and ``event`` are the fields set in this event's own block (``""`` when absent);
    ``data`` is its ``data:`` lines joined with ``"\\n"``.
    """

    id: str
    event: str
    data: str


@dataclass(frozen=True)
class BlockingResult:
    """The HTTP answer to a blocking put: the worker's ``status_code`` and ``body`` (§1.3).

    ``body`` is the parsed JSON, or the raw text when it is not JSON, or ``None`` when empty.
    When the server gave up waiting it answers 408 with an empty body and cancels the task:
    that comes back as ``BlockingResult(408, None)`` and ``timed_out`` is true (a worker's own
    408 carries a body, so it is not confused with it).
    """

    status_code: int
    body: Any = None

    @property
    def timed_out(self) -> bool:
        """The server's wait expired (HTTP 408, empty body); the task was cancelled."""
        return self.status_code == 408 and self.body is None

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status_code < 300


def online_wait_s(request: PutRequest) -> float:
    """How long the server waits for the worker on an online put: ``timeout`` capped at 600 s."""
    timeout = request.timeout if request.timeout and request.timeout > 0 else DEFAULT_PUT_TIMEOUT_S
    return float(min(timeout, ONLINE_MAX_WAIT_S))


def _parse_body(response: httpx.Response) -> Any:
    """JSON if it parses, else the raw text; ``None`` for an empty body.

    Invalid UTF-8 is decoded with replacement characters (httpx's ``text``); JSON nested too
    deeply for the parser counts as not JSON.
    """
    text = response.text
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _json_bytes(obj: Any) -> bytes:
    """``obj`` as httpx would send it, except that a lone surrogate (e.g. echoed from a task)
    goes out as its JSON escape ``\\udXXX`` instead of failing the request: the body stays
    valid UTF-8 and valid JSON."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "backslashreplace")


def _is_error_body(body: Any) -> bool:
    """The server's own ``{code, message, timestamp[, stacktrace]}`` error object (§1.0)."""
    return (
        isinstance(body, dict)
        and "code" in body
        and "timestamp" in body
        and set(body) <= _ERROR_BODY_KEYS
    )


def _is_bella_body(body: Any) -> bool:
    """Bella-Queue's own answer to a failed call: its error object, or the put wrapper
    ``{code, timestamp, data?, message?}`` (§1.0). Nothing in front of it writes these."""
    return (
        isinstance(body, dict)
        and isinstance(body.get("code"), int)
        and "timestamp" in body
        and set(body) <= _ERROR_BODY_KEYS | {"data"}
    )


def _http_date_s(value: str) -> float | None:
    """Epoch seconds of an HTTP date (a zone-less one read as GMT); ``None`` if unreadable."""
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _retry_after_s(value: str | None, date: str | None, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds, or an HTTP date taken
    against the same answer's ``Date`` (so a skewed server clock does not matter), else
    against ``now_s``. ``None`` when absent or unreadable; never negative."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        at_s = _http_date_s(value)
        if at_s is None:
            return None
        sent_s = _http_date_s(date) if date else None
        seconds = at_s - (now_s if sent_s is None else sent_s)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _gateway_message(body: Any, status_code: int, what: str) -> str:
    """What a 3xx/4xx from something in front of Bella-Queue says, kept short (an HTML page
    is cut to its first words)."""
    said = " ".join(_error_message(body, status_code, what).split())
    if len(said) > 200:
        said = said[:200] + "…"
    return (
        f"HTTP {status_code} from {what} without Bella-Queue's error body: a gateway or proxy "
        f"in front of it answered, or BELLA_QUEUE_URL is not the Bella-Queue base URL ({said})"
    )


def _error_message(body: Any, status_code: int, what: str) -> str:
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return f"HTTP {status_code} from {what}"


class QueueClient:
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
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {redact_url(base_url)!r}"
            )
        if max_connections < 1 or complete_max_connections < 1:
            raise ValueError("max_connections and complete_max_connections must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.shown_url = redact_url(self.base_url)
        """``base_url`` with its credentials hidden: what logs and errors show."""
        scheme_rest = self.base_url.partition("://")[2]
        self._userinfo = scheme_rest.rsplit("@", 1)[0] if "@" in scheme_rest else ""
        self._apikey = apikey if isinstance(apikey, SecretStr) else SecretStr(apikey)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.complete_retry = complete_retry or RetryPolicy()
        self.counters = QueueClientCounters()
        self.clock = ServerClock()
        """The server's clock, from the ``Date`` header of every answer (deadlines use it)."""
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._rng = random.Random()
        self._client = self._http(max_connections, transport)
        # Completes get a pool of their own: a burst of answers retried through an outage
        # cannot hold every connection a take needs, nor long takes starve the answers.
        self._complete_client = self._http(complete_max_connections, transport)

    def _http(
        self, max_connections: int, transport: httpx.AsyncBaseTransport | None
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=min(max_connections, 20),
            ),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"QueueClient(base_url={self.shown_url!r})"

    __str__ = __repr__

    async def aclose(self) -> None:
        """Close the connection pools."""
        try:
            await self._complete_client.aclose()
        finally:
            await self._client.aclose()

    async def __aenter__(self) -> QueueClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ----------------------------------------------------------------------------------
    # Transport and envelopes
    # ----------------------------------------------------------------------------------

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._apikey.get_secret_value()}"}
        if extra:
            headers.update(extra)
        return headers

    def _online_timeout(self, request: PutRequest) -> httpx.Timeout:
        wait_s = online_wait_s(request) + ONLINE_WAIT_MARGIN_S
        return httpx.Timeout(max(self.timeout_s, wait_s), connect=self.connect_timeout_s)

    def _raise_transport(self, exc: httpx.HTTPError, what: str) -> NoReturn:
        # httpx messages carry no headers, so the key cannot leak through them; a URL with
        # credentials could, so every message goes through _scrub.
        if isinstance(exc, httpx.TimeoutException):
            message = f"{what} timed out ({type(exc).__name__})"
        elif isinstance(exc, httpx.ConnectError):
            message = f"cannot connect to Bella-Queue at {self.shown_url}: {exc}"
        else:
            message = f"{what} failed: {type(exc).__name__}: {exc}"
        raise QueueUnavailableError(self._scrub(message)) from exc

    def _scrub(self, text: str) -> str:
        """``text`` with the base URL's credentials hidden."""
        text = text.replace(self.base_url, self.shown_url)
        if self._userinfo:
            text = text.replace(self._userinfo, "***")
        return text

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str | int] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        """Send one request; raise the mapped error for transport faults and non-2xx answers."""
        what = f"{method} {path}"
        all_headers = self._headers(headers)
        content: bytes | None = None
        if json_body is not None:
            content = _json_bytes(json_body)
            all_headers["Content-Type"] = "application/json"
        sent_s = time.time()
        try:
            response = await (client or self._client).request(
                method,
                path,
                content=content,
                params=params,
                files=files,
                data=data,
                headers=all_headers,
            )
        except httpx.HTTPError as exc:
            self._raise_transport(exc, what)
        self.clock.observe(response.headers.get("date"), sent_s, time.time())
        self._check_status(response, what)
        return response

    def _check_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        retry_after_s = _retry_after_s(
            response.headers.get("retry-after"), response.headers.get("date"), time.time()
        )
        self._raise_status(status, _parse_body(response), what, retry_after_s=retry_after_s)

    def _raise_status(
        self, status: int, body: Any, what: str, *, retry_after_s: float | None = None
    ) -> NoReturn:
        """Raise the error of a non-2xx answer: who answered decides whether retrying can
        help. Only Bella-Queue's own 4xx (its error body) says the request itself is wrong."""
        if status == 401:
            raise AuthenticationError(
                f"Bella-Queue rejected the API key on {what} (HTTP 401): check "
                "BELLA_QUEUE_APIKEY (sent as 'Authorization: Bearer <key>')"
            )
        if status >= 500:
            raise QueueUnavailableError(_error_message(body, status, what), status, retry_after_s)
        if 400 <= status < 500 and _is_bella_body(body):
            raise BadRequestError(_error_message(body, status, what), status)
        raise QueueGatewayError(_gateway_message(body, status, what), status, retry_after_s)

    def _bad_body(self, response: httpx.Response, what: str, detail: str) -> NoReturn:
        raise QueueUnavailableError(
            f"unexpected answer to {what} (HTTP {response.status_code}): {detail}",
            response.status_code,
        )

    def _json_object(self, response: httpx.Response, what: str) -> dict[str, Any]:
        body = _parse_body(response)
        if not isinstance(body, dict):
            self._bad_body(response, what, f"expected a JSON object, got {type(body).__name__}")
        return body

    def _string(self, response: httpx.Response) -> str:
        """A String controller's answer: a JSON string literal, tolerated as raw text (§1.0)."""
        body = _parse_body(response)
        if isinstance(body, str):
            return body.strip().strip('"')
        if isinstance(body, dict) and "data" in body:
            return str(body["data"])
        if body is None:
            return ""
        return json.dumps(body)

    # ----------------------------------------------------------------------------------
    # /v1/queue
    # ----------------------------------------------------------------------------------

    async def register(self, queue: str, endpoint: str) -> str:
        """``POST /v1/queue/register``; returns the queue name the server echoes (§1.1)."""
        body = RegisterRequest(queue=queue, endpoint=endpoint).to_wire()
        response = await self._request("POST", "/v1/queue/register", json_body=body)
        return self._string(response)

    async def put(self, request: PutRequest) -> str:
        """``POST /v1/queue/put`` in callback or batch mode; returns the task id (§1.3)."""
        if request.effective_mode.is_online:
            raise ValueError(
                f"put() is for callback/batch puts; use put_blocking()/put_streaming() for "
                f"{request.effective_mode.value}"
            )
        what = "POST /v1/queue/put"
        response = await self._request("POST", "/v1/queue/put", json_body=request.to_wire())
        body = _parse_body(response)
        if isinstance(body, dict):
            code = body.get("code", response.status_code)
            if isinstance(code, int) and code >= 300:
                self._raise_status(code, body, what)
            task_id = body.get("data")
            if isinstance(task_id, str) and task_id:
                return task_id
            self._bad_body(response, what, "the wrapper carries no task id in 'data'")
        # Tolerated: a bare JSON string literal. Plain text is not (an HTML error page from
        # a proxy must not become a task id).
        if isinstance(body, str) and body and response.text.lstrip().startswith('"'):
            return body
        self._bad_body(response, what, "expected {code, timestamp, data}")

    def _online_request(self, request: PutRequest, mode: ResponseMode) -> PutRequest:
        if request.response_mode is None:
            return request.model_copy(update={"response_mode": mode})
        if request.response_mode is not mode:
            raise ValueError(
                f"put_{mode.value}() needs response_mode={mode.value!r}, "
                f"got {request.response_mode.value!r}"
            )
        return request

    async def put_blocking(self, request: PutRequest) -> BlockingResult:
        """A blocking put: waits for the worker and returns its ``status_code`` and ``body``.

        ``response_mode`` may be left unset (it is filled in). The server's own errors (its
        ``{code, message, timestamp}`` objects, 401) raise as usual; any other status is the
        worker's answer and is returned. The server's wait timeout comes back as
        ``BlockingResult(408, None)`` (``timed_out``).
        """
        request = self._online_request(request, ResponseMode.BLOCKING)
        what = "POST /v1/queue/put"
        try:
            response = await self._client.post(
                "/v1/queue/put",
                json=request.to_wire(),
                headers=self._headers(),
                timeout=self._online_timeout(request),
            )
        except httpx.HTTPError as exc:
            self._raise_transport(exc, what)
        body = _parse_body(response)
        status = response.status_code
        if status == 401 or (status >= 400 and _is_error_body(body)):
            self._raise_status(status, body, what)
        return BlockingResult(status_code=status, body=body)

    async def put_streaming(self, request: PutRequest) -> AsyncGenerator[SSEEvent, None]:
        """A streaming put: yields the SSE events until the server closes the stream.

        ``response_mode`` may be left unset (it is filled in). A non-2xx answer raises the
        mapped error before any event; a stream cut short by a fault raises
        :class:`QueueUnavailableError`. The completion event has no SSE form: the stream
        simply ends (§4.4). A consumer that stops early should ``aclose()`` the generator
        (``contextlib.aclosing``) so the connection is released at once.
        """
        request = self._online_request(request, ResponseMode.STREAMING)
        what = "POST /v1/queue/put"
        try:
            async with self._client.stream(
                "POST",
                "/v1/queue/put",
                json=request.to_wire(),
                headers=self._headers({"Accept": "text/event-stream"}),
                timeout=self._online_timeout(request),
            ) as response:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    self._check_status(response, what)
                async for event in _iter_sse(response.aiter_lines()):
                    yield event
        except httpx.HTTPError as exc:
            self._raise_transport(exc, what)

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
        response = await self._request("POST", "/v1/queue/take", json_body=request.to_wire())
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

    async def cancel(self, task_id: str) -> str:
        """``POST /v1/queue/{task_id}/cancel`` (202); returns the task id (§1.6)."""
        path = f"/v1/queue/{quote(task_id, safe='')}/cancel"
        return self._string(await self._request("POST", path))

    async def eventbus(self) -> EventBusConfig:
        """``GET /v1/queue/eventbus``: the Redis URL (may embed a password) and topic (§1.2)."""
        what = "GET /v1/queue/eventbus"
        response = await self._request("GET", "/v1/queue/eventbus")
        body = self._json_object(response, what)
        try:
            return EventBusConfig.model_validate(body)
        except ValidationError as exc:
            self._bad_body(response, what, describe_validation(exc))

    async def get_task(self, task_id: str) -> Task:
        """``GET /v1/queue/{task_id}``: an offline task with its ``result`` (§1.7)."""
        what = "GET /v1/queue/{task_id}"
        response = await self._request("GET", f"/v1/queue/{quote(task_id, safe='')}")
        body = self._json_object(response, what)
        try:
            return Task.model_validate(body)
        except ValidationError as exc:
            self._bad_body(response, what, describe_validation(exc))

    async def metadata(self, queue: str) -> dict[str, Any] | None:
        """``GET /v1/queue/{queue}/metadata``: ``{endpoint, queue}``, ``None`` if unknown."""
        what = "GET /v1/queue/{queue}/metadata"
        response = await self._request("GET", f"/v1/queue/{quote(queue, safe='')}/metadata")
        if _parse_body(response) is None:
            return None
        return self._json_object(response, what)

    async def stats(self, full_queue_name: str) -> dict[str, Any]:
        """``GET /v1/queue/{queue:level}/stats``: the server's queue counters (§1.7)."""
        what = "GET /v1/queue/{queue}/stats"
        path = f"/v1/queue/{quote(full_queue_name, safe=':')}/stats"
        response = await self._request("GET", path)
        if _parse_body(response) is None:
            return {}
        return self._json_object(response, what)

    # ----------------------------------------------------------------------------------
    # /v1/files and /v1/batches (§1.9)
    # ----------------------------------------------------------------------------------

    async def upload_file(
        self, content: bytes, filename: str, purpose: str = "batch"
    ) -> dict[str, Any]:
        """``POST /v1/files`` (multipart ``file`` + ``purpose``); returns the file object."""
        response = await self._request(
            "POST",
            "/v1/files",
            files={"file": (filename, content, "application/octet-stream")},
            data={"purpose": purpose},
        )
        return self._json_object(response, "POST /v1/files")

    async def file_content(self, file_id: str) -> bytes:
        """``GET /v1/files/{file_id}/content``: the raw bytes."""
        response = await self._request("GET", f"/v1/files/{quote(file_id, safe='')}/content")
        return response.content

    async def create_batch(self, request: BatchRequest, queue: str | None = None) -> Batch:
        """``POST /v1/batches``; ``queue`` goes in ``X-BELLA-QUEUE-NAME`` (routed if absent)."""
        headers = {QUEUE_NAME_HEADER: queue} if queue else None
        response = await self._request(
            "POST", "/v1/batches", json_body=request.to_wire(), headers=headers
        )
        return self._batch(response, "POST /v1/batches")

    async def get_batch(self, batch_id: str) -> Batch:
        """``GET /v1/batches/{batch_id}``."""
        response = await self._request("GET", f"/v1/batches/{quote(batch_id, safe='')}")
        return self._batch(response, "GET /v1/batches/{id}")

    async def list_batches(self, limit: int = 20, after: str | None = None) -> list[Batch]:
        """``GET /v1/batches?limit=&after=``: one page of the OpenAI list ``{object, data}``."""
        what = "GET /v1/batches"
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        response = await self._request("GET", "/v1/batches", params=params)
        body = self._json_object(response, what)
        data = body.get("data", [])
        if not isinstance(data, list):
            self._bad_body(response, what, "'data' is not a list")
        try:
            return [Batch.model_validate(item) for item in data]
        except ValidationError as exc:
            self._bad_body(response, what, describe_validation(exc))

    async def cancel_batch(self, batch_id: str) -> Batch:
        """``POST /v1/batches/{batch_id}/cancel`` (202)."""
        response = await self._request("POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel")
        return self._batch(response, "POST /v1/batches/{id}/cancel")

    def _batch(self, response: httpx.Response, what: str) -> Batch:
        body = self._json_object(response, what)
        try:
            return Batch.model_validate(body)
        except ValidationError as exc:
            self._bad_body(response, what, describe_validation(exc))


async def _iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[SSEEvent]:
    """Parse ``text/event-stream`` lines into events (WHATWG rules, leniently).

    Comments (``:``) and unknown fields are skipped; one space after the colon is dropped;
    ``data:`` lines join with ``"\\n"``; a blank line dispatches an event that has data. An
    event still pending when the stream ends is yielded too (the strict rule drops it).
    """
    event_id = ""
    event_name = ""
    data_lines: list[str] = []
    has_data = False
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if has_data:
                yield SSEEvent(id=event_id, event=event_name, data="\n".join(data_lines))
            event_id, event_name, data_lines, has_data = "", "", [], False
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data_lines.append(value)
            has_data = True
        elif field == "event":
            event_name = value
        elif field == "id" and "\0" not in value:
            event_id = value
    if has_data:
        yield SSEEvent(id=event_id, event=event_name, data="\n".join(data_lines))


__all__ = [
    "ONLINE_WAIT_MARGIN_S",
    "BlockingResult",
    "QueueClient",
    "QueueClientCounters",
    "RetryPolicy",
    "SSEEvent",
    "online_wait_s",
]
