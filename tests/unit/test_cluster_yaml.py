"""``cluster.yaml``: valid for ``ray up`` by Ray's own checks, pinned like pyproject.toml.

Validation runs what ``ray up`` runs before it talks to a cloud: ``prepare_config`` (merge with
the provider's defaults.yaml, per-type worker bounds, docker checks) and ``validate_config``
(Ray's JSON schema plus its cross-field rules). Nothing here imports boto3 or contacts AWS.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ray_worker.serve.data_parallel import layout_of, serve_replica_bounds

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
PYPROJECT = ROOT / "pyproject.toml"
DEEPSEEK = ROOT / "configs" / "deepseek.yaml"
DEEPSEEK_R1 = ROOT / "configs" / "deepseek-r1.yaml"


@pytest.fixture
def cluster() -> dict[str, Any]:
    document = yaml.safe_load(CLUSTER.read_text())
    assert isinstance(document, dict)
    return document


def _pin(requirements: list[str], name: str) -> str:
    """The ``==`` version of ``name`` (extras allowed) in a requirement list."""
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", requirement.strip())
        if match:
            return match.group(2)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def _ray_pin() -> str:
    project = _pyproject()["project"]
    serve_pin = _pin(project["dependencies"], "ray")
    gpu_pin = _pin(project["optional-dependencies"]["gpu"], "ray")
    assert serve_pin == gpu_pin, "ray[serve] and the gpu extra's ray[llm] must pin one version"
    assert "ray[llm]" in project["optional-dependencies"]["gpu"][0]
    return serve_pin


def _vllm_pin_of_ray_llm() -> str:
    """The vLLM version ``ray[llm]`` pins, read from the installed ray's metadata."""
    for requirement in importlib.metadata.requires("ray") or []:
        spec, _, marker = requirement.partition(";")
        if re.match(r"vllm\b", spec) and "llm" in marker:
            return _pin([spec], "vllm")
    raise AssertionError("ray's metadata pins no vllm for the llm extra")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _gpu_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if node.get("resources", {}).get("GPU", 0) > 0
    }


# ------------------------------------------------------------------------- Ray's validation


def test_ray_validates_the_prepared_config(cluster: dict[str, Any]) -> None:
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_is_real(cluster: dict[str, Any]) -> None:
    """A typo in a node type is rejected: the schema forbids unknown keys there."""
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_h100"]["min_worker"] = 1
    # jsonschema.ValidationError (jsonschema ships no type stubs, so it is not named here).
    with pytest.raises(Exception, match="'min_worker' was unexpected"):
        validate_config(prepare_config(broken))

    no_head = copy.deepcopy(cluster)
    no_head["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(no_head))


def test_worker_bounds(cluster: dict[str, Any]) -> None:
    gpu_types = _gpu_node_types(cluster)
    assert gpu_types, "no GPU worker node type"
    assert cluster["head_node_type"] not in gpu_types
    for node in gpu_types.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cluster["max_workers"]


# ----------------------------------------------------------------------------------- pins


def test_image_matches_the_ray_pin(cluster: dict[str, Any]) -> None:
    ray_version = _ray_pin()
    python = re.search(r">=\s*3\.(\d+)", _pyproject()["project"]["requires-python"])
    assert python is not None
    image = cluster["docker"]["image"]
    assert image.startswith(f"rayproject/ray-llm:{ray_version}-py3{python.group(1)}-cu"), image
    assert "head_image" not in cluster["docker"], "head and workers must run one image"
    assert "worker_image" not in cluster["docker"]


def test_setup_installs_the_package_with_the_gpu_extra(cluster: dict[str, Any]) -> None:
    commands = cluster["setup_commands"]
    [(remote, local)] = cluster["file_mounts"].items()
    assert local == "."
    remote_dir = remote.replace("~", "$HOME", 1)
    installs = [c for c in commands if c.startswith("pip install")]
    assert installs, commands
    assert f'"{remote_dir}[gpu]"' in installs[0]


def test_setup_checks_ray_and_vllm_versions(cluster: dict[str, Any]) -> None:
    ray_version, vllm_version = _ray_pin(), _vllm_pin_of_ray_llm()
    [check] = [c for c in cluster["setup_commands"] if c.startswith("python -c")]
    code = shlex.split(check)[2]
    compile(code, "<setup check>", "exec")  # valid Python
    assert f"('{ray_version}', '{vllm_version}')" in code


# --------------------------------------------------------------------------------- sizing


def test_gpu_nodes_hold_the_deepseek_config(cluster: dict[str, Any]) -> None:
    serve = yaml.safe_load(DEEPSEEK.read_text())
    [llm] = serve["applications"][0]["args"]["llm_configs"]
    tp = llm["engine_kwargs"].get("tensor_parallel_size", 1) * llm["engine_kwargs"].get(
        "pipeline_parallel_size", 1
    )
    autoscaling = llm["deployment_config"]["autoscaling_config"]
    accelerator = f"accelerator_type:{llm['accelerator_type']}"

    matching = {
        name: node
        for name, node in _gpu_node_types(cluster).items()
        if node["resources"].get(accelerator, 0) > 0
    }
    assert matching, f"no node type advertises {accelerator}"
    for node in matching.values():
        assert node["resources"]["GPU"] % tp == 0, "a replica's GPUs must fit on one node"
    most = sum(n["resources"]["GPU"] * n["max_workers"] for n in matching.values())
    always = sum(n["resources"]["GPU"] * n["min_workers"] for n in matching.values())
    assert most >= autoscaling["max_replicas"] * tp
    assert always >= autoscaling["min_replicas"] * tp


def _matching(config: dict[str, Any], llm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    accelerator = f"accelerator_type:{llm['accelerator_type']}"
    matching = {
        name: node
        for name, node in _gpu_node_types(config).items()
        if node["resources"].get(accelerator, 0) > 0
    }
    assert matching, f"no node type advertises {accelerator}"
    return matching


def _r1_h100_alternative() -> dict[str, Any]:
    """The commented H100 entry of deepseek-r1.yaml, uncommented."""
    lines = DEEPSEEK_R1.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Replace the entry above with:" in line)
    block = [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("# ")]
    [llm] = yaml.safe_load("\n".join(block))
    assert isinstance(llm, dict)
    return llm


def test_gpu_nodes_hold_the_deepseek_r1_groups(cluster: dict[str, Any]) -> None:
    """A data-parallel group (all its ranks' GPUs) fits one node, and the nodes the max."""
    serve = yaml.safe_load(DEEPSEEK_R1.read_text())
    [llm] = serve["applications"][0]["args"]["llm_configs"]
    layout = layout_of(llm)
    assert layout.is_data_parallel
    bounds = serve_replica_bounds(llm["deployment_config"], layout.data_parallel_size)
    assert bounds.max_replicas is not None
    groups_at_most = layout.groups(bounds.max_replicas)

    matching = _matching(cluster, llm)
    for node in matching.values():
        assert node["resources"]["GPU"] % layout.gpus_per_group == 0, "a group spans nodes"
    most = sum(
        node["resources"]["GPU"] // layout.gpus_per_group * node["max_workers"]
        for node in matching.values()
    )
    assert most >= groups_at_most >= 1


def test_gpu_nodes_hold_the_deepseek_r1_h100_alternative(cluster: dict[str, Any]) -> None:
    llm = _r1_h100_alternative()
    layout = layout_of(llm)
    assert not layout.is_data_parallel
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (8, 2)
    matching = _matching(cluster, llm)
    for node in matching.values():
        assert node["resources"]["GPU"] % layout.tensor_parallel_size == 0, "TP spans nodes"
    most = sum(n["resources"]["GPU"] * n["max_workers"] for n in matching.values())
    assert most >= llm["deployment_config"]["num_replicas"] * layout.gpus_per_rank


# ------------------------------------------------------------------------ secrets, comments


KEY_FROM_SECRET_MANAGER = re.compile(r'BELLA_QUEUE_APIKEY="\$\(python -c "[^"]+"\)"')


def test_no_secrets_in_the_file(cluster: dict[str, Any]) -> None:
    for text in _strings(cluster):
        # The key's name appears only where it is read from the secret manager.
        text = KEY_FROM_SECRET_MANAGER.sub("", text).replace("export BELLA_QUEUE_APIKEY", "")
        assert "APIKEY" not in text.upper(), text
        assert "PASSWORD" not in text.upper(), text
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), "an AWS access key id"
        assert not re.search(r"redis://[^@\s]*:[^@\s]+@", text), "a Redis URL with a password"
    assert "aws_credentials" not in cluster["provider"]


def test_the_head_starts_ray_with_the_api_key_from_the_secret_manager(
    cluster: dict[str, Any],
) -> None:
    """``serve run CONFIG`` builds the app in a Ray task on the head, in the environment of the
    head's ``ray start``: the key must be there, fetched in the same shell command, and Ray
    must not start without it."""
    (start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    fetch = KEY_FROM_SECRET_MANAGER.search(start)
    assert fetch, start
    rest = start[fetch.end() :]
    assert re.match(r"\s*&& export BELLA_QUEUE_APIKEY\s*&& ray start --head\b", rest), rest
    snippet = re.search(r'python -c "([^"]+)"', fetch.group(0))
    assert snippet
    code = snippet.group(1)
    compile(code, "key-fetch", "exec")  # valid Python
    region = re.search(r"region_name='([^']+)'", code)
    assert region
    assert region.group(1) == cluster["provider"]["region"]
    assert "SecretId='bella/queue-apikey'" in code
    assert "secret-id bella/queue-apikey" in CLUSTER.read_text()  # the header says the same id
    assert any("boto3" in c for c in cluster["head_setup_commands"])
    syntax = subprocess.run(["bash", "-n", "-c", start], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    for command in cluster["worker_start_ray_commands"]:
        assert "APIKEY" not in command, "GPU nodes get the key through the replicas' arguments"


def test_every_key_is_commented() -> None:
    """Each mapping key has a comment on its line or directly above it."""
    key = re.compile(r"^\s*(?:- )?[A-Za-z_~][\w./~-]*:(?:\s|$)")
    previous = ""
    missing = []
    for number, line in enumerate(CLUSTER.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            previous = ""
            continue
        commented = " #" in line or previous.startswith("#")
        if key.match(line) and not stripped.startswith("#") and not commented:
            missing.append(f"{number}: {line}")
        previous = stripped
    assert not missing, "keys without a comment:\n" + "\n".join(missing)
