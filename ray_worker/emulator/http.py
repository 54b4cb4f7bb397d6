"""The emulator's HTTP envelope (§1.0): answers, error bodies, request reading, middleware.

This module owns what every route of the emulator shares: Bella-Queue's JSON and error bodies
(``{code, message, timestamp[, stacktrace]}``), :func:`guarded` (no handler's exception ever
kills the server: it becomes the spec's 400 or 500), Jackson-like reading of request bodies,
multipart parsing, the SSE framing of Spring's ``SseEmitter``, and the two middlewares
(``Cache-Control`` and this server's ``Date``; Bearer auth on the protected prefixes). It knows
no route and no queue, and never logs an API key.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from email import policy
from email.parser import BytesParser
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ray_worker.bella.protocol import dumps, now_ms
from ray_worker.emulator.store import ApiError, bad_request, server_error

logger = logging.getLogger(__name__)

__all__ = [
    "PROTECTED_PREFIXES",
    "AuthMiddleware",
    "Handler",
    "HeadersMiddleware",
    "caller_key",
    "empty_response",
    "error_response",
    "format_sse",
    "guarded",
    "int_field",
    "json_response",
    "parse_multipart",
    "read_json",
    "read_object",
]


PROTECTED_PREFIXES = ("/v1/queue", "/v1/batches", "/v1/files", "/v1/console")


def format_sse(event_id: str | None, event_name: str | None, data: str) -> str:
    """One SSE event as Spring's ``SseEmitter`` writes it: ``id:``, ``event:``, ``data:``.

    ``data`` is written verbatim (Spring 5 does not split lines); a None id or name is omitted.
    """
    head = ""
    if event_id is not None:
        head += f"id:{event_id}\n"
    if event_name is not None:
        head += f"event:{event_name}\n"
    return f"{head}data:{data}\n\n"


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def empty_response(status: int = 200) -> Response:
    return Response(b"", status_code=status)


def error_response(status: int, message: str, stacktrace: str | None = None) -> Response:
    body: dict[str, Any] = {"code": status, "message": message, "timestamp": now_ms()}
    if stacktrace is not None:
        body["stacktrace"] = stacktrace
    return json_response(body, status)


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Turn every exception into the spec's 400/500 bodies so bad input never kills us."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status == 500:
                trace = "".join(traceback.format_exception(exc))
                return error_response(500, exc.message, trace)
            return error_response(exc.status, exc.message)
        except RedisError as exc:
            logger.warning("%s %s failed: Redis: %s", request.method, request.url.path, exc)
            return error_response(500, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    run.__name__ = handler.__name__
    return run


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise server_error("Required request body is missing")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise server_error(f"JSON parse error: {exc}") from None


async def read_object(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise server_error("JSON parse error: expected an object")
    return body


def int_field(body: Mapping[str, Any], name: str, default: int | None) -> int | None:
    """An Integer as Jackson reads it: ints or numeric strings; anything else → 500."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        raise server_error(f"JSON parse error: {name} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise server_error(f"JSON parse error: {name} must be an integer, got {value!r}")


def bearer_key(value: str | None) -> str | None:
    if not value or not value.startswith("Bearer "):
        return None
    return value[len("Bearer ") :].strip()


def caller_key(request: Request) -> str:
    """The Bearer key of an authenticated request (the auth middleware checked it)."""
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        key = bearer_key(request.query_params.get("Authorization"))
    return key or ""


class HeadersMiddleware:
    """``Cache-Control: no-cache`` on every response (§1.0), and the ``Date`` of this
    server's clock (uvicorn's own is turned off: it would show the machine's)."""

    def __init__(self, app: ASGIApp, clock_offset_s: float = 0.0) -> None:
        self.app = app
        self.clock_offset_s = clock_offset_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                own = (b"cache-control", b"date")
                headers = [(k, v) for k, v in message.get("headers", []) if k not in own]
                headers.append((b"cache-control", b"no-cache"))
                date = formatdate(time.time() + self.clock_offset_s, usegmt=True)
                headers.append((b"date", date.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


class AuthMiddleware:
    """Bearer auth on the protected prefixes; 401 with an empty body otherwise (§1.0)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = frozenset(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and path.startswith(PROTECTED_PREFIXES):
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            value = headers.get(b"authorization", b"").decode("latin-1")
            if not value:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                value = (query.get("Authorization") or [""])[0]
            key = bearer_key(value)
            if key is None or key not in self.keys:
                await empty_response(401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``name → (filename, bytes)`` of a multipart/form-data body (stdlib only)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise bad_request("Current request is not a multipart request")
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise bad_request("Malformed multipart body")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        parts[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return parts
