"""Where the LLM replica leans on Ray internals: the checks fail when Ray changes under them.

``serve_stopping_replica`` reads Serve's own stop flag (Ray 2.60.0): the replica actor object
Ray keeps per process, its ``_replica_impl``, and that one's ``_shutting_down``, set first
thing by ``_perform_graceful_shutdown``. If any of these moves, the worker would learn of a
stop only at ``__del__`` (after every task ended or Serve killed the replica): these tests say
so before a release does.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from ray_worker.config import STOP_MARGIN_S
from ray_worker.serve.llm_config import sim_llm_config, with_worker_defaults
from ray_worker.serve.llm_server import _set_stop_budget, serve_stopping_replica


def test_serve_sets_its_stop_flag_first_thing_in_the_graceful_shutdown() -> None:
    from ray.serve._private import replica

    source = inspect.getsource(replica.Replica._perform_graceful_shutdown)
    body = [line.strip() for line in source.splitlines() if line.strip()]
    first_statement = next(line for line in body[1:] if not line.startswith(("#", '"')))
    assert first_statement == "self._shutting_down = True"
    init = inspect.getsource(replica.ReplicaActor.__init__)
    assert "self._replica_impl" in init


def test_ray_keeps_the_actor_object_of_this_process() -> None:
    from ray._private.worker import global_worker

    assert isinstance(global_worker.actors, dict)
    assert hasattr(global_worker, "actor_id")


def test_outside_a_replica_nothing_is_stopping() -> None:
    assert serve_stopping_replica() is False


def test_the_flag_is_read_from_the_replica_object(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.worker import global_worker

    class Impl:
        _shutting_down = False

    class Actor:
        _replica_impl = Impl()

    actor_id: Any = "this-actor"
    monkeypatch.setattr(type(global_worker), "actor_id", actor_id, raising=False)
    monkeypatch.setitem(global_worker.actors, actor_id, Actor())
    assert serve_stopping_replica() is False
    Impl._shutting_down = True
    assert serve_stopping_replica() is True


def test_serve_gets_the_stop_budget_plus_the_margin() -> None:
    cfg = with_worker_defaults(sim_llm_config())
    _set_stop_budget(cfg, 120.0)
    assert cfg.deployment_config["graceful_shutdown_timeout_s"] == 120.0 + STOP_MARGIN_S


def test_an_operators_own_graceful_shutdown_timeout_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = with_worker_defaults(
        sim_llm_config(deployment_config={"graceful_shutdown_timeout_s": 20})
    )
    _set_stop_budget(cfg, 120.0)
    assert cfg.deployment_config["graceful_shutdown_timeout_s"] == 20
    assert "below the stop budget" in caplog.text
