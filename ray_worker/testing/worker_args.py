"""The worker app's args for tests and benchmarks: the simulated engine on local queues."""

from __future__ import annotations

from typing import Any

__all__ = ["SIM_MODEL", "TEST_DRAIN_TIMEOUT_S", "sim_worker_args"]

SIM_MODEL = "sim-model"
TEST_DRAIN_TIMEOUT_S = 5.0
"""The stop budget of test apps (production: ``poller.drain_timeout_s``, 600 s)."""


def sim_worker_args(
    queue_url: str,
    queue: str,
    *,
    model: str = SIM_MODEL,
    replicas: int = 1,
    sim: dict[str, Any] | None = None,
    deployment: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """``WorkerAppArgs`` (as a dict) serving ``model`` on the simulated engine, taking
    ``queue:0`` and ``queue:1`` (registered at start-up) from ``queue_url``.

    ``sim`` are ``SimEngineSettings`` fields, ``deployment`` extra ``deployment_config``
    keys; ``sections`` are further app args (``poller={...}``, ``dispatcher={...}``, ...).
    The stop budget (``poller.drain_timeout_s``) is ``TEST_DRAIN_TIMEOUT_S`` unless given: a
    test app deleted with long tasks still running then stops in seconds, not minutes.
    """
    sections["poller"] = {"drain_timeout_s": TEST_DRAIN_TIMEOUT_S, **sections.get("poller", {})}
    return {
        "queue_url": queue_url,
        "queues": [f"{queue}:0", f"{queue}:1"],
        "register_queues": True,
        "engine": "simulated",
        **sections,
        "llm_configs": [
            {
                "model_loading_config": {"model_id": model, "model_source": model},
                "accelerator_config": {"kind": "cpu"},
                "experimental_configs": {"bella_sim_engine": dict(sim or {})},
                "deployment_config": {
                    "num_replicas": replicas,
                    "ray_actor_options": {"num_cpus": 0.1},
                    **(deployment or {}),
                },
            }
        ],
    }
