"""The suite's lanes (``ray_worker.testing.lanes``): what may run side by side under ``make
test``'s two xdist workers stays in the serve lane, and the lists name modules that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_worker.testing.lanes import LONGEST_FIRST, SERVE, SERVE_LANE, lane_of, rank

REPO = Path(__file__).resolve().parents[2]
TIERS = ("integration", "e2e")
SERVE_SIGNS = ("8000", "serve_worker(", '"ray_worker.cli", "serve"', "tiny_model: Path")
"""What puts a module in the serve lane: Serve's default port, a ``serve run`` or ``ray-worker
serve`` of its own (a Ray on default ports, Serve on 8000), or a vLLM engine."""


def _modules() -> list[str]:
    return sorted(
        path.relative_to(REPO).as_posix()
        for tier in TIERS
        for path in (REPO / "tests" / tier).glob("test_*.py")
    )


@pytest.mark.parametrize("module", _modules())
def test_a_module_that_takes_port_8000_or_vllm_runs_in_the_serve_lane(module: str) -> None:
    source = (REPO / module).read_text()
    signs = [sign for sign in SERVE_SIGNS if sign in source]
    if signs or module.startswith("tests/e2e/"):
        assert lane_of(f"{module}::test_x") == SERVE, (
            f"{module} shows {signs}: add it to SERVE_LANE"
        )
    else:
        assert lane_of(f"{module}::test_x") == module  # a scope of its own


def test_the_lists_name_modules_that_exist() -> None:
    for prefix in (*SERVE_LANE, *LONGEST_FIRST):
        assert (REPO / prefix).exists(), prefix
    assert not set(LONGEST_FIRST) & {m for m in _modules() if lane_of(m) == SERVE}


def test_the_collection_order_runs_the_serve_lane_first_in_its_order() -> None:
    nodeids = [f"{module}::test_x" for module in _modules()]
    ordered = sorted(nodeids, key=rank)
    lanes = [lane_of(nodeid) for nodeid in ordered]
    serve_count = lanes.count(SERVE)
    assert lanes[:serve_count] == [SERVE] * serve_count  # the serve lane is one block, first
    assert ordered[0].startswith("tests/e2e/test_engine_processes.py")  # its own run first
    e2e = [i for i, n in enumerate(ordered) if n.startswith("tests/e2e/")]
    assert e2e == list(range(len(e2e)))  # the e2e tier in one stretch: its shared run uninterrupted
    longest = [
        n.partition("::")[0] for n in ordered[serve_count : serve_count + len(LONGEST_FIRST)]
    ]
    assert longest == list(LONGEST_FIRST)
