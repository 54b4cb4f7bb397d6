"""Fixtures shared by every test tier.

- ``redis_server``: one real ``redis-server`` on a free loopback port for the whole session.
- ``emulator``: one Bella-Queue emulator (uvicorn in a background thread) on that Redis, with
  the API key ``"test-key"``, short callback retry delays and a fast redelivery timer.
- ``unique_queue``: a fresh, valid queue name per test (registering it is up to the test).
- ``ray_serve``: one local Ray head (``LocalRayCluster``) this process is connected to, with
  Serve on a free HTTP port, shared by the integration and e2e tiers (one Ray per session:
  ``ray.init`` is process-wide).

The session fixtures are lazy: a test that does not ask for them (every unit test) starts
nothing. Tests sharing the session Redis must not FLUSHALL it; use ``unique_queue`` instead.
Polling helpers live in ``ray_worker.testing.waiting`` (``wait_for``, ``wait_for_sync``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ray_worker.emulator.server import EmulatorServer
    from ray_worker.testing.redis_server import RedisServer

EMULATOR_APIKEY = "test-key"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A started ``RedisServer`` shared by the session; closed at the end."""
    from ray_worker.testing.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


def emulator_server(redis_url: str, profile: str, **config: Any) -> EmulatorServer:
    """An emulator (not started yet) on ``redis_url`` with the tests' settings: the key
    ``"test-key"``, a free port, short callback retry delays, a fast redelivery timer;
    ``config`` sets further ``EmulatorConfig`` fields. Use it as a context manager."""
    from ray_worker.emulator.server import EmulatorConfig, EmulatorServer

    return EmulatorServer(
        EmulatorConfig(
            redis_url=redis_url,
            apikeys=(EMULATOR_APIKEY,),
            port=0,
            profile=profile,
            callback_retry_delays_s=(0.05, 0.1, 0.2),
            redelivery_check_interval_s=0.05,
            **config,
        )
    )


@pytest.fixture(scope="session")
def emulator(redis_server: RedisServer) -> Iterator[EmulatorServer]:
    """A started ``EmulatorServer`` on ``redis_server`` accepting the key ``"test-key"``."""
    with emulator_server(redis_server.url, "test") as server:
        yield server


@pytest.fixture
def unique_queue(request: pytest.FixtureRequest) -> str:
    """A queue name no other test uses: ``q-<test name>-<random>``, at most 64 characters."""
    stem = re.sub(r"[^a-zA-Z0-9_-]", "-", request.node.name)[:40]
    return f"q-{stem}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class RayServe:
    """The session's Ray cluster and the URL of Serve's HTTP proxy."""

    cluster: Any
    http_url: str


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[RayServe]:
    """A local Ray head with Serve; logical CPUs above the 2 real ones so replicas fit."""
    from ray import serve

    from ray_worker.testing.ray_cluster import LocalRayCluster
    from ray_worker.testing.redis_server import free_port

    cluster = LocalRayCluster(num_cpus=16).start()
    try:
        cluster.connect()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield RayServe(cluster, f"http://127.0.0.1:{port}")
    finally:
        cluster.stop()
