"""Unit tier: no Ray, no network, strict. Starting Ray here is a bug, so ``ray.init`` raises.

Every item under ``tests/unit`` gets (``pytest_collection_modifyitems``):

- a ``timeout`` mark of ``UNIT_TIMEOUT_S`` (a test that sets its own timeout mark keeps it): a
  unit test that hangs fails in seconds instead of holding the suite for the global 300 s;
- a ``filterwarnings`` mark that turns every warning into an error, except the filters in
  ``UNIT_WARNING_FILTERS``, each with its reason. A test's own ``filterwarnings`` marks still
  apply on top.

Fixtures shared by the unit modules: ``rigs`` and ``make`` (``PollRig`` builders from
``tests/unit/poll_rig.py``, stopped after the test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.poll_rig import PollRig

UNIT_DIR = Path(__file__).parent
UNIT_TIMEOUT_S = 30
"""Per-test limit of the unit tier (the slowest unit test takes about a second)."""

UNIT_WARNING_FILTERS: tuple[str, ...] = (
    # torch 2.13 warns from its own torch.utils.mkldnn when vllm imports it (the unit tests that
    # build an LLM config import vllm); nothing this project calls.
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    # Ray 2.60's own pydantic models (ray.llm's config classes) pass extra keywords to Field;
    # raised by whichever unit test imports ray.serve.llm first (alone, the autoscaling tests).
    "ignore:Using extra keyword arguments on `Field`:pydantic.warnings.PydanticDeprecatedSince20",
)
"""Warnings the unit tier lets through, later filters winning (``-W`` syntax), each with why."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the unit items strict: a short timeout and warnings as errors."""
    for item in items:
        if not item.path.is_relative_to(UNIT_DIR):
            continue
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))
        # First in the item's own marks, so a test's own filterwarnings marks win over it.
        item.add_marker(pytest.mark.filterwarnings("error", *UNIT_WARNING_FILTERS), append=False)


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
