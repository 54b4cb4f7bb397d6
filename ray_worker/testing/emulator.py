"""The tests' Bella-Queue emulator settings: the one API key and a factory with the test timings.

This module owns ``EMULATOR_APIKEY`` (the key every test emulator accepts and every test client
sends) and ``emulator_server`` (an ``EmulatorServer`` with that key, a free port, short callback
retry delays and a fast redelivery timer). Test tiers, notebooks and benchmarks import it; it
must not be used by the worker itself, and imports the emulator only when one is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_worker.emulator.server import EmulatorServer

__all__ = ["EMULATOR_APIKEY", "emulator_server"]

EMULATOR_APIKEY = "test-key"
"""The API key of the tests' emulators (Bearer key of puts, takes and completes)."""


def emulator_server(redis_url: str, profile: str, **config: Any) -> EmulatorServer:
    """An emulator (not started yet) on ``redis_url`` with the tests' settings: the key
    ``EMULATOR_APIKEY``, a free port, short callback retry delays, a fast redelivery timer;
    ``config`` sets further ``EmulatorConfig`` fields. Use it as a context manager."""
    from ray_worker.emulator.config import EmulatorConfig
    from ray_worker.emulator.server import EmulatorServer

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
