"""Integration tier: one local Ray (with Serve) per test session, shared by every test.

A cold ``ray.init()`` costs 6-9 s on 2 cores and a Serve app tens of seconds, so tests share
the cluster and, per module, the apps they deploy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ray_worker.testing.ray_cluster import LocalRayCluster
from ray_worker.testing.redis_server import free_port


@dataclass(frozen=True)
class RayServe:
    """The session's Ray cluster and the URL of Serve's HTTP proxy."""

    cluster: LocalRayCluster
    http_url: str


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[RayServe]:
    """A local Ray head this process is connected to, with Serve on a free HTTP port."""
    from ray import serve

    cluster = LocalRayCluster(num_cpus=16).start()
    try:
        cluster.connect()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield RayServe(cluster, f"http://127.0.0.1:{port}")
    finally:
        cluster.stop()
