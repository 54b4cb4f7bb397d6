"""Unit tests of ``ray_worker.bella.client`` through ``httpx.MockTransport`` (no network)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ray_worker.bella.client import QueueClient, RetryPolicy
from ray_worker.bella.producer import (
    ONLINE_WAIT_MARGIN_S,
    BlockingResult,
    SSEEvent,
    online_wait_s,
)
from ray_worker.bella.protocol import (
    QUEUE_NAME_HEADER,
    Batch,
    BatchRequest,
    PutRequest,
    ResponseMode,
    TakeRequest,
    TakeStrategy,
)
from ray_worker.errors import (
    AuthenticationError,
    BadRequestError,
    PermanentError,
    QueueGatewayError,
    QueueUnavailableError,
    RetryableError,
)

DATA = Path(__file__).resolve().parent.parent / "data"
BASE = "http://bella.test:8080"
KEY = "sk-unit-secret-key"
TASK_ID = "TASK-12-1-C-251111121955-0001-000003"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response] | httpx.Response]


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


class Recorder:
    """A MockTransport handler answering from a queue of responses, recording requests."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


def client_for(
    handler: Handler, *, attempts: int = 3, **kwargs: Any
) -> tuple[QueueClient, list[float]]:
    client = QueueClient(
        BASE,
        KEY,
        transport=httpx.MockTransport(handler),
        complete_retry=RetryPolicy(attempts=attempts, base_delay_s=0.5, jitter=0.0),
        **kwargs,
    )
    delays: list[float] = []

    async def fake_sleep(delay_s: float) -> None:
        delays.append(delay_s)

    client._sleep = fake_sleep
    return client, delays


def json_response(status: int, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), **kwargs)


def string_literal(status: int, value: str) -> httpx.Response:
    # Spring writes String returns as a JSON string literal, probably as text/plain.
    return httpx.Response(
        status, content=json.dumps(value).encode(), headers={"Content-Type": "text/plain"}
    )


def put_request(name: str) -> PutRequest:
    return PutRequest.model_validate(load(name))


# --------------------------------------------------------------------------------------
# Construction, auth header, secrets
# --------------------------------------------------------------------------------------


async def test_auth_header_timeouts_and_no_key_in_repr() -> None:
    recorder = Recorder(string_literal(200, "deepseek-r1"))
    client, _ = client_for(recorder, timeout_s=7.0, connect_timeout_s=2.0)
    async with client:
        assert await client.register("deepseek-r1", "/v1/chat/completions") == "deepseek-r1"
        assert KEY not in repr(client)
        assert KEY not in str(client)
        assert KEY not in repr(vars(client))
    request = recorder.last
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.method == "POST"
    assert request.url == httpx.URL(f"{BASE}/v1/queue/register")
    assert recorder.body() == load("register_request.json")
    timeout = request.extensions["timeout"]
    assert timeout["read"] == 7.0
    assert timeout["connect"] == 2.0
    assert client._client.is_closed


async def test_base_url_trailing_slash_and_validation() -> None:
    recorder = Recorder(string_literal(200, "q"))
    client = QueueClient(BASE + "/", KEY, transport=httpx.MockTransport(recorder))
    await client.register("q", "/v1/chat/completions")
    await client.aclose()
    assert recorder.last.url.path == "/v1/queue/register"
    with pytest.raises(ValueError, match="http"):
        QueueClient("bella.test:8080", KEY)
    with pytest.raises(ValueError, match="max_connections"):
        QueueClient(BASE, KEY, max_connections=0)


async def test_secretstr_key_is_accepted() -> None:
    from pydantic import SecretStr

    recorder = Recorder(string_literal(200, "q"))
    client = QueueClient(BASE, SecretStr(KEY), transport=httpx.MockTransport(recorder))
    await client.register("q", "/e")
    await client.aclose()
    assert recorder.last.headers["Authorization"] == f"Bearer {KEY}"


# --------------------------------------------------------------------------------------
# String envelopes (§1.0)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        string_literal(200, "deepseek-r1"),
        httpx.Response(200, text="deepseek-r1"),  # raw text
        httpx.Response(200, text=' "deepseek-r1"\n'),  # quoted, with whitespace
        httpx.Response(200, text='"deepseek-r1'),  # broken literal: quotes stripped
    ],
)
async def test_register_string_envelopes(response: httpx.Response) -> None:
    client, _ = client_for(Recorder(response))
    assert await client.register("deepseek-r1", "/v1/chat/completions") == "deepseek-r1"


async def test_register_duplicate_is_a_bad_request() -> None:
    client, _ = client_for(Recorder(json_response(400, load("error_400.json"))))
    with pytest.raises(BadRequestError) as info:
        await client.register("deepseek-r1", "/v1/chat/completions")
    assert info.value.message == "非法的数据"
    assert info.value.status_code == 400
    assert isinstance(info.value, PermanentError)


async def test_cancel_returns_202_string() -> None:
    recorder = Recorder(string_literal(202, TASK_ID))
    client, _ = client_for(recorder)
    assert await client.cancel(TASK_ID) == TASK_ID
    assert recorder.last.method == "POST"
    assert recorder.last.url.path == f"/v1/queue/{TASK_ID}/cancel"


async def test_task_ids_are_path_escaped() -> None:
    recorder = Recorder(string_literal(202, "x"))
    client, _ = client_for(recorder)
    await client.cancel("a/../b")
    assert recorder.last.url.raw_path == b"/v1/queue/a%2F..%2Fb/cancel"


# --------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------


async def test_401_empty_body() -> None:
    client, _ = client_for(Recorder(httpx.Response(401)))
    with pytest.raises(AuthenticationError) as info:
        await client.take(TakeRequest(queues=["q:0"], size=1))
    assert "BELLA_QUEUE_APIKEY" in str(info.value)
    assert KEY not in str(info.value)
    assert isinstance(info.value, PermanentError)


async def test_400_keeps_the_server_message() -> None:
    body = {"code": 400, "message": "Unknown queue level", "timestamp": 1}
    client, _ = client_for(Recorder(json_response(400, body)))
    with pytest.raises(BadRequestError) as info:
        await client.take(TakeRequest(queues=["q:2"], size=1))
    assert info.value.message == "Unknown queue level"
    assert info.value.status_code == 400


async def test_500_keeps_message_and_status() -> None:
    client, _ = client_for(Recorder(json_response(500, load("error_500.json"))))
    with pytest.raises(QueueUnavailableError) as info:
        await client.take(TakeRequest(queues=["q:0"], size=1))
    assert info.value.message == "Queue full"
    assert info.value.status_code == 500
    assert "stacktrace" not in str(info.value)
    assert isinstance(info.value, RetryableError)


@pytest.mark.parametrize(
    ("response", "status", "fragment"),
    [
        (httpx.Response(502), 502, "HTTP 502 from POST /v1/queue/take"),
        (httpx.Response(503, text="<html>busy</html>"), 503, "<html>busy</html>"),
        (httpx.Response(500, content=b"\xff\xfe\x00garbage"), 500, "garbage"),
        (json_response(504, {"error": {"message": "gateway"}}), 504, "gateway"),
    ],
)
async def test_5xx_bodies_of_any_shape(
    response: httpx.Response, status: int, fragment: str
) -> None:
    client, _ = client_for(Recorder(response))
    with pytest.raises(QueueUnavailableError) as info:
        await client.take(TakeRequest(queues=["q:0"], size=1))
    assert info.value.status_code == status
    assert fragment in info.value.message


@pytest.mark.parametrize("status", [403, 404, 405, 409, 413, 429, 302, 307])
async def test_a_3xx_or_4xx_without_bellas_error_body_is_a_retryable_gateway_answer(
    status: int,
) -> None:
    client, _ = client_for(Recorder(httpx.Response(status, text="nope")))
    with pytest.raises(QueueGatewayError) as info:
        await client.eventbus()
    assert isinstance(info.value, RetryableError)
    assert isinstance(info.value, QueueUnavailableError)
    assert info.value.status_code == status
    assert "nope" in info.value.message
    assert info.value.retry_after_s is None


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(429, text="<html><body><h1>429 Too Many Requests</h1></body></html>"),
        httpx.Response(403),  # a WAF's empty refusal
        json_response(403, {"message": "Invalid authentication credentials"}),  # Kong
        json_response(404, {"timestamp": 1, "status": 404, "error": "Not Found", "path": "/"}),
        json_response(429, {"code": 429, "message": "rate limited"}),  # no timestamp
        json_response(400, "bad"),  # a JSON string, not Bella's object
    ],
)
async def test_foreign_4xx_bodies_are_gateway_answers(response: httpx.Response) -> None:
    client, _ = client_for(Recorder(response))
    with pytest.raises(QueueGatewayError) as info:
        await client.take(TakeRequest(queues=["q:0"], size=1))
    assert info.value.status_code == response.status_code
    assert "gateway" in info.value.message
    assert "BELLA_QUEUE_URL" in info.value.message  # what `ray-worker check` shows


@pytest.mark.parametrize("status", [400, 403, 404, 409, 429])
async def test_a_4xx_with_bellas_error_body_is_bellas_own_refusal(status: int) -> None:
    body = {"code": status, "message": 'For input string: "x"', "timestamp": 1}
    client, _ = client_for(Recorder(json_response(status, body, headers={"Retry-After": "5"})))
    with pytest.raises(BadRequestError) as info:
        await client.complete("TASK-x", {"status_code": 200})
    assert info.value.status_code == status
    assert info.value.message == 'For input string: "x"'


async def test_a_gateway_html_page_is_cut_short_in_the_message() -> None:
    page = "<html>\n<body>" + "blocked " * 200 + "</body></html>"
    client, _ = client_for(Recorder(httpx.Response(403, text=page)))
    with pytest.raises(QueueGatewayError) as info:
        await client.eventbus()
    assert len(info.value.message) < 400
    assert "\n" not in info.value.message


DATE = "Sun, 06 Dec 2026 21:00:00 GMT"


@pytest.mark.parametrize(
    ("headers", "retry_after_s"),
    [
        ({"Retry-After": "1"}, 1.0),
        ({"Retry-After": " 120 "}, 120.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-3"}, 0.0),
        # An HTTP date counts from the answer's own Date: the server's clock, not ours.
        ({"Retry-After": "Sun, 06 Dec 2026 21:00:30 GMT", "Date": DATE}, 30.0),
        ({"Retry-After": "Sunday, 06-Dec-26 21:01:00 GMT", "Date": DATE}, 60.0),
        ({"Retry-After": "Sun, 06 Dec 2026 20:59:00 GMT", "Date": DATE}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
async def test_retry_after_is_carried_on_the_error(
    headers: dict[str, str], retry_after_s: float | None
) -> None:
    client, _ = client_for(Recorder(httpx.Response(429, text="<html/>", headers=headers)))
    with pytest.raises(QueueGatewayError) as info:
        await client.eventbus()
    assert info.value.retry_after_s == retry_after_s


async def test_retry_after_of_an_http_date_without_a_date_header_counts_from_now() -> None:
    from email.utils import formatdate
    from time import time

    later = formatdate(time() + 3600, usegmt=True)
    client, _ = client_for(Recorder(httpx.Response(503, headers={"Retry-After": later})))
    with pytest.raises(QueueUnavailableError) as info:
        await client.eventbus()
    assert info.value.retry_after_s is not None
    assert 3500 < info.value.retry_after_s <= 3600
    assert info.value.status_code == 503


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("Connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.PoolTimeout("pool timed out"),
        httpx.RemoteProtocolError("peer closed connection"),
        httpx.ReadError("reset by peer"),
    ],
)
async def test_transport_errors_are_queue_unavailable(exc: Exception) -> None:
    client, _ = client_for(Recorder(exc))
    with pytest.raises(QueueUnavailableError) as info:
        await client.eventbus()
    assert info.value.status_code is None
    assert isinstance(info.value.__cause__, httpx.HTTPError)
    assert KEY not in str(info.value)


async def test_exceptions_pickle() -> None:
    import pickle

    client, _ = client_for(Recorder(json_response(500, load("error_500.json"))))
    with pytest.raises(QueueUnavailableError) as info:
        await client.eventbus()
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.message, copy.status_code) == ("Queue full", 500)

    gateway = httpx.Response(429, text="busy", headers={"Retry-After": "7"})
    client, _ = client_for(Recorder(gateway))
    with pytest.raises(QueueGatewayError) as gateway_info:
        await client.eventbus()
    copy = pickle.loads(pickle.dumps(gateway_info.value))
    assert type(copy) is QueueGatewayError
    assert (copy.message, copy.status_code, copy.retry_after_s) == (
        gateway_info.value.message,
        429,
        7.0,
    )


# --------------------------------------------------------------------------------------
# put (callback / batch)
# --------------------------------------------------------------------------------------


async def test_put_callback_wrapper() -> None:
    wrapper = load("put_callback_response.json")
    recorder = Recorder(json_response(200, wrapper))
    client, _ = client_for(recorder)
    task_id = await client.put(put_request("put_callback_offline.json"))
    assert task_id == wrapper["data"]
    assert recorder.last.url.path == "/v1/queue/put"
    assert recorder.body() == load("put_callback_offline.json")


async def test_put_tolerates_a_string_literal() -> None:
    client, _ = client_for(Recorder(string_literal(200, TASK_ID)))
    assert await client.put(put_request("put_callback_online.json")) == TASK_ID


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>proxy</html>"),
        httpx.Response(200),
        json_response(200, {"code": 200, "timestamp": 1}),
        json_response(200, [TASK_ID]),
    ],
)
async def test_put_unexpected_bodies(response: httpx.Response) -> None:
    client, _ = client_for(Recorder(response))
    with pytest.raises(QueueUnavailableError, match="unexpected answer"):
        await client.put(put_request("put_callback_online.json"))


async def test_put_wrapper_error_code() -> None:
    wrapper = {"code": 500, "timestamp": 1, "data": None, "message": "Too many concurrent"}
    client, _ = client_for(Recorder(json_response(200, wrapper)))
    with pytest.raises(QueueUnavailableError, match="Too many concurrent"):
        await client.put(put_request("put_callback_online.json"))


async def test_put_unregistered_queue_500() -> None:
    body = {"code": 500, "message": "", "timestamp": 1, "stacktrace": "NullPointerException"}
    client, _ = client_for(Recorder(json_response(500, body)))
    with pytest.raises(QueueUnavailableError) as info:
        await client.put(put_request("put_callback_offline.json"))
    assert info.value.status_code == 500


async def test_put_refuses_online_modes() -> None:
    client, _ = client_for(Recorder(httpx.Response(200)))
    for name in ("put_blocking.json", "put_streaming.json"):
        with pytest.raises(ValueError, match="put_blocking"):
            await client.put(put_request(name))


# --------------------------------------------------------------------------------------
# put_blocking
# --------------------------------------------------------------------------------------


async def test_put_blocking_returns_the_worker_answer() -> None:
    body = load("complete_request.json")["body"]
    recorder = Recorder(json_response(200, body))
    client, _ = client_for(recorder)
    result = await client.put_blocking(put_request("put_blocking.json"))
    assert result == BlockingResult(200, body)
    assert result.ok
    assert not result.timed_out
    assert recorder.body() == load("put_blocking.json")
    # The read timeout covers the server's own wait plus a margin.
    assert recorder.last.extensions["timeout"]["read"] == 300 + ONLINE_WAIT_MARGIN_S
    assert recorder.last.extensions["timeout"]["connect"] == 5.0


async def test_put_blocking_worker_errors_are_returned_not_raised() -> None:
    error = load("openai_error.json")
    client, _ = client_for(Recorder(json_response(404, error)))
    result = await client.put_blocking(put_request("put_blocking.json"))
    assert result == BlockingResult(404, error)
    assert not result.ok


async def test_put_blocking_timeout_408() -> None:
    client, _ = client_for(Recorder(httpx.Response(408)))
    result = await client.put_blocking(put_request("put_blocking.json"))
    assert result.timed_out
    assert result == BlockingResult(408, None)
    # A worker's own 408 has a body and is not the server's timeout.
    client, _ = client_for(Recorder(json_response(408, {"error": {"message": "expired"}})))
    assert not (await client.put_blocking(put_request("put_blocking.json"))).timed_out


async def test_put_blocking_default_body_and_text() -> None:
    client, _ = client_for(Recorder(json_response(200, {}), httpx.Response(200, text="plain")))
    assert await client.put_blocking(put_request("put_blocking.json")) == BlockingResult(200, {})
    assert await client.put_blocking(put_request("put_blocking.json")) == BlockingResult(
        200, "plain"
    )


@pytest.mark.parametrize(
    ("response", "exc_type", "status"),
    [
        (json_response(400, load("error_400.json")), BadRequestError, 400),
        (json_response(500, load("error_500.json")), QueueUnavailableError, 500),
        (httpx.Response(401), AuthenticationError, None),
    ],
)
async def test_put_blocking_server_errors_raise(
    response: httpx.Response, exc_type: type[Exception], status: int | None
) -> None:
    client, _ = client_for(Recorder(response))
    with pytest.raises(exc_type) as info:
        await client.put_blocking(put_request("put_blocking.json"))
    assert getattr(info.value, "status_code", None) == status


async def test_put_blocking_fills_in_the_mode_and_checks_it() -> None:
    recorder = Recorder(json_response(200, {}))
    client, _ = client_for(recorder)
    request = PutRequest(endpoint="/v1/chat/completions", data={"model": "m"}, queue="q")
    await client.put_blocking(request)
    assert recorder.body()["response_mode"] == "blocking"
    with pytest.raises(ValueError, match="response_mode"):
        await client.put_blocking(put_request("put_streaming.json"))


async def test_put_blocking_transport_error() -> None:
    client, _ = client_for(Recorder(httpx.ReadTimeout("slow")))
    with pytest.raises(QueueUnavailableError, match="timed out"):
        await client.put_blocking(put_request("put_blocking.json"))


@pytest.mark.parametrize(
    ("timeout", "wait_s"), [(None, 300), (0, 300), (-1, 300), (60, 60), (900, 600)]
)
def test_online_wait(timeout: int | None, wait_s: float) -> None:
    request = PutRequest(endpoint="/e", data={}, response_mode=ResponseMode.BLOCKING)
    assert online_wait_s(request.model_copy(update={"timeout": timeout})) == wait_s


# --------------------------------------------------------------------------------------
# put_streaming and SSE parsing
# --------------------------------------------------------------------------------------


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def sse_response(parts: list[bytes], status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, headers={"Content-Type": "text/event-stream"}, content=_chunks(parts)
    )


async def collect(client: QueueClient, request: PutRequest) -> list[SSEEvent]:
    return [event async for event in client.put_streaming(request)]


def expected_fixture_events() -> list[SSEEvent]:
    chunk = json.loads(load("event_progress_chunk.json")["payload"])["eventData"]
    data = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
    return [SSEEvent("0", "message", data), SSEEvent("1", "message", "[DONE]")]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
async def test_streaming_fixture_chunked_across_reads(size: int) -> None:
    raw = text("put_streaming_response.sse").encode()
    parts = [raw[i : i + size] for i in range(0, len(raw), size)]  # splits UTF-8 too
    recorder = Recorder(sse_response(parts))
    client, _ = client_for(recorder)
    events = await collect(client, put_request("put_streaming.json"))
    assert events == expected_fixture_events()
    assert recorder.body() == load("put_streaming.json")
    assert recorder.last.headers["Accept"] == "text/event-stream"
    assert recorder.last.extensions["timeout"]["read"] == 60 + ONLINE_WAIT_MARGIN_S


async def test_sse_crlf_split_between_reads() -> None:
    parts = [b"id:0\r", b"\nevent:message\r\ndata:a\r", b"\n\r", b"\nid:1\rdata:b\r\r"]
    client, _ = client_for(Recorder(sse_response(parts)))
    events = await collect(client, put_request("put_streaming.json"))
    assert events == [SSEEvent("0", "message", "a"), SSEEvent("1", "", "b")]


async def test_sse_field_rules() -> None:
    stream = (
        b": a comment\n"
        b"retry: 1000\n"
        b"id: 7\n"
        b"event: message\n"
        b"data: first\n"
        b"data:second\n"
        b"data:  two spaces\n"
        b"unknown: x\n"
        b"\n"
        b"\n"  # a blank line with nothing pending dispatches nothing
        b"id:8\n"
        b"event:message\n"
        b"\n"  # no data: not dispatched
        b"data:\n"
        b"\n"  # empty data is an event
        b'data:{"a":"x:y"}\n'
        b"\n"
        b"data:tail without blank line"
    )
    client, _ = client_for(Recorder(sse_response([stream])))
    events = await collect(client, put_request("put_streaming.json"))
    assert events == [
        SSEEvent("7", "message", "first\nsecond\n two spaces"),
        SSEEvent("", "", ""),
        SSEEvent("", "", '{"a":"x:y"}'),
        SSEEvent("", "", "tail without blank line"),
    ]


async def test_streaming_empty_stream() -> None:
    client, _ = client_for(Recorder(sse_response([])))
    assert await collect(client, put_request("put_streaming.json")) == []


@pytest.mark.parametrize(
    ("response", "exc_type"),
    [
        (json_response(400, load("error_400.json")), BadRequestError),
        (json_response(500, load("error_500.json")), QueueUnavailableError),
        (httpx.Response(401), AuthenticationError),
        (httpx.ConnectError("refused"), QueueUnavailableError),
    ],
)
async def test_streaming_errors_before_events(
    response: httpx.Response | Exception, exc_type: type[Exception]
) -> None:
    client, _ = client_for(Recorder(response))
    with pytest.raises(exc_type):
        await collect(client, put_request("put_streaming.json"))


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout("no chunk"), httpx.RemoteProtocolError("incomplete chunked read")]
)
async def test_streaming_cut_short(exc: Exception) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"id:0\nevent:message\ndata:x\n\n"
        raise exc

    response = httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=parts())
    client, _ = client_for(Recorder(response))
    seen: list[SSEEvent] = []

    async def drain() -> None:
        async for event in client.put_streaming(put_request("put_streaming.json")):
            seen.append(event)

    with pytest.raises(QueueUnavailableError):
        await drain()
    assert seen == [SSEEvent("0", "message", "x")]


async def test_streaming_fills_in_the_mode_and_checks_it() -> None:
    recorder = Recorder(sse_response([]))
    client, _ = client_for(recorder)
    request = PutRequest(endpoint="/v1/chat/completions", data={"model": "m"}, queue="q")
    await collect(client, request)
    assert recorder.body()["response_mode"] == "streaming"
    with pytest.raises(ValueError, match="response_mode"):
        await collect(client, put_request("put_blocking.json"))


async def test_streaming_consumer_may_stop_early() -> None:
    raw = text("put_streaming_response.sse").encode()
    client, _ = client_for(Recorder(sse_response([raw])))
    stream = client.put_streaming(put_request("put_streaming.json"))
    async for _ in stream:
        break
    await stream.aclose()


# --------------------------------------------------------------------------------------
# take
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["take_response_offline.json", "take_response_online.json", "take_response_empty.json"],
)
async def test_take_fixtures(name: str) -> None:
    recorder = Recorder(json_response(200, load(name)))
    client, _ = client_for(recorder)
    request = TakeRequest.model_validate(load("take_request.json"))
    response = await client.take(request)
    assert response.to_wire() == load(name)
    assert recorder.last.url.path == "/v1/queue/take"
    assert recorder.body() == load("take_request.json")


async def test_take_skips_unreadable_tasks_without_logging_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wire = load("take_response_online.json")
    good = wire["deepseek-r1:0"][0]
    bad_mode = {**good, "task_id": "T-bad", "ak": "sk-producer-1", "response_mode": "carrier"}
    no_id = {k: v for k, v in good.items() if k != "task_id"} | {"ak": "sk-producer-2"}
    body = {"deepseek-r1:0": [bad_mode, good, no_id, "junk"]}
    client, _ = client_for(Recorder(json_response(200, body)))
    caplog.set_level(logging.ERROR, logger="ray_worker.bella.client")
    response = await client.take(TakeRequest(queues=["deepseek-r1:0"], size=4))
    assert [t.task_id for t in response.all_tasks()] == [good["task_id"]]
    skipped = [r for r in caplog.records if "skipping unreadable task" in r.getMessage()]
    assert len(skipped) == 3
    assert getattr(skipped[0], "task_id", None) == "T-bad"
    for record in caplog.records:
        assert "sk-producer" not in record.getMessage()


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="not json"),
        httpx.Response(200),
        json_response(200, ["q:0"]),
        json_response(200, {"q:0": {"task_id": "t"}}),
    ],
)
async def test_take_unexpected_bodies(response: httpx.Response) -> None:
    client, _ = client_for(Recorder(response))
    with pytest.raises(QueueUnavailableError, match="unexpected answer") as info:
        await client.take(TakeRequest(queues=["q:0"], size=1))
    assert info.value.status_code == 200


async def test_take_strategy_is_sent_explicitly() -> None:
    recorder = Recorder(json_response(200, {}))
    client, _ = client_for(recorder)
    await client.take(TakeRequest(queues=["q:0"], size=3, strategy=TakeStrategy.ROUND_ROBIN))
    assert recorder.body() == {
        "queues": ["q:0"],
        "size": 3,
        "strategy": "round_robin",
        "process_timeout": 0,
        "process_max_retries": 0,
        "min_age_seconds": 0,
    }


# --------------------------------------------------------------------------------------
# complete and its retry
# --------------------------------------------------------------------------------------


async def test_complete_sends_the_body() -> None:
    result = load("complete_request.json")
    recorder = Recorder(string_literal(200, TASK_ID))
    client, delays = client_for(recorder)
    await client.complete(TASK_ID, result)
    assert recorder.last.method == "POST"
    assert recorder.last.url.path == f"/v1/queue/{TASK_ID}/complete"
    assert recorder.body() == result
    assert client.counters.complete_retries == 0
    assert delays == []


async def test_completes_and_takes_use_separate_connection_pools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder(string_literal(200, TASK_ID))
    client, _ = client_for(recorder, max_connections=4, complete_max_connections=2)
    assert client._complete_client is not client._client
    used: list[str] = []
    for name in ("_client", "_complete_client"):
        http = getattr(client, name)
        original = http.request

        async def tracked(
            *args: Any, _name: str = name, _original: Any = original, **kw: Any
        ) -> Any:
            used.append(_name)
            return await _original(*args, **kw)

        monkeypatch.setattr(http, "request", tracked)
    await client.complete(TASK_ID, {"status_code": 200})
    recorder.answers = [json_response(200, {})]
    await client.take(TakeRequest(queues=["q:0"], size=1))
    assert used == ["_complete_client", "_client"]
    await client.aclose()
    assert client._client.is_closed
    assert client._complete_client.is_closed


def test_complete_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="complete_max_connections"):
        QueueClient(BASE, KEY, complete_max_connections=0)


@pytest.mark.parametrize(
    "fault",
    [
        json_response(500, load("error_500.json")),
        httpx.Response(503),
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("dropped"),
    ],
)
async def test_complete_retries_retryable_faults(
    fault: httpx.Response | Exception, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(fault, fault, string_literal(200, TASK_ID))
    client, delays = client_for(recorder, attempts=4)
    caplog.set_level(logging.WARNING, logger="ray_worker.bella.client")
    await client.complete(TASK_ID, {"status_code": 200, "request_id": TASK_ID})
    assert len(recorder.requests) == 3
    assert all(recorder.body(i) == recorder.body(0) for i in range(3))
    assert client.counters.complete_retries == 2
    assert client.counters.complete_failures == 0
    assert delays == [0.5, 1.0]
    retries = [
        r for r in caplog.records if r.name == "ray_worker.bella.client" and "retrying" in r.msg
    ]
    assert [getattr(r, "task_id", None) for r in retries] == [TASK_ID, TASK_ID]
    assert [getattr(r, "attempt", None) for r in retries] == [1, 2]


async def test_complete_gives_up_with_the_last_error() -> None:
    recorder = Recorder(httpx.ConnectError("refused"), httpx.Response(502))
    client, delays = client_for(recorder, attempts=3)
    with pytest.raises(QueueUnavailableError) as info:
        await client.complete(TASK_ID, {"status_code": 200})
    assert info.value.status_code == 502  # the last error, not the first
    assert len(recorder.requests) == 3
    assert client.counters.complete_retries == 2
    assert client.counters.complete_failures == 1
    assert len(delays) == 2


@pytest.mark.parametrize(
    ("response", "exc_type"),
    [
        (
            json_response(400, {"code": 400, "message": "For input string", "timestamp": 1}),
            BadRequestError,
        ),
        (json_response(404, {"code": 404, "message": "no", "timestamp": 1}), BadRequestError),
        (httpx.Response(401), AuthenticationError),
    ],
)
async def test_complete_does_not_retry_permanent_errors(
    response: httpx.Response, exc_type: type[Exception]
) -> None:
    recorder = Recorder(response)
    client, delays = client_for(recorder, attempts=5)
    with pytest.raises(exc_type):
        await client.complete("TASK-bad", {"status_code": 200})
    assert len(recorder.requests) == 1
    assert delays == []
    assert client.counters.complete_retries == 0
    assert client.counters.complete_failures == 1


@pytest.mark.parametrize(
    "fault",
    [
        httpx.Response(429, text="<html>Too Many Requests</html>"),
        httpx.Response(403),
        httpx.Response(404, text="no"),
        httpx.Response(302, headers={"Location": "https://login.example/"}),
    ],
)
async def test_complete_retries_answers_from_a_gateway(fault: httpx.Response) -> None:
    recorder = Recorder(fault, string_literal(200, TASK_ID))
    client, delays = client_for(recorder, attempts=3)
    await client.complete(TASK_ID, {"status_code": 200})
    assert len(recorder.requests) == 2
    assert delays == [0.5]
    assert client.counters.complete_failures == 0


@pytest.mark.parametrize(("retry_after", "delay_s"), [("3", 3.0), ("0", 0.5), ("600", 10.0)])
async def test_complete_waits_at_least_retry_after_up_to_the_policy_cap(
    retry_after: str, delay_s: float
) -> None:
    fault = httpx.Response(429, text="<html/>", headers={"Retry-After": retry_after})
    recorder = Recorder(fault, string_literal(200, TASK_ID))
    client, delays = client_for(recorder, attempts=3)  # base 0.5 s, max_delay_s 10 s
    await client.complete(TASK_ID, {"status_code": 200})
    assert delays == [delay_s]


async def test_complete_single_attempt_policy() -> None:
    recorder = Recorder(httpx.Response(500))
    client, delays = client_for(recorder, attempts=1)
    with pytest.raises(QueueUnavailableError):
        await client.complete(TASK_ID, {})
    assert len(recorder.requests) == 1
    assert delays == []


async def test_complete_really_sleeps_between_attempts_by_default() -> None:
    recorder = Recorder(httpx.Response(500), string_literal(200, TASK_ID))
    client = QueueClient(
        BASE,
        KEY,
        transport=httpx.MockTransport(recorder),
        complete_retry=RetryPolicy(attempts=2, base_delay_s=0.0),
    )
    await client.complete(TASK_ID, {})
    await client.aclose()
    assert client.counters.complete_retries == 1


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(attempts=6, base_delay_s=0.5, max_delay_s=3.0, jitter=0.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittery = RetryPolicy(base_delay_s=1.0, max_delay_s=100.0, jitter=0.25)
    rng = random.Random(7)
    for n in range(1, 6):
        base = 2.0 ** (n - 1)
        for _ in range(50):
            assert base * 0.75 <= jittery.delay_s(n, rng) <= base * 1.25
    assert RetryPolicy(base_delay_s=0.0).delay_s(3) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"base_delay_s": -1.0}, {"max_delay_s": -1.0}, {"jitter": 1.5}],
)
def test_retry_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)


# --------------------------------------------------------------------------------------
# eventbus, get_task, metadata, stats
# --------------------------------------------------------------------------------------


async def test_eventbus() -> None:
    recorder = Recorder(json_response(200, load("eventbus.json")))
    client, _ = client_for(recorder)
    config = await client.eventbus()
    assert config.to_wire() == load("eventbus.json")
    assert recorder.last.method == "GET"
    assert recorder.last.url.path == "/v1/queue/eventbus"


async def test_eventbus_malformed_hides_the_url() -> None:
    body = {"url": "redis://:s3cret@h:1/0"}
    client, _ = client_for(Recorder(json_response(200, body)))
    with pytest.raises(QueueUnavailableError, match="topic") as info:
        await client.eventbus()
    assert "s3cret" not in str(info.value)


async def test_get_task() -> None:
    task = load("take_response_offline.json")["deepseek-r1:1"][0] | {
        "status": "succeeded",
        "result": load("complete_request.json"),
    }
    recorder = Recorder(json_response(200, task))
    client, _ = client_for(recorder)
    got = await client.get_task(TASK_ID)
    assert got.result == load("complete_request.json")
    assert got.status == "succeeded"
    assert recorder.last.url.path == f"/v1/queue/{TASK_ID}"


async def test_get_task_online_is_500() -> None:
    client, _ = client_for(Recorder(json_response(500, load("error_500.json"))))
    with pytest.raises(QueueUnavailableError):
        await client.get_task("TASK-12-0-B-251112123346-0001-000001")


async def test_metadata() -> None:
    recorder = Recorder(json_response(200, load("queue_metadata.json")), httpx.Response(200))
    client, _ = client_for(recorder)
    assert await client.metadata("deepseek-r1") == load("queue_metadata.json")
    assert recorder.last.url.path == "/v1/queue/deepseek-r1/metadata"
    assert await client.metadata("unknown") is None


async def test_stats() -> None:
    stats = {"queue": "deepseek-r1:1", "put": 3, "loaded": 2, "completed": 1}
    recorder = Recorder(json_response(200, stats), httpx.Response(200))
    client, _ = client_for(recorder)
    assert await client.stats("deepseek-r1:1") == stats
    assert recorder.last.url.raw_path == b"/v1/queue/deepseek-r1:1/stats"
    assert await client.stats("deepseek-r1:1") == {}


# --------------------------------------------------------------------------------------
# files and batches
# --------------------------------------------------------------------------------------


async def test_upload_file_and_content() -> None:
    file_object = {"id": "file-1", "object": "file", "bytes": 5, "purpose": "batch"}
    recorder = Recorder(json_response(200, file_object), httpx.Response(200, content=b"a\nb\n"))
    client, _ = client_for(recorder)
    line = (DATA / "batch_input_line.json").read_bytes()
    assert await client.upload_file(line, "input.jsonl") == file_object
    upload = recorder.requests[0]
    assert upload.url.path == "/v1/files"
    assert upload.headers["Content-Type"].startswith("multipart/form-data")
    content = upload.content
    assert b'name="purpose"' in content
    assert b"batch" in content
    assert b'filename="input.jsonl"' in content
    assert line in content
    assert await client.file_content("file-1") == b"a\nb\n"
    assert recorder.last.url.path == "/v1/files/file-1/content"


async def test_create_batch_with_and_without_queue() -> None:
    batch = load("batch.json")
    recorder = Recorder(json_response(200, batch))
    client, _ = client_for(recorder)
    request = BatchRequest.model_validate(load("batch_request.json"))
    created = await client.create_batch(request, queue="deepseek-r1")
    assert created == Batch.model_validate(batch)
    assert recorder.last.headers[QUEUE_NAME_HEADER] == "deepseek-r1"
    assert recorder.body() == load("batch_request.json")
    assert recorder.last.url.path == "/v1/batches"
    await client.create_batch(request)
    assert QUEUE_NAME_HEADER not in recorder.last.headers


async def test_get_list_cancel_batch() -> None:
    batch = load("batch.json")
    cancelled = batch | {"status": "cancelled"}
    recorder = Recorder(
        json_response(200, batch),
        json_response(200, load("batch_list.json")),
        json_response(200, {"object": "list", "data": [], "has_more": False}),
        json_response(202, cancelled),
    )
    client, _ = client_for(recorder)
    assert (await client.get_batch(batch["id"])).id == batch["id"]
    assert recorder.last.url.path == f"/v1/batches/{batch['id']}"
    listed = await client.list_batches(limit=5, after="BATCH-prev")
    assert [b.id for b in listed] == [batch["id"]]
    assert recorder.last.url.params["limit"] == "5"
    assert recorder.last.url.params["after"] == "BATCH-prev"
    assert await client.list_batches() == []
    assert recorder.last.url.params["limit"] == "20"
    assert "after" not in recorder.last.url.params
    assert (await client.cancel_batch(batch["id"])).status == "cancelled"
    assert recorder.last.method == "POST"
    assert recorder.last.url.path == f"/v1/batches/{batch['id']}/cancel"


@pytest.mark.parametrize(
    ("response", "call"),
    [
        (httpx.Response(200, text="oops"), "get_batch"),
        (json_response(200, {"object": "batch"}), "get_batch"),  # no id
        (json_response(200, {"object": "list", "data": {}}), "list_batches"),
        (json_response(200, {"object": "list", "data": [{"status": "x"}]}), "list_batches"),
        (json_response(202, ["x"]), "cancel_batch"),
    ],
)
async def test_batch_unexpected_bodies(response: httpx.Response, call: str) -> None:
    client, _ = client_for(Recorder(response))
    calls = {
        "get_batch": lambda: client.get_batch("BATCH-1"),
        "list_batches": lambda: client.list_batches(),
        "cancel_batch": lambda: client.cancel_batch("BATCH-1"),
    }
    with pytest.raises(QueueUnavailableError, match="unexpected answer"):
        await calls[call]()


# --------------------------------------------------------------------------------------
# take: one task nested too deeply for the JSON parser does not lose the others
# --------------------------------------------------------------------------------------


async def test_take_keeps_the_tasks_beside_one_nested_too_deeply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = load("take_response_offline.json")["deepseek-r1:1"][0]
    deep = "[" * 3000 + "]" * 3000
    deep_task = json.dumps({**good, "task_id": "T-deep", "ak": "sk-producer-3"}).replace(
        '"data": {', f'"data": {{"deep": {deep}, ', 1
    )
    body = f'{{"deepseek-r1:1": [{deep_task}, {json.dumps(good)}]}}'
    client, _ = client_for(Recorder(httpx.Response(200, content=body.encode())))
    caplog.set_level(logging.ERROR, logger="ray_worker.bella.client")
    response = await client.take(TakeRequest(queues=["deepseek-r1:1"], size=2))
    assert [t.task_id for t in response.all_tasks()] == [good["task_id"]]
    (rejected,) = response.rejected
    assert rejected.reason == "data: nested too deeply"
    assert rejected.raw["task_id"] == "T-deep"
    assert "data" not in rejected.raw
    (skipped,) = [r for r in caplog.records if "skipping unreadable task" in r.getMessage()]
    assert getattr(skipped, "task_id", None) == "T-deep"
    assert "sk-producer-3" not in skipped.getMessage()
