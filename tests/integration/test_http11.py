"""The take's own HTTP/1.1 client (``ray_worker.bella.http11``) against real servers on
loopback: scripted asyncio servers for every framing and fault, a TLS server with a
self-signed certificate, and ``QueueClient.take`` through it with its errors mapped as httpx's
are. No Ray.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_worker.bella.client import QueueClient
from ray_worker.bella.http11 import KeptHttp11, usable_for
from ray_worker.bella.protocol import TakeRequest
from ray_worker.errors import AuthenticationError, QueueUnavailableError

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]
TASK = {
    "task_id": "T-1",
    "endpoint": "/v1/chat/completions",
    "queue": "q",
    "level": 0,
    "data": {"model": "m"},
    "response_mode": "blocking",
}


@dataclass
class Server:
    """An asyncio server on loopback running ``script`` for each connection; counts them and
    keeps every request it read (``read_request``)."""

    script: Script
    connections: int = 0
    requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = field(default_factory=list)
    server: asyncio.Server | None = None

    @classmethod
    async def started(cls, script: Script, *, tls: ssl.SSLContext | None = None) -> Server:
        """A server on a free loopback port, listening (TLS with ``tls``)."""
        server = cls(script)
        server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
        return server

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[bytes, dict[bytes, bytes], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        request = (lines[0], headers, body)
        self.requests.append(request)
        return request


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """``Server.started``, each server closed after the test."""
    servers: list[Server] = []

    async def start(script: Script, *, tls: ssl.SSLContext | None = None) -> Server:
        server = await Server.started(script, tls=tls)
        servers.append(server)
        return server

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()


def answer(status: int, body: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 %d X" % status, b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def kept(url: str, timeout_s: float = 5.0) -> KeptHttp11:
    return KeptHttp11(url, timeout_s=timeout_s, connect_timeout_s=2.0)


def keep_answering(body: bytes, *extra: bytes) -> Script:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        while True:
            await s.read_request(r)
            w.write(answer(200, body, *extra))
            await w.drain()

    return script


async def test_a_post_is_answered_and_its_connection_kept(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(keep_answering(b'{"a":1}', b"Date: Mon, 07 Dec 2026 07:00:00 GMT"))
    client = kept(server.url + "/prefix/")
    try:
        for i in range(3):
            body = json.dumps({"i": i}).encode()
            response = await client.post("/v1/queue/take", body, {"Authorization": "Bearer k"})
            assert response.status_code == 200
            assert response.json() == {"a": 1}
            assert response.headers["date"] == "Mon, 07 Dec 2026 07:00:00 GMT"
    finally:
        await client.aclose()
    assert server.connections == 1  # kept
    line, headers, body = server.requests[2]
    assert line == b"POST /prefix/v1/queue/take HTTP/1.1"
    assert headers[b"authorization"] == b"Bearer k"
    assert headers[b"host"] == server.url.removeprefix("http://").encode()
    assert json.loads(body) == {"i": 2}


async def test_an_answer_far_larger_than_the_header_limit(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    """A take of many long prompts: megabytes in one answer, past the stream's buffer limit."""
    body = json.dumps({"q:0": [{"text": "x" * 999_000}, {"text": "y" * 999_000}]}).encode()
    server = await serve(keep_answering(body))
    client = kept(server.url)
    try:
        assert (await client.post("/x", b"{}", {})).content == body
    finally:
        await client.aclose()


async def test_chunked_and_close_delimited_answers(serve: Callable[..., Awaitable[Server]]) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        await s.read_request(r)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        w.write(b'3;ext=1\r\n{"a\r\n4\r\n":2}\r\n0\r\nX-Trailer: t\r\n\r\n')
        await s.read_request(r)
        w.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"b":3}')
        await w.drain()

    server = await serve(script)
    client = kept(server.url)
    try:
        assert (await client.post("/x", b"{}", {})).json() == {"a": 2}
        assert (await client.post("/x", b"{}", {})).json() == {"b": 3}
        # Framed by the end of the connection: not kept, the next one is new.
        assert (await client.post("/x", b"{}", {})).json() == {"a": 2}
    finally:
        await client.aclose()
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_replaced_unseen(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        await s.read_request(r)
        w.write(answer(200, b'{"n":%d}' % s.connections))
        await w.drain()
        if s.connections == 1:
            # Idle timeout of a server that says so first: an unasked 408, then close.
            await asyncio.sleep(0.05)
            w.write(answer(408, b"idle"))
            await w.drain()

    server = await serve(script)
    client = kept(server.url)
    try:
        assert (await client.post("/x", b"", {})).json() == {"n": 1}
        await asyncio.sleep(0.3)
        assert (await client.post("/x", b"", {})).json() == {"n": 2}
        await asyncio.sleep(0.3)  # closed without a word this time
        assert (await client.post("/x", b"", {})).json() == {"n": 3}
    finally:
        await client.aclose()
    assert len(server.requests) == 3


async def test_a_request_is_never_sent_twice(serve: Callable[..., Awaitable[Server]]) -> None:
    """The server read the take and dropped the connection: it may have popped tasks, so the
    client reports the fault and does not repeat the request."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        await s.read_request(r)

    server = await serve(script)
    async with QueueClient(server.url, "k") as client:
        with pytest.raises(QueueUnavailableError, match="without an answer"):
            await client.take(TakeRequest(queues=["q:0"], size=1))
    assert len(server.requests) == 1


async def test_faults_map_to_the_errors_httpx_faults_map_to(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        await s.read_request(r)
        await asyncio.sleep(5)

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        await s.read_request(r)
        w.write(b"SMTP ready\r\n\r\n")
        await w.drain()

    async def refusals(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        await s.read_request(r)
        w.write(answer(503, b'{"code":503,"message":"busy"}', b"Retry-After: 7"))
        await s.read_request(r)
        w.write(answer(401, b""))
        await w.drain()

    take = TakeRequest(queues=["q:0"], size=1)
    slow = await serve(silent)
    async with QueueClient(slow.url, "k", timeout_s=0.3) as client:
        with pytest.raises(QueueUnavailableError, match="timed out"):
            await client.take(take)
    bad = await serve(garbage)
    async with QueueClient(bad.url, "k") as client:
        with pytest.raises(QueueUnavailableError, match="RemoteProtocolError"):
            await client.take(take)
    refusing = await serve(refusals)
    async with QueueClient(refusing.url, "k") as client:
        with pytest.raises(QueueUnavailableError) as info:
            await client.take(take)
        assert (info.value.status_code, info.value.retry_after_s) == (503, 7.0)
        with pytest.raises(AuthenticationError):
            await client.take(take)
    closed = refusing.url
    assert refusing.server is not None
    refusing.server.close()
    await refusing.server.wait_closed()
    async with QueueClient(closed, "k") as client:
        with pytest.raises(QueueUnavailableError, match="cannot connect"):
            await client.take(take)


async def test_a_key_with_a_line_break_is_refused_unsent(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(keep_answering(b"{}"))
    async with QueueClient(server.url, "the-key\n") as client:
        with pytest.raises(QueueUnavailableError, match="LocalProtocolError"):
            await client.take(TakeRequest(queues=["q:0"], size=1))
    assert server.requests == []
    # httpx refuses it alike (the mapping is the same on both paths).
    with pytest.raises(httpx.LocalProtocolError):
        async with httpx.AsyncClient() as plain:
            await plain.post(server.url, headers={"Authorization": "Bearer the-key\n"})


async def test_take_reads_tasks_through_it(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(keep_answering(json.dumps({"q:0": [TASK]}).encode()))
    async with QueueClient(server.url, "k") as client:
        response = await client.take(TakeRequest(queues=["q:0"], size=1))
        assert [t.task_id for t in response.all_tasks()] == ["T-1"]
        await client.take(TakeRequest(queues=["q:0"], size=1))
    line, headers, body = server.requests[0]
    assert line == b"POST /v1/queue/take HTTP/1.1"
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["queues"] == ["q:0"]
    assert server.connections == 1


async def test_concurrent_posts_take_a_connection_each(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
        while True:
            _, _, body = await s.read_request(r)
            await asyncio.sleep(0.05)
            w.write(answer(200, body))
            await w.drain()

    server = await serve(script)
    client = kept(server.url)
    try:
        bodies = [json.dumps({"i": i}).encode() for i in range(3)]
        answers = await asyncio.gather(*(client.post("/x", b, {}) for b in bodies))
        assert [a.content for a in answers] == bodies
    finally:
        await client.aclose()
    assert server.connections == 3


@settings(max_examples=40, deadline=None)
@given(body=st.binary(max_size=3000), cuts=st.lists(st.integers(1, 700), max_size=8))
def test_any_chunking_reads_back_the_body(body: bytes, cuts: list[int]) -> None:
    async def run() -> bytes:
        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Server) -> None:
            await s.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            rest = body
            for cut in cuts:
                part, rest = rest[:cut], rest[cut:]
                if part:
                    w.write(b"%x\r\n%s\r\n" % (len(part), part))
            if rest:
                w.write(b"%x\r\n%s\r\n" % (len(rest), rest))
            w.write(b"0\r\n\r\n")
            await w.drain()

        server = await Server.started(script)
        client = kept(server.url)
        try:
            return (await client.post("/x", b"", {})).content
        finally:
            await client.aclose()
            assert server.server is not None
            server.server.close()

    assert asyncio.run(run()) == body


async def test_https_with_the_trust_httpx_uses(
    serve: Callable[..., Awaitable[Server]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    await asyncio.to_thread(
        subprocess.run,
        [*openssl, "-keyout", str(key), "-out", str(cert), *names],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await serve(keep_answering(b'{"tls":true}'), tls=context)
    url = server.url.replace("http://", "https://")
    untrusting = kept(url)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusting.post("/x", b"", {})
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    client = kept(url)
    try:
        assert (await client.post("/x", b"", {})).json() == {"tls": True}
        assert (await client.post("/x", b"", {})).json() == {"tls": True}
    finally:
        await client.aclose()
    assert server.connections == 1  # the refused handshake never got past TLS; then one, kept


def test_urls_httpx_must_serve_are_left_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert usable_for("http://bella:8080")
    assert usable_for("https://bella.example.com/base")
    assert not usable_for("http://user:pw@bella:8080")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert not usable_for("https://bella.example.com")
    assert usable_for("http://bella:8080")
    monkeypatch.setenv("NO_PROXY", "bella.example.com")
    assert usable_for("https://bella.example.com")
    monkeypatch.setenv("ALL_PROXY", "http://proxy:3128")
    assert not usable_for("http://bella:8080")
    # Kept off the take's path: the client then takes through httpx.
    assert QueueClient("http://bella:8080", "k")._take_http is None
