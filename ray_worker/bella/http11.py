"""The take's own HTTP/1.1 client: kept connections, one request at a time on each.

An idle worker takes every ``idle_backoff_max_s`` (50 ms in the shipped configs), and nearly
every one of those takes comes back empty. Through ``httpx.AsyncClient`` one empty take costs
the poller about 650 µs of CPU (httpx's request and response models, then httpcore and h11);
this client writes the request line and headers itself and reads the answer straight off an
``asyncio`` stream, about 50 µs, measured side by side with ``python -m bench.bench_take``.
At 20 takes a second that is the difference between 1.3% of a core and 0.1%.

It does what a take needs and nothing more: ``POST`` with a body, answers framed by
``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the connection, keep-alive
unless either side says ``close``, ``http://`` and ``https://`` (TLS with httpx's own context:
certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``). :func:`usable_for` says whether a base URL
qualifies; one with credentials in it, or one a proxy from the environment applies to, keeps
using httpx, which handles both. An answer comes back as an ``httpx.Response``, and failures
as httpx's own exceptions (``ConnectError``, ``ConnectTimeout``, ``WriteTimeout``,
``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``), so that
:class:`~ray_worker.bella.transport.BellaHttp` reads and maps both exactly as it does httpx's.

Like httpx it never repeats a request: a take that was sent may have been served (the server
pops the tasks before it answers), so a connection that breaks after the request left is an
error for the caller, never a silent retry. A kept connection the server has closed while it
sat idle is noticed before use and replaced.

Timeouts: ``connect_timeout_s`` for the TCP (and TLS) handshake, then ``timeout_s`` for
writing the request and ``timeout_s`` for reading the whole answer, so one request lasts at
most ``connect_timeout_s + 2 * timeout_s`` (the bound the poller's stop relies on).
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

__all__ = ["KeptHttp11", "usable_for"]

MAX_HEADER_BYTES = 64 * 1024
"""The longest status line plus headers read (asyncio's stream limit); longer is an error."""

MAX_IDLE_CONNECTIONS = 4
"""Kept connections per client: one per pool taking at the same moment, a few at most."""

_USER_AGENT = b"bella-ray-worker"


def usable_for(base_url: str) -> bool:
    """Whether :class:`KeptHttp11` may talk to ``base_url`` directly: ``http``/``https``,
    no credentials in the URL, and no proxy from the environment for its host (httpx, which
    honours those, is used otherwise)."""
    url = httpx.URL(base_url)
    if url.scheme not in ("http", "https") or url.userinfo:
        return False
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy:
        return True
    return bool(urllib.request.proxy_bypass(url.host))  # NO_PROXY


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def usable(self) -> bool:
        """Still open, and nothing arrived while it sat idle: a server closing an idle
        connection may first send an unasked answer (a 408), which ``at_eof`` alone misses
        while those bytes sit unread; reading them as the next request's answer would be
        wrong. asyncio has no public peek, hence the look at the reader's buffer."""
        buffered = getattr(self.reader, "_buffer", b"")
        return not (self.writer.is_closing() or self.reader.at_eof() or buffered)

    def close(self) -> None:
        self.writer.close()


class KeptHttp11:
    """``POST`` over kept HTTP/1.1 connections to one server; closed with :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        url = httpx.URL(base_url)
        if not usable_for(base_url):
            raise ValueError(f"KeptHttp11 cannot serve {url.scheme}://{url.host} (see usable_for)")
        self._host = url.host
        self._tls = url.scheme == "https"
        default_port = 443 if self._tls else 80
        self._port = url.port or default_port
        host = f"[{url.host}]" if ":" in url.host else url.host
        shown = host if self._port == default_port else f"{host}:{self._port}"
        self._host_header = shown.encode("ascii")
        self._prefix = url.raw_path.rstrip(b"/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ssl: ssl.SSLContext | None = httpx.create_ssl_context() if self._tls else None
        self._idle: list[_Connection] = []
        self._closed = False

    async def aclose(self) -> None:
        """Close every kept connection; later requests are refused."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """``POST path`` with ``body``; the answer, whatever its status. Raises httpx's
        exceptions for transport faults (see the module docstring)."""
        if self._closed:
            raise httpx.ConnectError("the client is closed")
        head = self._head(path, body, headers)
        conn = await self._acquire()
        keep = False
        try:
            response, keep = await self._exchange(conn, head, body)
        finally:
            if keep and not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
            else:
                conn.close()
        return response

    def _head(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [
            b"POST " + self._prefix + path.encode("ascii") + b" HTTP/1.1",
            b"Host: " + self._host_header,
            b"User-Agent: " + _USER_AGENT,
            b"Accept: */*",
            b"Accept-Encoding: identity",
            b"Content-Length: " + str(len(body)).encode("ascii"),
        ]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                # An API key read with its trailing newline would end the headers early (and
                # let the rest be read as a header of its own): refused, as httpx refuses it.
                raise httpx.LocalProtocolError(f"illegal value in header {name!r}")
            lines.append(name.encode("ascii") + b": " + value.encode("ascii"))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._tls else None,
                    limit=MAX_HEADER_BYTES,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connect to {self._host}:{self._port} timed out") from exc
        except OSError as exc:  # ssl.SSLError included
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _Connection(reader, writer)

    async def _exchange(
        self, conn: _Connection, head: bytes, body: bytes
    ) -> tuple[httpx.Response, bool]:
        try:
            async with asyncio.timeout(self.timeout_s):
                conn.writer.writelines((head, body))  # one write: asyncio joins them
                await conn.writer.drain()
        except TimeoutError as exc:
            raise httpx.WriteTimeout("writing the request timed out") from exc
        except OSError as exc:
            raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from exc
        try:
            async with asyncio.timeout(self.timeout_s):
                return await _read_response(conn.reader)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("reading the answer timed out") from exc
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.RemoteProtocolError(_protocol_detail(exc)) from exc
        except OSError as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc


def _protocol_detail(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        if not exc.partial:
            return "the server closed the connection without an answer"
        return "the server closed the connection in the middle of its answer"
    if isinstance(exc, asyncio.LimitOverrunError):
        return f"the answer's headers are longer than {MAX_HEADER_BYTES} bytes"
    return f"malformed answer: {exc}"


async def _read_response(reader: asyncio.StreamReader) -> tuple[httpx.Response, bool]:
    """One answer off ``reader``: the response and whether the connection may be kept."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(code)
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1:].isspace() or line[:1].isspace():
                raise ValueError(f"header line {line[:80]!r}")
            headers.append((name, value.strip()))
        if 100 <= status < 200:
            continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        break
    fields = {name.lower(): value for name, value in headers}
    connection = fields.get(b"connection", b"").lower()
    keep = b"close" not in connection and (version == b"HTTP/1.1" or b"keep-alive" in connection)
    encoding = fields.get(b"transfer-encoding", b"").lower()
    if status in (204, 304):
        content = b""
    elif encoding:
        if encoding.rsplit(b",", 1)[-1].strip() != b"chunked":
            raise ValueError(f"transfer-encoding {encoding[:40]!r}")
        content = await _read_chunked(reader)
    elif b"content-length" in fields:
        length = int(fields[b"content-length"])
        if length < 0:
            raise ValueError("negative content-length")
        content = await reader.readexactly(length)
    else:
        content = await reader.read()  # framed by the end of the connection
        keep = False
    return httpx.Response(status, headers=headers, content=content), keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers: ignored
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
