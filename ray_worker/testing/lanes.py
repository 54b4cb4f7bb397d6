"""The test suite's two lanes: which integration and e2e tests may run side by side.

``make test`` runs the integration and e2e tiers in two pytest-xdist workers with ``--dist
loadscope``; ``tests/conftest.py`` makes each scope a lane (``lane_of``) and orders the
collection (``rank``), since xdist hands scopes out in collection order.

- The **serve lane** (``SERVE_LANE``): the e2e tier, and modules that start a Ray of their own
  whose Serve takes port 8000 (two of those at once would collide). One worker runs it, first,
  in ``SERVE_LANE``'s order.
- Every other module is a scope of its own: its module fixtures are set up once, and whichever
  worker is free takes the next module, ``LONGEST_FIRST`` before the rest.

Paths are test node ids' module parts, relative to the repository root.
"""

from __future__ import annotations

__all__ = ["LONGEST_FIRST", "SERVE", "SERVE_LANE", "lane_of", "rank"]

SERVE = "serve"
"""The serve lane's scope."""
SERVE_LANE = (
    "tests/e2e/test_engine_processes.py",
    "tests/e2e/",
    "tests/integration/test_cli_serve.py",
)
"""The serve lane's modules (path prefixes), in the order it runs them. The module with a
``serve run`` of its own goes before the e2e tier's shared one starts, so the two never idle
side by side."""
LONGEST_FIRST = tuple(
    f"tests/integration/test_{name}.py"
    for name in ("lifecycle", "outage", "soak", "autoscaling_sim", "two_nodes", "worker_sim")
)
"""Integration modules of a minute or more (measured in lanes): handed out before the others,
so the short ones even out the lanes' ends. The two that mostly wait (on redeploys, on real-time
outages) go first, beside the serve lane's CPU-heavy engine starts; the soak, CPU-heavy itself,
after them. Only the order depends on it."""


def _module(nodeid: str) -> str:
    return nodeid.partition("::")[0]


def lane_of(nodeid: str) -> str:
    """The xdist scope of a test: ``SERVE`` for the serve lane, else its module's path."""
    module = _module(nodeid)
    return SERVE if module.startswith(SERVE_LANE) else module


def rank(nodeid: str) -> int:
    """Where a test goes in the collection: the serve lane in ``SERVE_LANE``'s order, then
    ``LONGEST_FIRST``, then the rest (a stable sort keeps their order)."""
    module = _module(nodeid)
    for position, prefix in enumerate((*SERVE_LANE, *LONGEST_FIRST)):
        if module.startswith(prefix):
            return position
    return len(SERVE_LANE) + len(LONGEST_FIRST)
