"""A tiny HTTP server on loopback that records the callback POSTs Bella-Queue sends (§6.4).

This module owns a thread-backed receiver for tests, notebooks and the demo: it records each
JSON body with its path, can answer with a chosen status, and can drop the first N requests
(closing the connection without an answer) to exercise the sender's IO-error retries.
It must not be used by the worker itself.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["CallbackReceiver"]


class CallbackReceiver:
    """Records ``(path, json_body)`` of every POST; use as a context manager.

    ``drop_first`` requests are answered by closing the connection (an IO error for the
    sender); the rest get ``status`` with an empty body.
    """

    def __init__(self, *, drop_first: int = 0, status: int = 200) -> None:
        self.drop_first = drop_first
        self.status = status
        self.attempts = 0
        self.received: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="callback-receiver", daemon=True
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with receiver._lock:
                    receiver.attempts += 1
                    drop = receiver.attempts <= receiver.drop_first
                if drop:
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with receiver._lock:
                    receiver.received.append((self.path, body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``; append any path."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def bodies(self, path: str | None = None) -> list[Any]:
        """The JSON bodies received so far (optionally only those POSTed to ``path``)."""
        with self._lock:
            return [body for p, body in self.received if path is None or p == path]

    def answers(self, task_id: str) -> list[dict[str, Any]]:
        """The JSON object bodies whose ``request_id`` is ``task_id``, in arrival order."""
        return [b for b in self.bodies() if isinstance(b, dict) and b.get("request_id") == task_id]

    def start(self) -> CallbackReceiver:
        """Start serving in a daemon thread."""
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> CallbackReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
