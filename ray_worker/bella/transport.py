"""The HTTP session to Bella-Queue that both of its clients build on.

This module owns what every call to Bella-Queue shares: one long-lived ``httpx.AsyncClient``
per client, the ``Authorization`` header, the spec's envelope quirks (§1.0: JSON string
literals, the callback-put ``{code, timestamp, data}`` wrapper, raw objects, error objects,
401 with an empty body), the server's clock from every answer's ``Date``, and the mapping of
every failure to a class from :mod:`ray_worker.errors`. The calls themselves live in
:mod:`ray_worker.bella.producer` (what a producer sends: puts, files, batches, cancel) and
:mod:`ray_worker.bella.client` (what the worker sends: register, take, complete, ...); the
three are the only modules that see httpx and its exceptions.

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

It must not log or ``repr`` the API key, nor put it in an exception, and it retries nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, NoReturn, Self

import httpx
from pydantic import SecretStr

from ray_worker.bella.clock import ServerClock
from ray_worker.bella.http11 import KeptHttp11
from ray_worker.bella.protocol import redact_url
from ray_worker.errors import (
    AuthenticationError,
    BadRequestError,
    QueueGatewayError,
    QueueUnavailableError,
)

_ERROR_BODY_KEYS = frozenset({"code", "message", "timestamp", "stacktrace"})


def parse_body(response: httpx.Response) -> Any:
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


def is_error_body(body: Any) -> bool:
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


class BellaHttp:
    """Authenticated requests to one Bella-Queue, their answers read and their errors mapped;
    closed with :meth:`aclose`. ``base_url`` is the server root (``http://127.0.0.1:8080``);
    paths are added by the calls."""

    def __init__(
        self,
        base_url: str,
        apikey: str | SecretStr,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {redact_url(base_url)!r}"
            )
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.shown_url = redact_url(self.base_url)
        """``base_url`` with its credentials hidden: what logs and errors show."""
        scheme_rest = self.base_url.partition("://")[2]
        self._userinfo = scheme_rest.rsplit("@", 1)[0] if "@" in scheme_rest else ""
        self._apikey = apikey if isinstance(apikey, SecretStr) else SecretStr(apikey)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.clock = ServerClock()
        """The server's clock, from the ``Date`` header of every answer (deadlines use it)."""
        self._client = self._http(max_connections, transport)

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
        return f"{type(self).__name__}(base_url={self.shown_url!r})"

    __str__ = __repr__

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._apikey.get_secret_value()}"}
        if extra:
            headers.update(extra)
        return headers

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
        kept: KeptHttp11 | None = None,
    ) -> httpx.Response:
        """Send one request; raise the mapped error for transport faults and non-2xx answers.

        ``kept``: send a POST of JSON through that client's kept connections instead of
        httpx (the take's path: a fraction of the CPU, the same answers and errors)."""
        what = f"{method} {path}"
        all_headers = self._headers(headers)
        content: bytes | None = None
        if json_body is not None:
            content = _json_bytes(json_body)
            all_headers["Content-Type"] = "application/json"
        sent_s = time.time()
        try:
            if kept is not None and method == "POST" and not (params or files or data):
                response = await kept.post(path, content or b"", all_headers)
            else:
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
        self._raise_status(status, parse_body(response), what, retry_after_s=retry_after_s)

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
        body = parse_body(response)
        if not isinstance(body, dict):
            self._bad_body(response, what, f"expected a JSON object, got {type(body).__name__}")
        return body

    def _string(self, response: httpx.Response) -> str:
        """A String controller's answer: a JSON string literal, tolerated as raw text (§1.0)."""
        body = parse_body(response)
        if isinstance(body, str):
            return body.strip().strip('"')
        if isinstance(body, dict) and "data" in body:
            return str(body["data"])
        if body is None:
            return ""
        return json.dumps(body)


__all__ = ["BellaHttp", "is_error_body", "parse_body"]
