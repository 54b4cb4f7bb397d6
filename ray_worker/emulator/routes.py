"""The emulator's routes: the HTTP API of spec §1 over a real Redis, as a Starlette app.

This module owns the handlers (register, put with its blocking and streaming waits answered
from the event bus, take, complete with callback delivery, cancel, task, metadata, stats, files,
batches), the app's lifespan (Redis, the store's timers, the event-bus reader), and
:class:`CompleteFaults`, the test control that makes completes answer like a gateway. Queue
semantics live in :mod:`~ray_worker.emulator.store`, the event-bus reader in
:mod:`~ray_worker.emulator.events`, files and batches in :mod:`~ray_worker.emulator.batches`,
the envelope and middleware in :mod:`~ray_worker.emulator.http`. It must never die on bad
input (every handler is :func:`~ray_worker.emulator.http.guarded`), and never logs an API key
or a task's ``ak``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

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
    parse_full_queue_name,
    redact_url,
    sse_data,
)
from ray_worker.emulator.batches import BatchManager, FileStore
from ray_worker.emulator.config import EmulatorConfig
from ray_worker.emulator.events import EventBusReader, StreamEvent
from ray_worker.emulator.http import (
    AuthMiddleware,
    HeadersMiddleware,
    caller_key,
    empty_response,
    error_response,
    format_sse,
    guarded,
    int_field,
    json_response,
    parse_multipart,
    read_object,
)
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

__all__ = ["CompleteFaults", "create_app", "result_status"]


_SHUTDOWN_STEP_S = 2.0
"""Longest one step of the emulator's shutdown may take (see ``shutdown``)."""


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


def result_status(result: Mapping[str, Any]) -> int:
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
        # Each step is bounded (_SHUTDOWN_STEP_S): a connection a Redis restart left half-open
        # must not hold the server's stop (it did, for the 2 x 10 s a test's stop waits).
        tasks = [t for t in (self._maintenance, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_SHUTDOWN_STEP_S)
        steps: list[Awaitable[Any]] = [self.events.stop()]
        if self._http is not None:
            steps.append(self._http.aclose())
        if self._redis is not None:
            steps.append(self._redis.aclose())
        for step in steps:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(step, _SHUTDOWN_STEP_S)
        if self._tmp_dir is not None:
            self._tmp_dir.cleanup()

    async def _maintain(self) -> None:
        failing = False
        me = asyncio.current_task()
        # Until cancelled, also when a Redis client swallowed the cancellation mid-command (seen:
        # the loop went on sleeping and asyncio.run's final cancel waited for it forever).
        while me is None or not me.cancelling():
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
        body = await read_object(request)
        queue, endpoint = body.get("queue"), body.get("endpoint")
        if not isinstance(queue, str) or not queue:
            raise bad_request("queue must not be empty")
        if not isinstance(endpoint, str) or not endpoint:
            raise bad_request("endpoint must not be empty")
        await self.store.register(queue, endpoint)
        return json_response(queue)

    async def eventbus(self, request: Request) -> Response:
        return json_response({"url": self.config.redis_url, "topic": self.config.topic})

    async def put(self, request: Request) -> Response:
        body = await read_object(request)
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
        task = await self.store.task_for_put(req, queue=queue, ak=caller_key(request))
        mode = req.effective_mode
        if not mode.is_online:
            await self.store.enqueue(task)
            return json_response(
                {"code": 200, "timestamp": self.store.now_ms(), "data": task.task_id}
            )

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
            return empty_response(408)
        finally:
            self.events.unregister(task_id)
        await self._count_completion(full_queue)
        status = result_status(event.result)
        body = event.result.get("body")
        return json_response({} if body is None else body, status)

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
        body = await read_object(request)
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
        size = int_field(body, "size", None)
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
            process_timeout_s=int_field(body, "process_timeout", 0) or 0,
            process_max_retries=int_field(body, "process_max_retries", 0) or 0,
            min_age_s=int_field(body, "min_age_seconds", 0) or 0,
        )
        return json_response(await self.store.take(params))

    async def complete(self, request: Request) -> Response:
        injected = self.complete_faults.response()
        if injected is not None:
            return injected
        task_id = request.path_params["task_id"]
        body = await read_object(request)
        await self.store.complete(task_id, body)
        return json_response(task_id)

    async def cancel(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        await self.store.cancel(task_id)
        return json_response(task_id, 202)

    async def get_task(self, request: Request) -> Response:
        return json_response(await self.store.get_task(request.path_params["task_id"]))

    async def metadata(self, request: Request) -> Response:
        meta = await self.store.queue_meta(request.path_params["queue"])
        if meta is None:
            return empty_response()
        return json_response({"endpoint": meta.endpoint, "queue": meta.queue})

    async def stats(self, request: Request) -> Response:
        stats = await self.store.stats(request.path_params["full_queue"])
        return empty_response() if stats is None else json_response(stats)

    # ---------------------------------------------------------------- /v1/files

    async def upload_file(self, request: Request) -> Response:
        parts = parse_multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in parts:
            raise bad_request("Required part 'file' is not present")
        purpose = parts.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if not purpose:
            raise bad_request("purpose must not be empty")
        filename, content = parts["file"]
        obj = await self.files.save(content, filename=filename or "upload", purpose=purpose)
        return json_response(obj)

    async def list_files(self, request: Request) -> Response:
        data = await self.files.list(request.query_params.get("purpose"))
        return json_response({"object": "list", "data": data})

    async def get_file(self, request: Request) -> Response:
        obj = await self.files.get(request.path_params["file_id"])
        if obj is None:
            return error_response(404, f"No such file: {request.path_params['file_id']}")
        return json_response(obj)

    async def file_content(self, request: Request) -> Response:
        content = await self.files.content(request.path_params["file_id"])
        if content is None:
            return error_response(404, f"No such file: {request.path_params['file_id']}")
        return Response(content, media_type="application/octet-stream")

    # ---------------------------------------------------------------- /v1/batches

    async def create_batch(self, request: Request) -> Response:
        body = await read_object(request)
        batch = await self.batches.create(
            body,
            ak=caller_key(request),
            queue_name=request.headers.get(QUEUE_NAME_HEADER) or None,
            route=self.route,
        )
        return json_response(batch)

    async def list_batches(self, request: Request) -> Response:
        limit_raw = request.query_params.get("limit") or "20"
        try:
            limit = int(limit_raw)
        except ValueError:
            raise bad_request(f"For input string: {limit_raw!r}") from None
        after = request.query_params.get("after") or None
        return json_response(await self.batches.list(limit=limit, after=after))

    async def get_batch(self, request: Request) -> Response:
        batch = await self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return error_response(404, f"No such batch: {request.path_params['batch_id']}")
        return json_response(batch)

    async def cancel_batch(self, request: Request) -> Response:
        batch = await self.batches.cancel(request.path_params["batch_id"])
        if batch is None:
            return error_response(404, f"No such batch: {request.path_params['batch_id']}")
        return json_response(batch, 202)

    # ---------------------------------------------------------------- routes

    def routes(self) -> list[Route]:
        g = guarded
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
            Middleware(HeadersMiddleware, clock_offset_s=config.clock_offset_s),
            Middleware(AuthMiddleware, keys=config.apikeys),
        ],
        lifespan=lifespan,
    )
    app.state.emulator = emulator
    return app
