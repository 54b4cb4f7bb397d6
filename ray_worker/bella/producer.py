"""What a producer sends Bella-Queue: puts (callback, batch, blocking, streaming), files, batches.

This module owns the producer's side of the Bella-Queue API (§1.3, §1.6, §1.7, §1.9): the
puts with their waits and the SSE parsing of a streaming put, task and batch status, cancel,
files and batches. Only development tools, benchmarks and tests produce; the worker itself
reads a task's or a batch's status here (``task/cancel_watch.py``) and takes and answers through
:class:`~ray_worker.bella.client.QueueClient`, which builds on :class:`ProducerClient`. It must
not retry (puts are not idempotent), and it must not log or ``repr`` the API key nor put it in
an exception.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from ray_worker.bella.protocol import (
    DEFAULT_PUT_TIMEOUT_S,
    ONLINE_MAX_WAIT_S,
    QUEUE_NAME_HEADER,
    Batch,
    BatchRequest,
    PutRequest,
    ResponseMode,
    Task,
    describe_validation,
)
from ray_worker.bella.transport import BellaHttp, is_error_body, parse_body

ONLINE_WAIT_MARGIN_S = 30.0
"""Extra read time on blocking/streaming puts beyond the server's own wait."""


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


class ProducerClient(BellaHttp):
    """A producer's calls to Bella-Queue, async; closed with :meth:`aclose`."""

    # ----------------------------------------------------------------------------------
    # /v1/queue (§1.3, §1.6, §1.7)
    # ----------------------------------------------------------------------------------

    async def put(self, request: PutRequest) -> str:
        """``POST /v1/queue/put`` in callback or batch mode; returns the task id (§1.3)."""
        if request.effective_mode.is_online:
            raise ValueError(
                f"put() is for callback/batch puts; use put_blocking()/put_streaming() for "
                f"{request.effective_mode.value}"
            )
        what = "POST /v1/queue/put"
        response = await self._request("POST", "/v1/queue/put", json_body=request.to_wire())
        body = parse_body(response)
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
        body = parse_body(response)
        status = response.status_code
        if status == 401 or (status >= 400 and is_error_body(body)):
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

    async def cancel(self, task_id: str) -> str:
        """``POST /v1/queue/{task_id}/cancel`` (202); returns the task id (§1.6)."""
        path = f"/v1/queue/{quote(task_id, safe='')}/cancel"
        return self._string(await self._request("POST", path))

    async def get_task(self, task_id: str) -> Task:
        """``GET /v1/queue/{task_id}``: an offline task with its ``result`` (§1.7)."""
        what = "GET /v1/queue/{task_id}"
        response = await self._request("GET", f"/v1/queue/{quote(task_id, safe='')}")
        body = self._json_object(response, what)
        try:
            return Task.model_validate(body)
        except ValidationError as exc:
            self._bad_body(response, what, describe_validation(exc))

    def _online_timeout(self, request: PutRequest) -> httpx.Timeout:
        wait_s = online_wait_s(request) + ONLINE_WAIT_MARGIN_S
        return httpx.Timeout(max(self.timeout_s, wait_s), connect=self.connect_timeout_s)

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
    "ProducerClient",
    "SSEEvent",
    "online_wait_s",
]
