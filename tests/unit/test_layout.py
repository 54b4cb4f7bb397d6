"""The package layout's import rules: folders by where code runs and what it may import.

Every ``import`` statement of every module is read with ``ast`` (lazy imports inside functions
included), so a rule cannot be dodged by importing late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ray_worker"

DEV_TOOLS = ("ray_worker.testing", "ray_worker.emulator", "ray_worker.dev")
"""Development tools: the worker itself never imports them."""
OPERATOR_SHELL = {"ray_worker.cli"}
"""``ray-worker`` runs the dev tools on request (``ray-worker emulator``, ``demo``,
``tiny-model``); it is the operator's shell, not code that runs in the cluster."""

NO_RAY = ("ray_worker.bella", "ray_worker.worker", "ray_worker.task")
"""Plain asyncio: unit-testable without Ray."""
ONLY_SERVE_IMPORTS = ("ray.serve", "vllm")
"""Only ``ray_worker.serve`` (and the dev tools) may import these."""

HOP = "ray_worker.hop"
"""What crosses the poller-to-replica hop: plain, both sides import it."""
POLLER_SIDE = (
    "ray_worker.worker",
    "ray_worker.serve.poller_host",
    "ray_worker.serve.handles",
)
"""Code that runs in the ``QueuePoller`` replica."""
REPLICA_SIDE = (
    "ray_worker.task.runner",
    "ray_worker.task.cancel_watch",
    "ray_worker.task.seats",
    "ray_worker.serve.llm_server",
    "ray_worker.serve.dp_server",
    "ray_worker.serve.task_host",
    "ray_worker.serve.load_report",
    "ray_worker.serve.engine_io",
    "ray_worker.serve.vllm_engine",
    "ray_worker.serve.engine_cpus",
    "ray_worker.serve.sim_engine",
    "ray_worker.serve.lora",
    "ray_worker.serve.reasoning",
)
"""Code that runs in the LLM replicas."""
BOTH_SIDES = (
    HOP,
    "ray_worker.serve.answering",
    "ray_worker.serve.ray_errors",
    "ray_worker.serve.redelivery",
    "ray_worker.task.answers",
    "ray_worker.task.outbox",
    "ray_worker.task.limits",
    "ray_worker.serve.llm_config",
    "ray_worker.serve.autoscaling",
    "ray_worker.serve.data_parallel",
)
"""The hop module and the helpers each side uses whole (the answering kit, the answer paths,
the outbox, pure helpers): never code of one side."""
APP_BUILDER = ("ray_worker.serve.app",)
"""``serve run``'s ``build_app``: it binds both sides' deployments together."""


def _modules() -> dict[str, list[str]]:
    """Module name -> every module it imports (absolute names)."""
    out: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                imported.append(base)
                imported.extend(f"{base}.{alias.name}" for alias in node.names)
        out[name] = imported
    return out


MODULES = _modules()


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_folder_is_seen() -> None:
    folders = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    expected = {"bella", "worker", "task", "eventbus", "serve", "emulator", "dev", "testing"}
    assert expected <= folders


@pytest.mark.parametrize("module", sorted(MODULES))
def test_production_never_imports_dev_tools(module: str) -> None:
    if _within(module, DEV_TOOLS) or module in OPERATOR_SHELL:
        return
    bad = [i for i in MODULES[module] if _within(i, DEV_TOOLS)]
    assert not bad, f"{module} imports development tools: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, NO_RAY)))
def test_plain_asyncio_folders_never_import_ray(module: str) -> None:
    bad = [i for i in MODULES[module] if _within(i, ("ray", "vllm", "redis"))]
    assert not bad, f"{module} must run without Ray: it imports {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_serve_imports_ray_serve_and_vllm(module: str) -> None:
    if _within(module, ("ray_worker.serve", *DEV_TOOLS)):
        return
    bad = [i for i in MODULES[module] if _within(i, ONLY_SERVE_IMPORTS)]
    assert not bad, f"{module} imports {bad}; only ray_worker.serve may"


def test_the_rules_see_lazy_imports() -> None:
    # llm_server imports vLLM inside a function only: the walk must still find it.
    assert any(_within(i, ("vllm",)) for i in MODULES["ray_worker.serve.vllm_engine"])


def _side_modules() -> list[str]:
    return sorted(
        m
        for m in MODULES
        if _within(m, ("ray_worker.worker", "ray_worker.task", "ray_worker.serve", HOP))
        and m not in ("ray_worker.worker", "ray_worker.task", "ray_worker.serve")
    )


@pytest.mark.parametrize("module", _side_modules())
def test_every_module_of_the_hop_says_where_it_runs(module: str) -> None:
    sides = [
        name
        for name, prefixes in (
            ("poller", POLLER_SIDE),
            ("replica", REPLICA_SIDE),
            ("both", BOTH_SIDES),
            ("app builder", APP_BUILDER),
        )
        if _within(module, prefixes)
    ]
    assert len(sides) == 1, f"{module} must be listed in exactly one side (it is in {sides})"


@pytest.mark.parametrize(
    ("side", "other"),
    [("poller", "replica"), ("replica", "poller"), ("both", "poller"), ("both", "replica")],
)
def test_no_module_runs_on_both_sides_of_the_hop(side: str, other: str) -> None:
    tables = {"poller": POLLER_SIDE, "replica": REPLICA_SIDE, "both": BOTH_SIDES}
    crossing = {
        module: bad
        for module in _side_modules()
        if _within(module, tables[side])
        and (bad := [i for i in MODULES[module] if _within(i, tables[other])])
    }
    assert not crossing, f"{side} modules import {other} modules (only {HOP} crosses): {crossing}"


def test_the_hop_module_is_plain() -> None:
    bad = [i for i in MODULES[HOP] if not _within(i, ("ray_worker.bella.protocol",))]
    bad = [i for i in bad if i.partition(".")[0] == "ray_worker" or _within(i, ("ray",))]
    assert not bad, f"{HOP} must import no Ray and nothing of either side: {bad}"


# ---------------------------------------------------------------- the event bus's own hop

EVENTBUS_CALLER_SIDE = ("ray_worker.eventbus.client", "ray_worker.eventbus.batching")
"""Event-bus code that runs in the callers (LLM replicas, the poller)."""
EVENTBUS_ACTOR_SIDE = ("ray_worker.eventbus.publisher_actor", "ray_worker.eventbus.redis_writer")
"""Event-bus code that runs in the per-node publisher actor."""
EVENTBUS_SHARED = ("ray_worker.eventbus.shared",)
"""What crosses the event-bus hop: pure helpers both sides import."""
EVENTBUS_CHECKS = ("ray_worker.eventbus.redis_check",)
"""One-shot Redis checks of the CLI and the poller: on neither side of the event-bus hop."""
ACTOR_CLASS = "ray_worker.eventbus.publisher_actor"
"""The one crossing: ``client`` imports the actor class to create the actor by it."""


def _eventbus_modules() -> list[str]:
    return sorted(
        m for m in MODULES if _within(m, ("ray_worker.eventbus",)) and m != "ray_worker.eventbus"
    )


@pytest.mark.parametrize("module", _eventbus_modules())
def test_every_event_bus_module_says_where_it_runs(module: str) -> None:
    tables = (EVENTBUS_CALLER_SIDE, EVENTBUS_ACTOR_SIDE, EVENTBUS_SHARED, EVENTBUS_CHECKS)
    assert sum(_within(module, t) for t in tables) == 1, f"{module} must be in exactly one table"


@pytest.mark.parametrize(
    ("side", "others"),
    [
        (EVENTBUS_CALLER_SIDE, EVENTBUS_ACTOR_SIDE + EVENTBUS_CHECKS),
        (EVENTBUS_ACTOR_SIDE, EVENTBUS_CALLER_SIDE + EVENTBUS_CHECKS),
        (EVENTBUS_SHARED, EVENTBUS_CALLER_SIDE + EVENTBUS_ACTOR_SIDE + EVENTBUS_CHECKS),
        (EVENTBUS_CHECKS, EVENTBUS_CALLER_SIDE + EVENTBUS_ACTOR_SIDE),
    ],
)
def test_no_event_bus_module_runs_on_both_sides_of_its_hop(
    side: tuple[str, ...], others: tuple[str, ...]
) -> None:
    crossing = {
        module: bad
        for module in _eventbus_modules()
        if _within(module, side)
        and (
            bad := [
                i
                for i in MODULES[module]
                if _within(i, others)
                and not (module == "ray_worker.eventbus.client" and _within(i, (ACTOR_CLASS,)))
            ]
        )
    }
    assert not crossing, f"event-bus modules import the other side's: {crossing}"


@pytest.mark.parametrize(
    ("module", "banned"),
    [
        ("ray_worker.eventbus.shared", ("ray", "redis")),
        ("ray_worker.eventbus.batching", ("ray", "redis")),
        ("ray_worker.eventbus.redis_writer", ("ray",)),
        ("ray_worker.eventbus.redis_check", ("ray",)),
    ],
)
def test_the_plain_event_bus_modules_stay_plain(module: str, banned: tuple[str, ...]) -> None:
    bad = [i for i in MODULES[module] if _within(i, banned)]
    assert not bad, f"{module} must not import {banned}: {bad}"
