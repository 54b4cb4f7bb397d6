"""A faithful local Bella-Queue: the HTTP API of spec §1 over a real Redis (spec §9.2).

This module owns the emulator's HTTP surface (a Starlette app: auth, envelopes, status codes,
blocking and streaming puts answered from the event bus, callback delivery), its
configuration, an :class:`EmulatorServer` that runs it under uvicorn in a background thread
for tests, notebooks and the demo, and the ``python -m ray_worker.emulator.server`` CLI.
Queue semantics live in :mod:`emulator_store`, the event-bus reader in :mod:`emulator_events`,
files and batches in :mod:`emulator_batches`.

It must not be imported by the worker itself, must never die on bad input (every handler
answers 400/500 per spec §1.0 and keeps serving), and never logs an API key or a task's ``ak``.

Emulator extensions, absent from a real server (clients must tolerate their absence):
``GET /v1/queue/{q:level}/stats`` also returns ``pending`` (tasks waiting in that queue);
``/v1/files`` is a local file store; a put or batch without ``queue`` is routed through
``EmulatorConfig.routes`` (model → queue) or to a registered queue named like the model.

Test control (no HTTP surface): :meth:`EmulatorServer.fail_completes` makes
``POST /v1/queue/{id}/complete`` answer a given status, body and headers without completing
anything, as a gateway or WAF in front of Bella-Queue would, until
:meth:`EmulatorServer.heal_completes`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email import policy
from email.parser import BytesParser
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import httpx
import uvicorn
from pydantic import ValidationError
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ray_worker.bella.protocol import (
    DEFAULT_PUT_TIMEOUT_S,
    ONLINE_MAX_WAIT_S,
    QUEUE_NAME_HEADER,
    CompletionEvent,
    ProgressEvent,
    PutRequest,
    ResponseMode,
    TakeStrategy,
    dumps,
    now_ms,
    parse_full_queue_name,
    redact_url,
    sse_data,
)
from ray_worker.emulator.batches import BatchManager, FileStore
from ray_worker.emulator.events import EventBusReader, StreamEvent
from ray_worker.emulator.store import (
    ApiError,
    CompletedTask,
    QueueMeta,
    QueueStore,
    TakeParams,
    bad_request,
    server_error,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CompleteFaults",
    "EmulatorConfig",
    "EmulatorServer",
    "create_app",
    "format_sse",
    "main",
]

TOPIC_PREFIX = "redis-mesh:private-stream:"
PROTECTED_PREFIXES = ("/v1/queue", "/v1/batches", "/v1/files", "/v1/console")


@dataclass(frozen=True)
class EmulatorConfig:
    """How an emulator instance runs. Durations carry their unit in the name."""

    redis_url: str
    """The Redis holding the queues; ``GET /v1/queue/eventbus`` returns it verbatim."""
    apikeys: tuple[str, ...] = ("test-key",)
    """Accepted Bearer keys; anything else gets 401."""
    profile: str = "local"
    """The Spring profile in the event-bus topic ``redis-mesh:private-stream:<profile>:``."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port when EmulatorServer binds; ``create_app`` needs the real port."""
    instance_id: str | None = None
    """The ``instance_id`` of online tasks and the event stream suffix; ``"<host>:<port>"``."""
    data_dir: Path | None = None
    """Where the file store keeps files; a fresh temporary directory when None."""
    lazy_offline_loading: bool = False
    """Emulate §2.4: the first take after a level-1 put returns ``{}``."""
    callback_retry_delays_s: tuple[float, ...] = (2.0, 5.0, 10.0)
    """Waits between callback attempts on IO errors (4 attempts with the default)."""
    callback_timeout_s: float = 30.0
    redelivery_check_interval_s: float = 0.2
    """How often process_timeout timers and batch expiry are checked."""
    routes: Mapping[str, str] = field(default_factory=dict)
    """Model → queue, for puts and batches that name no queue."""
    clock_offset_s: float = 0.0
    """How far this server's clock is from the machine's (task timestamps, expiry, redelivery
    timers, the ``Date`` header): a skewed Bella-Queue for clock-skew tests."""

    def __post_init__(self) -> None:
        if not self.apikeys:
            raise ValueError("EmulatorConfig needs at least one API key")

    @property
    def resolved_instance_id(self) -> str:
        """``instance_id``, or ``"<host>:<port>"``."""
        return self.instance_id or f"{self.host}:{self.port}"

    @property
    def topic(self) -> str:
        """``redis-mesh:private-stream:<profile>:`` (§1.2)."""
        return f"{TOPIC_PREFIX}{self.profile}:"


class CompleteFaults:
    """What ``POST /v1/queue/{id}/complete`` answers instead of completing, while set (the
    request is not read nor acted on: something in front of Bella-Queue answered it).

    Thread-safe: tests set it from their thread while the server runs in its own. It belongs
    to the :class:`EmulatorServer` and survives its restarts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answer: tuple[int, bytes, tuple[tuple[str, str], ...]] | None = None
        self.answered = 0
        """Completes answered with the fault so far (all faults together)."""

    def set(
        self, status: int, body: bytes | str = b"", headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer every complete with ``status``, ``body`` and ``headers`` from now on."""
        raw = body.encode() if isinstance(body, str) else bytes(body)
        with self._lock:
            self._answer = (status, raw, tuple((headers or {}).items()))

    def clear(self) -> None:
        """Complete normally again."""
        with self._lock:
            self._answer = None

    def response(self) -> Response | None:
        """The fault's answer to one complete (counted), or ``None`` when none is set."""
        with self._lock:
            if self._answer is None:
                return None
            self.answered += 1
            status, body, headers = self._answer
        return Response(body, status_code=status, headers=dict(headers))


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


# --------------------------------------------------------------------------------------
# Envelopes (§1.0)
# --------------------------------------------------------------------------------------


def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def _empty(status: int = 200) -> Response:
    return Response(b"", status_code=status)


def _error(status: int, message: str, stacktrace: str | None = None) -> Response:
    body: dict[str, Any] = {"code": status, "message": message, "timestamp": now_ms()}
    if stacktrace is not None:
        body["stacktrace"] = stacktrace
    return _json(body, status)


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler) -> Handler:
    """Turn every exception into the spec's 400/500 bodies so bad input never kills us."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status == 500:
                trace = "".join(traceback.format_exception(exc))
                return _error(500, exc.message, trace)
            return _error(exc.status, exc.message)
        except RedisError as exc:
            logger.warning("%s %s failed: Redis: %s", request.method, request.url.path, exc)
            return _error(500, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.url.path)
            return _error(500, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    guarded.__name__ = handler.__name__
    return guarded


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise server_error("Required request body is missing")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise server_error(f"JSON parse error: {exc}") from None


async def _read_object(request: Request) -> dict[str, Any]:
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise server_error("JSON parse error: expected an object")
    return body


def _int_field(body: Mapping[str, Any], name: str, default: int | None) -> int | None:
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


def _bearer_key(value: str | None) -> str | None:
    if not value or not value.startswith("Bearer "):
        return None
    return value[len("Bearer ") :].strip()


def _caller_key(request: Request) -> str:
    """The Bearer key of an authenticated request (the auth middleware checked it)."""
    key = _bearer_key(request.headers.get("authorization"))
    if key is None:
        key = _bearer_key(request.query_params.get("Authorization"))
    return key or ""


class _HeadersMiddleware:
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


class _AuthMiddleware:
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
            key = _bearer_key(value)
            if key is None or key not in self.keys:
                await _empty(401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
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


# --------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------


def _result_status(result: Mapping[str, Any]) -> int:
    """``MapUtils.getInteger(result, "status_code", 200)``: an int or numeric string (§4.4)."""
    raw = result.get("status_code")
    status = 200
    if isinstance(raw, int | str) and not isinstance(raw, bool):
        with contextlib.suppress(ValueError):
            status = int(raw)
    return status if 100 <= status <= 599 else 200


async def _next_completion(waiter: asyncio.Queue[StreamEvent]) -> CompletionEvent:
    """Skip progress events (a blocking put ignores them) until the completion."""
    while True:
        event = await waiter.get()
        if isinstance(event, CompletionEvent):
            return event


class _Emulator:
    """The state behind one app: Redis, the queue store, the event bus and batches."""

    def __init__(
        self, config: EmulatorConfig, complete_faults: CompleteFaults | None = None
    ) -> None:
        self.config = config
        self.complete_faults = complete_faults or CompleteFaults()
        self.instance_id = config.resolved_instance_id
        self.stream = config.topic + self.instance_id
        self._tmp_dir: tempfile.TemporaryDirectory[str] | None = None
        if config.data_dir is None:
            self._tmp_dir = tempfile.TemporaryDirectory(prefix="bella-emulator-files-")
            data_dir = Path(self._tmp_dir.name)
        else:
            data_dir = Path(config.data_dir)
        self.files = FileStore(data_dir)
        self._background: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._redis: Redis | None = None
        self._store: QueueStore | None = None
        self._batches: BatchManager | None = None
        self._http: httpx.AsyncClient | None = None
        self.events = EventBusReader(config.redis_url, self.stream)

    @property
    def store(self) -> QueueStore:
        assert self._store is not None, "emulator not started"
        return self._store

    @property
    def batches(self) -> BatchManager:
        assert self._batches is not None, "emulator not started"
        return self._batches

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "emulator not started"
        return self._http

    # ---------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        # A blocking pool: a burst of requests waits for a connection instead of failing.
        pool = BlockingConnectionPool.from_url(
            self.config.redis_url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=10,
            max_connections=32,
            timeout=10,
        )
        self._redis = Redis(connection_pool=pool)
        self._store = QueueStore(
            self._redis,
            instance_id=self.instance_id,
            lazy_offline_loading=self.config.lazy_offline_loading,
            on_completed=self._on_completed,
            clock_offset_ms=round(self.config.clock_offset_s * 1000),
        )
        self._batches = BatchManager(self._redis, self._store, self.files)
        self._http = httpx.AsyncClient(timeout=self.config.callback_timeout_s)
        await self.events.start()
        self._maintenance = asyncio.create_task(self._maintain(), name="emulator maintenance")
        logger.info(
            "emulator %s up: redis %s, topic %s",
            self.instance_id,
            redact_url(self.config.redis_url),
            self.config.topic,
        )

    async def shutdown(self) -> None:
        tasks = [t for t in (self._maintenance, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.events.stop()
        if self._http is not None:
            await self._http.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        if self._tmp_dir is not None:
            self._tmp_dir.cleanup()

    async def _maintain(self) -> None:
        failing = False
        while True:
            try:
                await self.store.process_due_redeliveries()
                await self.batches.expire_due()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    logger.warning("emulator maintenance failed (%s); retrying", exc)
                failing = True
            await asyncio.sleep(self.config.redelivery_check_interval_s)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- completion hook

    async def _on_completed(self, completed: CompletedTask) -> None:
        if completed.callback_url:
            self._spawn(
                self._deliver_callback(completed.callback_url, completed.task_id, completed.result),
                name=f"callback {completed.task_id}",
            )
        await self.batches.on_completed(completed)

    async def _deliver_callback(self, url: str, task_id: str, payload: dict[str, Any]) -> None:
        """POST exactly the completed map; retry only on IO errors (§6.4)."""
        delays = self.config.callback_retry_delays_s
        for attempt in range(len(delays) + 1):
            try:
                response = await self.http.post(
                    url, content=dumps(payload), headers={"Content-Type": "application/json"}
                )
            except httpx.TransportError as exc:
                if attempt >= len(delays):
                    logger.warning(
                        "callback for %s failed after %d attempts: %s", task_id, attempt + 1, exc
                    )
                    return
                await asyncio.sleep(delays[attempt])
                continue
            except Exception:
                logger.exception("callback for %s failed", task_id)
                return
            if not response.is_success:
                logger.warning("callback for %s answered %d", task_id, response.status_code)
            return

    # ---------------------------------------------------------------- routing

    async def route(self, data: Mapping[str, Any]) -> QueueMeta:
        """The queue of a request that names none: by ``data.model`` (emulator routing)."""
        model = data.get("model")
        if not isinstance(model, str) or not model.strip():
            raise bad_request("model must not be empty")
        queue = self.config.routes.get(model)
        if queue is not None:
            return await self.store.require_queue(queue)
        meta = await self.store.queue_meta(model)
        if meta is None:
            raise bad_request("Queue config cannot be found")
        return meta

    # ---------------------------------------------------------------- /v1/queue

    async def register(self, request: Request) -> Response:
        body = await _read_object(request)
        queue, endpoint = body.get("queue"), body.get("endpoint")
        if not isinstance(queue, str) or not queue:
            raise bad_request("queue must not be empty")
        if not isinstance(endpoint, str) or not endpoint:
            raise bad_request("endpoint must not be empty")
        await self.store.register(queue, endpoint)
        return _json(queue)

    async def eventbus(self, request: Request) -> Response:
        return _json({"url": self.config.redis_url, "topic": self.config.topic})

    async def put(self, request: Request) -> Response:
        body = await _read_object(request)
        for required in ("endpoint", "data"):
            if body.get(required) is None:
                raise bad_request(f"{required} must not be null")
        try:
            req = PutRequest.model_validate(
                {k: body[k] for k in PutRequest.model_fields if k in body}
            )
        except ValidationError as exc:
            if any(err["loc"][:1] == ("response_mode",) for err in exc.errors()):
                raise bad_request(f"Unknown response mode: {body.get('response_mode')}") from None
            raise server_error(f"JSON parse error: {exc.errors()[0]['msg']}") from None
        try:
            level = req.effective_level
        except ValueError:
            raise bad_request(f"Unknown queue level: {req.level}") from None
        if req.queue and req.queue.strip():
            queue = await self.store.require_queue(req.queue)
        else:
            queue = await self.route(req.data)
        task = await self.store.task_for_put(req, queue=queue, ak=_caller_key(request))
        mode = req.effective_mode
        if not mode.is_online:
            await self.store.enqueue(task)
            return _json({"code": 200, "timestamp": self.store.now_ms(), "data": task.task_id})

        timeout_s = req.timeout if req.timeout and req.timeout > 0 else DEFAULT_PUT_TIMEOUT_S
        wait_s = float(min(timeout_s, ONLINE_MAX_WAIT_S))
        waiter = self.events.register(task.task_id)
        try:
            await self.store.enqueue(task)
        except BaseException:
            self.events.unregister(task.task_id)
            raise
        logger.debug("put %s to %s:%d (%s)", task.task_id, queue.queue, int(level), mode)
        if mode is ResponseMode.STREAMING:
            stream = self._stream(task.task_id, task.full_queue, waiter, wait_s)
            return StreamingResponse(stream, media_type="text/event-stream")
        return await self._block(task.task_id, task.full_queue, waiter, wait_s)

    async def _block(
        self, task_id: str, full_queue: str, waiter: asyncio.Queue[StreamEvent], wait_s: float
    ) -> Response:
        try:
            async with asyncio.timeout(wait_s):
                event = await _next_completion(waiter)
        except TimeoutError:
            logger.info("blocking put %s timed out after %.1f s: cancelling", task_id, wait_s)
            await self._cancel_quietly(task_id)
            return _empty(408)
        finally:
            self.events.unregister(task_id)
        await self._count_completion(full_queue)
        status = _result_status(event.result)
        body = event.result.get("body")
        return _json({} if body is None else body, status)

    async def _stream(
        self, task_id: str, full_queue: str, waiter: asyncio.Queue[StreamEvent], wait_s: float
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        try:
            while True:
                if waiter.empty():
                    try:
                        async with asyncio.timeout_at(deadline):
                            event = await waiter.get()
                    except TimeoutError:
                        logger.info("streaming put %s timed out: cancelling", task_id)
                        await self._cancel_quietly(task_id)
                        return
                else:
                    event = waiter.get_nowait()
                # Every event already here goes out in one write, as a server under load does.
                parts: list[str] = []
                while isinstance(event, ProgressEvent):
                    parts.append(
                        format_sse(event.event_id, event.event_name, sse_data(event.event_data))
                    )
                    if waiter.empty():
                        break
                    event = waiter.get_nowait()
                if parts:
                    yield "".join(parts)
                if isinstance(event, CompletionEvent):
                    await self._count_completion(full_queue)
                    return
        finally:
            self.events.unregister(task_id)

    async def _cancel_quietly(self, task_id: str) -> None:
        try:
            await self.store.cancel(task_id)
        except Exception as exc:
            logger.warning("could not cancel %s: %s", task_id, exc)

    async def _count_completion(self, full_queue: str) -> None:
        with contextlib.suppress(Exception):
            await self.store.count_online_completion(full_queue)

    async def take(self, request: Request) -> Response:
        body = await _read_object(request)
        queues = body.get("queues")
        if not isinstance(queues, list) or not queues:
            raise bad_request("queues must not be empty")
        if not all(isinstance(q, str) for q in queues):
            raise server_error("JSON parse error: queues must be strings")
        strategy_raw = body.get("strategy", "fifo")
        if strategy_raw is None:
            raise server_error("java.lang.NullPointerException: strategy")
        try:
            strategy = TakeStrategy(strategy_raw)
        except ValueError:
            raise bad_request(f"No enum constant TakeStrategy.{strategy_raw}") from None
        size = _int_field(body, "size", None)
        if size is None:
            raise server_error("java.lang.NullPointerException: size")
        for index, full in enumerate(queues):
            try:
                parse_full_queue_name(full)
            except ValueError as exc:
                # The first entry is parsed inside the server's cache loader: 500 (§1.4).
                raise ApiError(500 if index == 0 else 400, str(exc)) from None
        to_check = queues[:1] if strategy is TakeStrategy.FIFO else queues
        for full in dict.fromkeys(to_check):
            await self.store.require_queue(full.split(":")[0])
        if strategy in (TakeStrategy.ACTIVE_PASSIVE, TakeStrategy.ROUND_ROBIN) and size < 0:
            raise bad_request(f"size must not be negative: {size}")
        params = TakeParams(
            queues=queues,
            strategy=strategy,
            size=size,
            process_timeout_s=_int_field(body, "process_timeout", 0) or 0,
            process_max_retries=_int_field(body, "process_max_retries", 0) or 0,
            min_age_s=_int_field(body, "min_age_seconds", 0) or 0,
        )
        return _json(await self.store.take(params))

    async def complete(self, request: Request) -> Response:
        injected = self.complete_faults.response()
        if injected is not None:
            return injected
        task_id = request.path_params["task_id"]
        body = await _read_object(request)
        await self.store.complete(task_id, body)
        return _json(task_id)

    async def cancel(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        await self.store.cancel(task_id)
        return _json(task_id, 202)

    async def get_task(self, request: Request) -> Response:
        return _json(await self.store.get_task(request.path_params["task_id"]))

    async def metadata(self, request: Request) -> Response:
        meta = await self.store.queue_meta(request.path_params["queue"])
        if meta is None:
            return _empty()
        return _json({"endpoint": meta.endpoint, "queue": meta.queue})

    async def stats(self, request: Request) -> Response:
        stats = await self.store.stats(request.path_params["full_queue"])
        return _empty() if stats is None else _json(stats)

    # ---------------------------------------------------------------- /v1/files

    async def upload_file(self, request: Request) -> Response:
        parts = _parse_multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in parts:
            raise bad_request("Required part 'file' is not present")
        purpose = parts.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if not purpose:
            raise bad_request("purpose must not be empty")
        filename, content = parts["file"]
        obj = await self.files.save(content, filename=filename or "upload", purpose=purpose)
        return _json(obj)

    async def list_files(self, request: Request) -> Response:
        data = await self.files.list(request.query_params.get("purpose"))
        return _json({"object": "list", "data": data})

    async def get_file(self, request: Request) -> Response:
        obj = await self.files.get(request.path_params["file_id"])
        if obj is None:
            return _error(404, f"No such file: {request.path_params['file_id']}")
        return _json(obj)

    async def file_content(self, request: Request) -> Response:
        content = await self.files.content(request.path_params["file_id"])
        if content is None:
            return _error(404, f"No such file: {request.path_params['file_id']}")
        return Response(content, media_type="application/octet-stream")

    # ---------------------------------------------------------------- /v1/batches

    async def create_batch(self, request: Request) -> Response:
        body = await _read_object(request)
        batch = await self.batches.create(
            body,
            ak=_caller_key(request),
            queue_name=request.headers.get(QUEUE_NAME_HEADER) or None,
            route=self.route,
        )
        return _json(batch)

    async def list_batches(self, request: Request) -> Response:
        limit_raw = request.query_params.get("limit") or "20"
        try:
            limit = int(limit_raw)
        except ValueError:
            raise bad_request(f"For input string: {limit_raw!r}") from None
        after = request.query_params.get("after") or None
        return _json(await self.batches.list(limit=limit, after=after))

    async def get_batch(self, request: Request) -> Response:
        batch = await self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, f"No such batch: {request.path_params['batch_id']}")
        return _json(batch)

    async def cancel_batch(self, request: Request) -> Response:
        batch = await self.batches.cancel(request.path_params["batch_id"])
        if batch is None:
            return _error(404, f"No such batch: {request.path_params['batch_id']}")
        return _json(batch, 202)

    # ---------------------------------------------------------------- routes

    def routes(self) -> list[Route]:
        g = _guarded
        return [
            Route("/v1/queue/register", g(self.register), methods=["POST"]),
            Route("/v1/queue/put", g(self.put), methods=["POST"]),
            Route("/v1/queue/take", g(self.take), methods=["POST"]),
            Route("/v1/queue/eventbus", g(self.eventbus), methods=["GET"]),
            Route("/v1/queue/{task_id}/complete", g(self.complete), methods=["POST"]),
            Route("/v1/queue/{task_id}/cancel", g(self.cancel), methods=["POST"]),
            Route("/v1/queue/{queue}/metadata", g(self.metadata), methods=["GET"]),
            Route("/v1/queue/{full_queue}/stats", g(self.stats), methods=["GET"]),
            Route("/v1/queue/{task_id}", g(self.get_task), methods=["GET"]),
            Route("/v1/files", g(self.upload_file), methods=["POST"]),
            Route("/v1/files", g(self.list_files), methods=["GET"]),
            Route("/v1/files/{file_id}", g(self.get_file), methods=["GET"]),
            Route("/v1/files/{file_id}/content", g(self.file_content), methods=["GET"]),
            Route("/v1/batches", g(self.create_batch), methods=["POST"]),
            Route("/v1/batches", g(self.list_batches), methods=["GET"]),
            Route("/v1/batches/{batch_id}", g(self.get_batch), methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", g(self.cancel_batch), methods=["POST"]),
        ]


def create_app(config: EmulatorConfig, complete_faults: CompleteFaults | None = None) -> Starlette:
    """The emulator as an ASGI app; its lifespan opens Redis and starts the background tasks.

    ``config.port`` must be the real port (it is part of the default ``instance_id``).
    ``complete_faults`` lets a test make completes fail (a fresh, unset one when None).
    """
    emulator = _Emulator(config, complete_faults)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await emulator.startup()
        try:
            yield
        finally:
            await emulator.shutdown()

    from starlette.middleware import Middleware

    app = Starlette(
        routes=emulator.routes(),
        middleware=[
            Middleware(_HeadersMiddleware, clock_offset_s=config.clock_offset_s),
            Middleware(_AuthMiddleware, keys=config.apikeys),
        ],
        lifespan=lifespan,
    )
    app.state.emulator = emulator
    return app


# --------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP, and without it every keep-alive response waits ~40 ms on delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class EmulatorServer:
    """The emulator under uvicorn in a background thread with its own event loop.

    ``EmulatorServer(EmulatorConfig(redis_url=..., port=0)).start()`` picks a free port;
    use it as a context manager in tests. ``url``, ``apikey``, ``instance_id`` and ``topic``
    tell clients where and how to connect.
    """

    def __init__(self, config: EmulatorConfig, *, log_level: str = "warning") -> None:
        self._requested = config
        self.config = config
        self.log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.complete_faults = CompleteFaults()
        """What completes answer instead of completing (see :meth:`fail_completes`)."""

    @property
    def url(self) -> str:
        """``http://<host>:<port>`` (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.config.port}"

    @property
    def apikey(self) -> str:
        """The first accepted API key."""
        return self.config.apikeys[0]

    @property
    def instance_id(self) -> str:
        """The ``instance_id`` online tasks carry; their events go to ``topic + instance_id``."""
        return self.config.resolved_instance_id

    @property
    def topic(self) -> str:
        """``redis-mesh:private-stream:<profile>:``."""
        return self.config.topic

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 20.0) -> EmulatorServer:
        """Bind, start serving, and wait until ``GET /v1/queue/eventbus`` answers."""
        if self.running:
            return self
        sock = _bind(self._requested.host, self._requested.port)
        port = int(sock.getsockname()[1])
        self.config = replace(self._requested, port=port)
        # A later start (see restart) comes back on the same port and instance id.
        self._requested = self.config
        uv_config = uvicorn.Config(
            create_app(self.config, self.complete_faults),
            log_level=self.log_level,
            log_config=None,
            lifespan="on",
            access_log=False,
            date_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(uv_config)
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(self._server, sock), name=f"emulator-{port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.apikey}"}
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"emulator failed to start: {self._error!r}")
                if self._server.started:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{self.url}/v1/queue/eventbus", headers=headers).is_success:
                            return self
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"emulator did not answer on {self.url} within {timeout_s}s")

    @staticmethod
    def _run_server(server: uvicorn.Server, sock: socket.socket) -> None:
        asyncio.run(server.serve(sockets=[sock]))

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            self._run_server(server, sock)
        except BaseException as exc:
            self._error = exc
            logger.error("emulator server thread ended: %r", exc)
        finally:
            sock.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the thread (forcing after ``timeout_s``)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout_s)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout_s)
        self._server = None
        self._thread = None

    def restart(self, down_s: float = 0.0) -> EmulatorServer:
        """Stop, stay down ``down_s`` seconds, start again on the same port.

        Queue state lives in Redis and survives; waiting online puts do not (as with a real
        server restart).
        """
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        return self.start()

    def fail_completes(
        self, status: int, body: bytes | str = b"", headers: Mapping[str, str] | None = None
    ) -> None:
        """From now on answer every ``POST /v1/queue/{id}/complete`` with ``status``, ``body``
        and ``headers`` and complete nothing, as a gateway in front of Bella-Queue would
        (e.g. ``429``, an HTML page, ``{"Retry-After": "1"}``); until :meth:`heal_completes`.
        ``complete_faults.answered`` counts the completes answered so."""
        self.complete_faults.set(status, body, headers)

    def heal_completes(self) -> None:
        """Completes work again."""
        self.complete_faults.clear()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ForegroundServer(uvicorn.Server):
    """uvicorn, but SIGINT/SIGTERM end ``serve()`` gracefully instead of being re-raised."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ray_worker.emulator.server",
        description="Run a local Bella-Queue emulator over a real Redis.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="Redis holding the queues, returned by /v1/queue/eventbus",
    )
    parser.add_argument(
        "--apikey",
        action="append",
        default=None,
        help="accepted Bearer key; repeatable (default: $BELLA_QUEUE_APIKEY)",
    )
    parser.add_argument("--profile", default="local", help="profile in the event-bus topic")
    parser.add_argument("--instance-id", default=None, help="default <host>:<port>")
    parser.add_argument("--data-dir", type=Path, default=None, help="file store directory")
    parser.add_argument(
        "--lazy-offline-loading",
        action="store_true",
        help="the first take after a level-1 put returns {} (as the real server)",
    )
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="MODEL=QUEUE",
        help="route puts/batches without a queue by data.model; repeatable",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground until interrupted; return the exit code."""
    args = _parser().parse_args(argv)
    keys = list(args.apikey or [])
    if not keys and os.environ.get("BELLA_QUEUE_APIKEY"):
        keys = [os.environ["BELLA_QUEUE_APIKEY"]]
    if not keys:
        _parser().error("at least one --apikey (or $BELLA_QUEUE_APIKEY) is required")
    routes: dict[str, str] = {}
    for item in args.route:
        model, sep, queue = str(item).partition("=")
        if not sep or not model or not queue:
            _parser().error(f"--route expects MODEL=QUEUE, got {item!r}")
        routes[model] = queue
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sock = _bind(args.host, args.port)
    config = EmulatorConfig(
        redis_url=args.redis_url,
        apikeys=tuple(keys),
        profile=args.profile,
        host=args.host,
        port=int(sock.getsockname()[1]),
        instance_id=args.instance_id,
        data_dir=args.data_dir,
        lazy_offline_loading=args.lazy_offline_loading,
        routes=routes,
    )
    logger.info(
        "Bella-Queue emulator on http://%s:%d (instance %s, topic %s)",
        config.host,
        config.port,
        config.resolved_instance_id,
        config.topic,
    )
    server = _ForegroundServer(
        uvicorn.Config(
            create_app(config),
            log_level=args.log_level.lower(),
            lifespan="on",
            date_header=False,
            timeout_graceful_shutdown=2,
        )
    )
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
