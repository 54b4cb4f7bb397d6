"""LoRA adapters: the ``base:adapter`` syntax, the config's adapter path, the replica's loader
and the server mixin running an adapter task on the simulated engine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from ray_worker.bella.protocol import ResponseMode
from ray_worker.config import WorkerAppArgs, adapter_of
from ray_worker.errors import ModelNotFoundError
from ray_worker.serve.handles import ServeReplicas
from ray_worker.serve.llm_config import LORA_PATH_KEY, as_llm_config, lora_path_of
from ray_worker.serve.lora import BellaLoraLoader
from tests.unit.fakes import make_task
from tests.unit.sim_server import CHAT, SimConfig, chat_body, make_sim_server


@pytest.mark.parametrize(
    ("model", "adapter"),
    [
        ("base:ad", "ad"),
        ("base:my-adapter_v1.2", "my-adapter_v1.2"),
        ("base", None),
        ("base:", None),
        ("base:../x", None),
        ("base:a/b", None),
        ("base:.x", None),
        ("other:ad", None),
        ("basement:ad", None),
    ],
)
def test_adapter_of(model: str, adapter: str | None) -> None:
    assert adapter_of(model, "base") == adapter


def _entry(model_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_loading_config": {"model_id": model_id, "model_source": model_id},
        "accelerator_config": {"kind": "cpu"},
        **extra,
    }


def test_lora_model_ids_are_the_entries_with_a_lora_config() -> None:
    args = WorkerAppArgs.model_validate(
        {
            "queue_url": "http://127.0.0.1:8080",
            "queues": ["q:0"],
            "llm_configs": [
                _entry("a", lora_config={"max_num_adapters_per_replica": 2}),
                _entry("b"),
            ],
        }
    )
    assert args.lora_model_ids() == ["a"]


def test_local_lora_path_is_kept_beside_rays_lora_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = as_llm_config(
        _entry(
            "a",
            lora_config={
                "dynamic_lora_loading_path": "adapters",
                "max_num_adapters_per_replica": 3,
            },
        )
    )
    assert cfg.experimental_configs[LORA_PATH_KEY] == str(tmp_path / "adapters")
    assert lora_path_of(cfg) == str(tmp_path / "adapters")
    assert cfg.lora_config.dynamic_lora_loading_path is None
    assert cfg.multiplex_config().max_num_models_per_replica == 3
    assert lora_path_of(as_llm_config(cfg)) == str(tmp_path / "adapters")  # parsed once


def test_cloud_lora_path_stays_in_rays_lora_config() -> None:
    cfg = as_llm_config(_entry("a", lora_config={"dynamic_lora_loading_path": "s3://b/ads/"}))
    assert LORA_PATH_KEY not in cfg.experimental_configs
    assert lora_path_of(cfg) == "s3://b/ads"


def test_no_lora_config_no_path() -> None:
    assert lora_path_of(as_llm_config(_entry("a"))) is None


def _adapter(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text(json.dumps({"r": 8}))


class _LoraConfig(SimConfig):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.lora_config = {"max_num_adapters_per_replica": 2}
        self.experimental_configs = {**self.experimental_configs, LORA_PATH_KEY: str(root)}


async def test_loader_reads_local_adapters_in_place_and_404s_missing_ones(tmp_path: Path) -> None:
    _adapter(tmp_path, "ad")
    cfg = _LoraConfig(tmp_path)
    disk = await BellaLoraLoader().load_model_from_config("sim:ad", cfg)
    assert (disk.model_id, disk.local_path) == ("sim:ad", os.path.join(tmp_path, "ad"))
    (tmp_path / "empty").mkdir()
    for missing in ("sim:nope", "sim:empty", "sim:../x", "other:ad"):
        with pytest.raises(ModelNotFoundError) as info:
            await BellaLoraLoader().load_model_from_config(missing, cfg)
        assert info.value.code == "model_not_found"
        assert info.value.status_code == 404


async def _lora_server(root: Path) -> Any:
    cfg = _LoraConfig(root)
    server = await make_sim_server(cfg)
    loader = BellaLoraLoader()
    loads: list[str] = []

    async def load(model_id: str) -> Any:  # Ray wraps the loader in serve.multiplexed
        loads.append(model_id)
        return await loader.load_model_from_config(model_id, cfg)

    server._load_model = load
    server.loads = loads
    return server


async def test_server_runs_an_adapter_task_under_the_adapter_name(tmp_path: Path) -> None:
    _adapter(tmp_path, "ad")
    server = await _lora_server(tmp_path)
    body = chat_body(model="sim:ad", max_tokens=2)
    out = [x async for x in server.run_task(CHAT, body, request_id="t1")]
    assert ChatCompletion.model_validate(out[0]).model == "sim:ad"
    assert server.loads == ["sim:ad"]
    assert server.engine.loaded_adapters == {"sim:ad"}
    base = [x async for x in server.run_task(CHAT, chat_body(max_tokens=2), request_id="t2")]
    assert ChatCompletion.model_validate(base[0]).model == "sim"
    assert server.loads == ["sim:ad"]


@pytest.mark.parametrize("model", ["sim:nope", "sim:../ad", "other:ad"])
async def test_server_answers_a_missing_adapter_404(tmp_path: Path, model: str) -> None:
    _adapter(tmp_path, "ad")
    server = await _lora_server(tmp_path)
    with pytest.raises(ModelNotFoundError):
        async for _ in server.run_task(CHAT, chat_body(model=model), request_id="t"):
            pass
    assert server.engine.loaded_adapters == set()
    assert (await server.get_load())["in_flight"] == 0


class _Call:
    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self._messages = messages

    def __aiter__(self) -> Any:
        async def gen() -> Any:
            for m in self._messages:
                yield m

        return gen()


class _Method:
    def __init__(self, handle: _Handle) -> None:
        self.handle = handle

    def remote(self, task: dict[str, Any]) -> _Call:
        self.handle.calls.append((self.handle.options_seen, task["task_id"]))
        return _Call([{"phase": "done"}])


class _Handle:
    """A ``DeploymentHandle`` stand-in recording the options each call was made with."""

    def __init__(self, calls: list[Any], options_seen: dict[str, Any] | None = None) -> None:
        self.calls = calls
        self.options_seen = options_seen or {}

    def options(self, **kw: Any) -> _Handle:
        return _Handle(self.calls, {**self.options_seen, **kw})

    @property
    def run(self) -> _Method:
        return _Method(self)


async def test_serve_replicas_sets_the_multiplexed_model_id_of_adapter_tasks() -> None:
    calls: list[Any] = []
    replicas = ServeReplicas({"base": _Handle(calls)})  # type: ignore[dict-item]
    task = make_task(ResponseMode.BLOCKING)
    _ = [m async for m in replicas.run("base", task, multiplexed_model_id="base:ad")]
    _ = [m async for m in replicas.run("base", task)]
    assert calls == [
        ({"stream": True, "multiplexed_model_id": "base:ad"}, task.task_id),
        ({"stream": True}, task.task_id),
    ]
