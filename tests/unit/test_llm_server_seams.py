"""Where the LLM replica leans on Ray internals: the checks fail when Ray changes under them.

The server overrides some of ``LLMServer``'s methods and reads a few of Ray's private names
(the table in ``ray_worker/serve/llm_server.py``'s docstring, checked against
``RAY_VERSION_CHECKED``): each override keeps Ray's parameters, each private name it reads
exists, and no private name of its own shadows one of Ray's.

``serve_stopping_replica`` reads Serve's own stop flag: the replica actor object Ray keeps per
process, its ``_replica_impl``, and that one's ``_shutting_down``, set first thing by
``_perform_graceful_shutdown``. If any of these moves, the worker would learn of a stop only at
``__del__`` (after every task ended or Serve killed the replica): these tests say so before a
release does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from ray_worker.config import STOP_MARGIN_S
from ray_worker.serve.llm_config import sim_llm_config, with_worker_defaults
from ray_worker.serve.llm_server import (
    RAY_PRIVATE_OVERRIDES,
    RAY_PUBLIC_OVERRIDES,
    RAY_VERSION_CHECKED,
    _set_stop_budget,
    _TaskServingMixin,
    serve_stopping_replica,
    server_class,
)
from ray_worker.serve.sim_engine import SimEngine

RAY_ATTRIBUTES_READ = ("_load_model",)
"""What the server reads of an ``LLMServer`` instance besides its public ``engine``."""


def _ray_llm_server() -> type:
    from ray.serve.llm import LLMServer

    return LLMServer


def _probe(cls: type) -> Any:
    """``cls`` without its async ``__del__`` (Serve awaits it; garbage collection would not)."""
    return type(f"{cls.__name__}Probe", (cls,), {"__del__": lambda self: None})


def _params(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _where(name: str) -> str:
    import ray

    return (
        f"Ray {ray.__version__} changed LLMServer.{name}, which BellaLLMServer overrides "
        f"(checked against Ray {RAY_VERSION_CHECKED}: see the Ray internals in "
        "ray_worker/serve/llm_server.py)"
    )


def _signature_drift(name: str, *, public: bool) -> str | None:
    """Why the server's override of ``name`` no longer fits Ray's, or None.

    A private override takes exactly Ray's parameters; a public one takes each of Ray's (same
    kind and default), and only optional keyword-only ones besides.
    """
    ray_fn = getattr(_ray_llm_server(), name, None)
    if ray_fn is None:
        return f"{_where(name)}: it is gone"
    ours_fn = getattr(server_class(), name)
    ray_params, ours = _params(ray_fn), _params(ours_fn)
    theirs = f"Ray's {inspect.signature(ray_fn)}, ours {inspect.signature(ours_fn)}"
    if not public:
        return None if ray_params == ours else f"{_where(name)}: {theirs}"
    extra = [p for p in ours if p not in ray_params]
    missing = [p for p in ray_params if p not in ours]
    optional = all(
        k is inspect.Parameter.KEYWORD_ONLY and d is not inspect.Parameter.empty
        for _, k, d in extra
    )
    return None if not missing and optional else f"{_where(name)}: {theirs}"


def _missing_attributes() -> list[str]:
    server = _probe(_ray_llm_server()).sync_init(sim_llm_config(), engine_cls=SimEngine)
    return [
        f"Ray's LLMServer no longer sets {name}, which BellaLLMServer reads (checked against "
        f"Ray {RAY_VERSION_CHECKED}: see the Ray internals in ray_worker/serve/llm_server.py)"
        for name in RAY_ATTRIBUTES_READ
        if not callable(getattr(server, name, None))
    ]


@pytest.mark.parametrize("name", RAY_PRIVATE_OVERRIDES)
def test_each_private_ray_method_the_server_overrides_keeps_rays_parameters(name: str) -> None:
    assert _signature_drift(name, public=False) is None


@pytest.mark.parametrize("name", RAY_PUBLIC_OVERRIDES)
def test_each_public_ray_method_the_server_overrides_takes_rays_parameters(name: str) -> None:
    assert _signature_drift(name, public=True) is None


def test_each_private_ray_attribute_the_server_reads_exists() -> None:
    assert _missing_attributes() == []


def test_ray_changing_a_signature_or_an_attribute_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    llm_server = _ray_llm_server()

    def engine_class_for(self: Any, llm_config: Any) -> type:
        return SimEngine

    async def start(self: Any, timeout_s: float) -> None:
        pass

    monkeypatch.setattr(llm_server, "_get_default_engine_class", engine_class_for)
    monkeypatch.setattr(llm_server, "start", start)
    monkeypatch.setattr(llm_server, "_init_multiplex_loader", lambda self, cls=None: None)
    drift = _signature_drift("_get_default_engine_class", public=False)
    assert drift is not None
    assert f"Ray {ray.__version__} changed LLMServer._get_default_engine_class" in drift
    assert f"checked against Ray {RAY_VERSION_CHECKED}" in drift
    assert "Ray's (self: 'Any', llm_config: 'Any')" in drift
    assert "LLMServer.start" in (_signature_drift("start", public=True) or "")
    (missing,) = _missing_attributes()
    assert "no longer sets _load_model" in missing


def test_ray_asks_the_server_for_the_engine_class_when_none_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Engine:
        pass

    monkeypatch.delenv("RAYLLM_VLLM_ENGINE_CLS", raising=False)
    monkeypatch.setattr("ray_worker.serve.vllm_engine.engine_class", lambda: Engine)
    server = _probe(server_class()).sync_init(sim_llm_config())
    assert server._engine_cls is Engine, _where("_get_default_engine_class")


def test_no_private_name_of_the_server_shadows_one_of_rays() -> None:
    llm_server = _ray_llm_server()
    methods = {
        name
        for name in vars(_TaskServingMixin)
        if name.startswith("_") and not name.startswith("__")
    }
    assert methods & set(dir(llm_server)) == set(RAY_PRIVATE_OVERRIDES)
    ray_server = _probe(llm_server).sync_init(sim_llm_config(), engine_cls=SimEngine)
    ours = object.__new__(_probe(server_class()))
    _TaskServingMixin._init_state(ours, sim_llm_config(), SimEngine)
    assert not set(vars(ours)) & set(vars(ray_server))


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
