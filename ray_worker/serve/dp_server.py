"""The data-parallel LLM deployment's server: ``BellaDPServer``, ``BellaLLMServer`` on ``DPServer``.

This module owns the server class of a ``data_parallel_size`` > 1 deployment (DP attention
with expert parallelism, e.g. the full DeepSeek-R1): ``BellaLLMServer``'s task serving over Ray
2.60's public ``ray.serve.llm.deployment.DPServer``, whose constructor joins the replica to its
gang (rank, master address, its bundles of the gang's placement group) before ``LLMServer``
starts the engine, and whose ``get_deployment_options`` turns the deployment into gangs of
``data_parallel_size`` replicas (``ray_worker.serve.data_parallel`` says what that means for the
worker's counts). It adds no behaviour of its own; ``build_llm_deployment``
(``ray_worker.serve.llm_server``) picks it for such configs.

The method order is ``BellaDPServer``, ``BellaLLMServer``, the task-serving mixin, Ray's
``LLMServer`` (public), ``DPServer``, then Ray's internal ``LLMServer``: every ``super()`` call
of the mixin (the constructor, ``get_deployment_options``) reaches ``DPServer``'s first.

Importing this module is cheap: the class is created on first attribute access (module
``__getattr__``, as ``BellaLLMServer``), which keeps it picklable by reference for Serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Created on first access by the module ``__getattr__`` below.
    BellaDPServer: type

__all__ = ["BellaDPServer", "dp_server_class"]


def _make_dp_server_class() -> type:
    from ray.serve.llm.deployment import DPServer

    from ray_worker.serve.llm_server import server_class

    return type(
        "BellaDPServer",
        (server_class(), DPServer),
        {
            "__module__": __name__,
            "__qualname__": "BellaDPServer",
            "__doc__": (
                "``BellaLLMServer`` as one rank of a data-parallel gang (Ray's ``DPServer``; "
                "see ``ray_worker.serve.dp_server``)."
            ),
        },
    )


def __getattr__(name: str) -> Any:
    if name != "BellaDPServer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _make_dp_server_class()
    globals()[name] = cls
    return cls


def dp_server_class() -> type:
    """``BellaDPServer`` (imports ``ray.serve.llm`` and vLLM on first call)."""
    cls: type = globals().get("BellaDPServer") or __getattr__("BellaDPServer")
    return cls
