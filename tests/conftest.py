"""Fixtures shared by every test tier, and the tier marks by folder.

Every item under ``tests/integration`` is marked ``integration`` and every item under
``tests/e2e`` is marked ``e2e`` here (``pytest_collection_modifyitems``); modules set no tier
mark by hand.

Lanes: ``make test`` runs the integration and e2e tiers in two pytest-xdist workers with
``--dist loadscope``; here a scope is a lane of ``ray_worker.testing.lanes``
(``pytest_xdist_make_scheduler``) and the collection is put in the lanes' order. Each worker
has its own session fixtures (Redis, emulator, Ray) on free ports. Every report has its lone
surrogates escaped (``pytest_runtest_makereport``): xdist cannot send them.

- ``redis_server``: one real ``redis-server`` on a free loopback port for the whole session.
- ``emulator``: one Bella-Queue emulator (uvicorn in a background thread) on that Redis, made
  by ``ray_worker.testing.emulator.emulator_server`` (the key ``EMULATOR_APIKEY``, short
  callback retry delays and a fast redelivery timer).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ray_worker.testing import lanes
from ray_worker.testing.emulator import emulator_server
from ray_worker.testing.reports import escape_surrogates

if TYPE_CHECKING:
    from ray_worker.emulator.server import EmulatorServer
    from ray_worker.testing.redis_server import RedisServer

TESTS_DIR = Path(__file__).parent
TIER_MARKS = {"integration": pytest.mark.integration, "e2e": pytest.mark.e2e}
"""The mark every item under ``tests/<folder>`` gets."""


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadscope``, the scopes are the lanes (``lanes.lane_of``)."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lanes.lane_of(nodeid)

    return LaneScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Every report leaves without lone surrogates (``reports.escape_surrogates``): xdist
    cannot send one, and its worker would crash."""
    outcome: Any = yield
    escape_surrogates(outcome.get_result())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each item by its folder: ``tests/integration`` -> ``integration``,
    ``tests/e2e`` -> ``e2e`` (so ``-m "not e2e"`` and friends need no mark in the modules);
    order the collection by lane (``lanes.rank``: xdist hands scopes out in that order)."""
    for item in items:
        try:
            folder = item.path.relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        mark = TIER_MARKS.get(folder)
        if mark is not None and item.get_closest_marker(mark.name) is None:
            item.add_marker(mark)
    items.sort(key=lambda item: lanes.rank(item.nodeid))  # stable: keeps the order in a rank


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A started ``RedisServer`` shared by the session; closed at the end."""
    from ray_worker.testing.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def emulator(redis_server: RedisServer) -> Iterator[EmulatorServer]:
    """A started ``EmulatorServer`` on ``redis_server`` accepting the key ``EMULATOR_APIKEY``."""
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
    http_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start_serve(self) -> None:
        """Start Serve with its proxy on ``http_port`` (a no-op while it runs). Needed again
        after a ``serve run`` joined to this Ray is stopped: Ctrl-C makes it shut Serve down
        for the whole cluster, and the next ``serve.run`` would start it on port 8000."""
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[RayServe]:
    """A local Ray head with Serve; logical CPUs above the 2 real ones so replicas fit."""
    from ray_worker.testing.ray_cluster import LocalRayCluster
    from ray_worker.testing.redis_server import free_port

    cluster = LocalRayCluster(num_cpus=16).start()
    try:
        cluster.connect()
        ray_serve = RayServe(cluster, free_port())
        ray_serve.start_serve()
        yield ray_serve
    finally:
        cluster.stop()
