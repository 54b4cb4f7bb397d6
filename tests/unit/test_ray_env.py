"""``ray-worker check``'s ``ray environment`` line: which environment ``serve run`` builds the
app in. The Ray lookups are replaced here (no Ray in the unit tier); the integration test
``test_cli_serve`` runs the line against a real started Ray."""

from __future__ import annotations

import pytest

from ray_worker import cli, ray_env
from ray_worker.ray_env import CONTRACT, fingerprints

SHELL = {
    "BELLA_QUEUE_APIKEY": "the-key-123",
    "BELLA_QUEUE_URL": "http://bella:8080",
    "BELLA_QUEUE_QUEUES": "q:0,q:1",
}


def test_the_contract_is_the_env_settings() -> None:
    assert set(CONTRACT) == {
        "BELLA_QUEUE_URL",
        "BELLA_QUEUE_APIKEY",
        "BELLA_QUEUE_QUEUES",
        "BELLA_EVENTBUS_URL",
    }


def test_fingerprints_hide_the_values() -> None:
    prints = fingerprints(SHELL)
    assert prints["BELLA_EVENTBUS_URL"] is None
    assert prints["BELLA_QUEUE_APIKEY"] == fingerprints({**SHELL})["BELLA_QUEUE_APIKEY"]
    assert (
        prints["BELLA_QUEUE_APIKEY"]
        != fingerprints({"BELLA_QUEUE_APIKEY": "other"})["BELLA_QUEUE_APIKEY"]
    )
    assert "the-key-123" not in repr(prints)
    assert fingerprints({"BELLA_QUEUE_APIKEY": ""})["BELLA_QUEUE_APIKEY"] is None


def _line(
    monkeypatch: pytest.MonkeyPatch,
    *,
    address: str | None,
    there: dict[str, str] | Exception,
) -> cli.Check:
    for name in CONTRACT:
        monkeypatch.delenv(name, raising=False)
    for name, value in SHELL.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ray_env, "running_ray", lambda: address)

    def read(addr: str, timeout_s: float) -> dict[str, str | None]:
        assert addr == address
        if isinstance(there, Exception):
            raise there
        return fingerprints(there)

    monkeypatch.setattr(ray_env, "ray_environment", read)
    return cli._check_ray_environment(5.0)


def test_no_ray_to_join_is_this_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    check = _line(monkeypatch, address=None, there={})
    assert check.outcome == "ok"
    assert "starts one" in check.detail


def test_a_ray_without_the_key_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    check = _line(monkeypatch, address="10.0.0.1:6379", there={"BELLA_QUEUE_URL": "x"})
    assert check.outcome == "FAIL"
    assert "10.0.0.1:6379" in check.detail
    assert "has no BELLA_QUEUE_APIKEY" in check.detail


def test_a_ray_with_another_key_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    there = {**SHELL, "BELLA_QUEUE_APIKEY": "an-old-key"}
    check = _line(monkeypatch, address="10.0.0.1:6379", there=there)
    assert check.outcome == "FAIL"
    assert "is not this shell's" in check.detail
    assert "the-key-123" not in check.detail
    assert "an-old-key" not in check.detail


def test_other_settings_that_differ_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    there = {"BELLA_QUEUE_APIKEY": SHELL["BELLA_QUEUE_APIKEY"], "BELLA_QUEUE_URL": "http://o"}
    check = _line(monkeypatch, address="10.0.0.1:6379", there=there)
    assert check.outcome == "WARN"
    assert "BELLA_QUEUE_URL (different there)" in check.detail
    assert "BELLA_QUEUE_QUEUES (unset there)" in check.detail
    assert "BELLA_EVENTBUS_URL" not in check.detail  # unset on both sides


def test_the_same_environment_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    check = _line(monkeypatch, address="10.0.0.1:6379", there=dict(SHELL))
    assert check.outcome == "ok"


def test_a_ray_that_does_not_answer_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    check = _line(monkeypatch, address="10.0.0.1:6379", there=TimeoutError("no answer"))
    assert check.outcome == "WARN"
    assert "did not answer" in check.detail
