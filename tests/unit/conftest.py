"""Unit tier: no Ray, no network. Starting Ray here is a bug, so ``ray.init`` raises.

Fixtures shared by the unit modules: ``rigs`` and ``make`` (``PollRig`` builders from
``tests/unit/poll_rig.py``, stopped after the test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.unit.poll_rig import PollRig


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def _refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", _refuse)


@pytest.fixture
async def rigs() -> AsyncIterator[list[PollRig]]:
    """Collects the rigs a test builds and stops them afterwards."""
    made: list[PollRig] = []
    yield made
    for rig in made:
        await rig.close()


@pytest.fixture
def make(rigs: list[PollRig]) -> Callable[..., PollRig]:
    """Builds a ``PollRig(*args, **kwargs)`` that ``rigs`` stops after the test."""

    def build(*args: Any, **kwargs: Any) -> PollRig:
        rig = PollRig(*args, **kwargs)
        rigs.append(rig)
        return rig

    return build
