"""The replica server's request handling on the simulated engine without Ray, for unit tests.

This module owns ``SimServer``: ``BellaLLMServer``'s vLLM-free mixin (``_TaskServingMixin``) on
``FakeLLMServer``, a stand-in for Ray's ``LLMServer`` base that calls what the mixin needs in
Ray's order; ``SimConfig``, the few ``LLMConfig`` fields it reads (a simulated engine with two
slow slots); ``make_sim_server``; and the ``CHAT`` endpoint with ``chat_body``. It must not start
Ray, a Serve replica or a real engine.
"""

from __future__ import annotations

from typing import Any

from ray_worker.serve.llm_server import _TaskServingMixin
from ray_worker.serve.sim_engine import SimEngine

__all__ = [
    "CHAT",
    "SLOW",
    "FakeLLMServer",
    "SimConfig",
    "SimServer",
    "chat_body",
    "make_sim_server",
]

CHAT = "/v1/chat/completions"
SLOW = {"ttft_s": 0.0, "tokens_per_s": 20.0}
"""Slow decode so requests stay running while a test looks at them; tests never wait it out."""


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hello there"}], **extra}


class FakeLLMServer:
    """Stand-in for Ray's LLMServer: what the mixin calls on its base, in Ray's order (the
    constructor resolves the engine class, then ``start`` makes and starts the engine)."""

    engine: Any

    async def __init__(self, llm_config: Any, *, engine_cls: Any = None, **_: Any) -> None:  # type: ignore[misc]
        self._engine_cls = engine_cls or self._get_default_engine_class()
        await self.start()

    async def start(self) -> None:
        raise AssertionError("a simulated engine starts without Ray's start (and its telemetry)")

    def _get_default_engine_class(self) -> Any:
        raise AssertionError("the simulated engine is passed in as engine_cls")

    async def __del__(self) -> None:
        pass


class SimServer(_TaskServingMixin, FakeLLMServer):
    def __del__(self) -> None:  # type: ignore[override]
        """Serve awaits the async ``__del__``; plain garbage collection here must not warn."""


class SimConfig:
    """The ``LLMConfig`` fields the mixin reads: model ``sim``, two slow simulated slots."""

    def __init__(self) -> None:
        self.model_id = "sim"
        self.engine_kwargs: dict[str, Any] = {}
        self.experimental_configs = {"bella_sim_engine": {"max_num_seqs": 2, **SLOW}}
        self.deployment_config: dict[str, Any] = {}
        self.runtime_env = None


async def make_sim_server(config: Any = None) -> Any:
    """A ``SimServer`` constructed as Serve does (``__new__``, then the async ``__init__``)."""
    server = SimServer.__new__(SimServer)
    await server.__init__(config or SimConfig(), engine_cls=SimEngine)  # type: ignore[misc]
    return server
