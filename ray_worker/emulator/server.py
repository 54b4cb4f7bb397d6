"""The emulator under uvicorn in a background thread, for tests, notebooks and the demo.

This module owns :class:`EmulatorServer`: binding (a free port when asked for 0), serving the
app of :mod:`~ray_worker.emulator.routes` on its own event loop in a thread, waiting until it
answers, stopping and restarting it (same port, same Redis), and the test controls on
completes (:meth:`EmulatorServer.fail_completes` until :meth:`EmulatorServer.heal_completes`).
The command line is :mod:`~ray_worker.emulator.cli`. It must not be imported by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType

import httpx
import uvicorn

from ray_worker.emulator.config import EmulatorConfig
from ray_worker.emulator.routes import CompleteFaults, create_app

logger = logging.getLogger(__name__)

__all__ = ["EmulatorConfig", "EmulatorServer", "bind_socket"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (0: a free port), inheritable."""
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
        sock = bind_socket(self._requested.host, self._requested.port)
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
