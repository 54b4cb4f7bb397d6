"""Integration tier: real redis-server, the emulator over real HTTP, local Ray Serve with the
simulated engine. The session's Ray (``ray_serve``) and emulator come from ``tests/conftest.py``;
modules deploy their apps once and share them between their tests.

Fixtures shared by the integration modules (a module defines its own only where it differs:
another emulator, other client settings, another scope):

- ``queue``: a queue name for the module's worker app, ``<module>-<random>`` (module scope; the
  worker registers it).
- ``client``: a ``QueueClient`` on the session's emulator with ``EMULATOR_APIKEY``.
- ``receiver``: a started ``CallbackReceiver`` for the test's callbacks.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from ray_worker.testing.emulator import EMULATOR_APIKEY

if TYPE_CHECKING:
    from ray_worker.bella.client import QueueClient
    from ray_worker.emulator.server import EmulatorServer
    from ray_worker.testing.callback_receiver import CallbackReceiver


@pytest.fixture(scope="module")
def queue(request: pytest.FixtureRequest) -> str:
    """``<module>-<8 hex>``, e.g. ``worker-sim-1a2b3c4d`` for ``test_worker_sim.py``."""
    stem = request.module.__name__.rpartition(".")[2].removeprefix("test_").replace("_", "-")
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    """A producer/worker client of the session's emulator."""
    from ray_worker.bella.client import QueueClient

    async with QueueClient(emulator.url, EMULATOR_APIKEY) as queue_client:
        yield queue_client


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    """A callback receiver on a free loopback port, closed after the test."""
    from ray_worker.testing.callback_receiver import CallbackReceiver

    with CallbackReceiver() as callbacks:
        yield callbacks
