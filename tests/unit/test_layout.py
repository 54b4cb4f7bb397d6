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
