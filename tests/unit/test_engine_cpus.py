"""Binding a ``uni`` CPU engine's process to cores: the choice, and the node's claims on real
processes (Linux)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_worker.serve.engine_cpus import (
    bind_engine_process,
    choose_cores,
    live_claims,
    parse_cpu_list,
)

linux_only = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux only"
)


@pytest.mark.parametrize(
    ("text", "cores"),
    [("0", [0]), ("0-3", [0, 1, 2, 3]), ("5,2-3", [5, 2, 3]), ("1,1-2", [1, 2])],
)
def test_cpu_lists_parse(text: str, cores: list[int]) -> None:
    assert parse_cpu_list(text) == cores


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "0-"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad CPU list"):
        parse_cpu_list(text)


def test_auto_takes_the_lowest_free_cores_and_keeps_the_reserve() -> None:
    assert choose_cores("auto", {0, 1}, threads=1, reserved=1, taken=()) == [0]
    assert choose_cores("auto", {0, 1, 2, 3}, threads=2, reserved=1, taken=()) == [0, 1]
    assert choose_cores("auto", {4, 5, 6, 7}, threads=1, reserved=1, taken={4}) == [5]


def test_auto_leaves_the_engine_unbound_when_too_few_cores_are_free() -> None:
    # A second engine on a 2-core node: core 0 is the first engine's, core 1 the reserve.
    assert choose_cores("auto", {0, 1}, threads=1, reserved=1, taken={0}) is None
    assert choose_cores("auto", {0}, threads=1, reserved=1, taken=()) is None
    assert choose_cores("auto", {0, 1, 2}, threads=3, reserved=1, taken=()) is None


def test_nobind_binds_nothing() -> None:
    assert choose_cores("nobind", {0, 1}, threads=1, reserved=1, taken=()) is None


def test_explicit_lists_take_the_first_entry_no_other_engine_holds() -> None:
    assert choose_cores("0-1|2-3", {0, 1, 2, 3}, threads=1, reserved=1, taken=()) == [0, 1]
    assert choose_cores("0-1|2-3", {0, 1, 2, 3}, threads=1, reserved=1, taken={1}) == [2, 3]
    assert choose_cores("0-1|2-3", {0, 1, 2, 3}, threads=1, reserved=1, taken={1, 2}) is None


# -- real processes --------------------------------------------------------------------------


def _sleep_process() -> subprocess.Popen[bytes]:
    """A child process standing in for an engine."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = _sleep_process()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def cores() -> list[int]:
    """The cores this process may use (at least 2)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 cores")
    return allowed


def _affinity(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def _env(**values: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", **values}


@linux_only
@pytest.mark.parametrize("before", [None, "{not json"], ids=["no file", "a corrupt file"])
def test_a_started_engine_is_bound_and_its_claim_recorded(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], cores: list[int], before: str | None
) -> None:
    claims = tmp_path / "claims.json"
    if before is not None:
        claims.write_text(before)
    assert bind_engine_process(sleeper.pid, env=_env(), claims_path=claims) == [cores[0]]
    assert _affinity(sleeper.pid) == {cores[0]}
    assert json.loads(claims.read_text()) == {str(sleeper.pid): [cores[0]]}


@linux_only
def test_a_second_engine_does_not_take_the_first_ones_core(
    tmp_path: Path, cores: list[int]
) -> None:
    claims = tmp_path / "claims.json"
    first, second = _sleep_process(), _sleep_process()
    try:
        assert bind_engine_process(first.pid, env=_env(), claims_path=claims) == [cores[0]]
        expected = [cores[1]] if len(cores) > 2 else None
        assert bind_engine_process(second.pid, env=_env(), claims_path=claims) == expected
        if expected is None:  # left on every core this replica may use, and recorded so
            assert _affinity(second.pid) == set(cores)
        assert json.loads(claims.read_text())[str(second.pid)] == (expected or [])
        # The first engine's claim ends with its process: the core is free again.
        first.kill()
        first.wait()
        assert first.pid not in live_claims(claims)
        assert second.pid in live_claims(claims)
        third = _sleep_process()
        try:
            assert bind_engine_process(third.pid, env=_env(), claims_path=claims) == [cores[0]]
        finally:
            third.kill()
            third.wait()
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


@linux_only
def test_nobind_and_bad_settings_leave_the_engine_on_every_core(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    claims = tmp_path / "claims.json"
    everything = _affinity(sleeper.pid)
    for env in (
        _env(VLLM_CPU_OMP_THREADS_BIND="nobind"),
        _env(VLLM_CPU_OMP_THREADS_BIND="zero"),
        _env(VLLM_CPU_NUM_OF_RESERVED_CPU="one"),
    ):
        assert bind_engine_process(sleeper.pid, env=env, claims_path=claims) is None
        assert _affinity(sleeper.pid) == everything


@linux_only
def test_an_unusable_claims_file_leaves_the_engine_unbound(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    everything = _affinity(sleeper.pid)
    # A folder where the file should be: it cannot be opened.
    claims = tmp_path / "claims.json"
    claims.mkdir()
    assert bind_engine_process(sleeper.pid, env=_env(), claims_path=claims) is None
    assert _affinity(sleeper.pid) == everything
