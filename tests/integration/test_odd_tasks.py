"""Odd tasks under local Ray Serve with the simulated engine: a lone surrogate in an echoed field.

A task whose ``data.model`` is a lone surrogate (``"\\ud800"``, legal JSON) is answered 404 in
blocking and callback mode, its text echoed in the error message. The emulator keeps its
records as UTF-8 text, so it cannot carry a lone surrogate itself: a small proxy between the
worker and the emulator writes the JSON escape ``\\ud800`` into take answers in place of a
marker (as a Java server, whose strings are UTF-16, sends it) and turns the escape back into the
marker in the worker's HTTP completes. The blocking answer is read where the worker writes it,
from the event-bus stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import pytest
from redis.asyncio import Redis

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import CompletionEvent, PutRequest, ResponseMode, decode_event
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.event_stream import last_entry_id
from ray_worker.testing.serve_run import deployed_worker, worker_running
from ray_worker.testing.waiting import wait_for
from ray_worker.testing.worker_args import sim_worker_args

MODEL = "sim-model"
MARKER = "@lone-d800@"
ESCAPE = "\\ud800"


class SurrogateProxy:
    """Forwards every request to ``upstream``; ``MARKER`` in take answers becomes ``ESCAPE``
    and ``ESCAPE`` in request bodies becomes ``MARKER``. Use as a context manager."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._http = httpx.Client(timeout=30)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).replace(ESCAPE.encode(), MARKER.encode())
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                answer = proxy._http.request(
                    self.command,
                    proxy.upstream + self.path,
                    content=body,
                    headers=headers,
                    timeout=30,
                )
                content = answer.content
                if self.path.startswith("/v1/queue/take"):
                    content = content.replace(MARKER.encode(), ESCAPE.encode())
                self.send_response(answer.status_code)
                for name in ("content-type", "date"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SurrogateProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(5)
        self._server.server_close()
        self._http.close()


@pytest.fixture(scope="module")
def proxy(emulator: EmulatorServer) -> Iterator[SurrogateProxy]:
    with SurrogateProxy(emulator.url) as p:
        yield p


@pytest.fixture(scope="module")
def worker(ray_serve: Any, proxy: SurrogateProxy, queue: str) -> Iterator[Any]:
    args = sim_worker_args(
        proxy.url,
        queue,
        model=MODEL,
        sim={"max_num_seqs": 8, "ttft_s": 0.02, "tokens_per_s": 200, "max_model_len": 8192},
    )
    with deployed_worker(args, "worker-odd", EMULATOR_APIKEY) as handle:
        yield handle


def _put(queue: str, mode: ResponseMode, model: str, timeout: int = 60, **kw: Any) -> PutRequest:
    return PutRequest(
        endpoint="/v1/chat/completions",
        queue=queue,
        response_mode=mode,
        data={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=timeout,
        **kw,
    )


async def _completions(emulator: EmulatorServer, after: str) -> list[CompletionEvent]:
    redis = Redis.from_url(emulator.config.redis_url)
    try:
        stream = emulator.topic + emulator.instance_id
        entries = cast("list[Any]", await redis.xrange(stream, min=f"({after}"))
    finally:
        await redis.aclose()
    events = [decode_event(fields) for _, fields in entries]
    return [e for e in events if isinstance(e, CompletionEvent)]


async def test_lone_surrogate_model_is_answered_404_in_every_mode(
    worker: Any, client: QueueClient, emulator: EmulatorServer, queue: str
) -> None:
    await worker_running(worker)
    after = await last_entry_id(emulator.config.redis_url, emulator.topic + emulator.instance_id)
    with CallbackReceiver() as receiver:
        callback_id = await client.put(
            _put(queue, ResponseMode.CALLBACK, MARKER, level=0, callback_url=receiver.url)
        )
        # The emulator cannot hand the answer on (it holds the lone surrogate), so the
        # producer's wait is left to time out; the answer is read from the stream.
        blocking = asyncio.create_task(
            client.put_blocking(_put(queue, ResponseMode.BLOCKING, MARKER, timeout=5))
        )
        answers = await wait_for(lambda: receiver.answers(callback_id), timeout=15, interval=0.05)
        completions = await wait_for(
            lambda: _completions(emulator, after), timeout=15, interval=0.1
        )
    blocking.cancel()
    with contextlib.suppress(BaseException):
        await blocking
    (answer,) = answers
    assert answer["status_code"] == 404
    assert answer["body"]["error"]["code"] == "model_not_found"
    assert MARKER in answer["body"]["error"]["message"]  # the escape, turned back by the proxy
    (completion,) = completions
    assert completion.result["status_code"] == 404
    error = completion.result["body"]["error"]
    assert error["code"] == "model_not_found"
    assert "\ud800" in error["message"]  # the lone surrogate itself, echoed
    good = await client.put_blocking(_put(queue, ResponseMode.BLOCKING, MODEL))
    assert good.status_code == 200
