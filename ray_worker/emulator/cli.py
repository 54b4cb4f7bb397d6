"""``python -m ray_worker.emulator`` (also ``ray-worker emulator``): the emulator in the foreground.

This module owns the command line: its flags, the foreground uvicorn server that ends
gracefully on SIGINT and SIGTERM (exit 0), and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from ray_worker.emulator.config import EmulatorConfig
from ray_worker.emulator.routes import create_app
from ray_worker.emulator.server import bind_socket

logger = logging.getLogger(__name__)

__all__ = ["main"]


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
        prog="python -m ray_worker.emulator",
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
    sock = bind_socket(args.host, args.port)
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
