"""The tiny test model: built locally, complete, idempotent, with a working chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_worker.dev import tiny_model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_build_is_complete_and_shaped_for_vllm_cpu(built: Path) -> None:
    assert tiny_model.is_complete(built)
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM CPU attention
    assert config["num_hidden_layers"] == 2
    assert 1000 <= config["vocab_size"] <= 4096


def test_second_build_keeps_the_model(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (built / "model.safetensors").stat().st_mtime_ns
    assert tiny_model.build_tiny_model(built) == built
    assert "already complete" in capsys.readouterr().out
    assert (built / "model.safetensors").stat().st_mtime_ns == before


def test_incomplete_directory_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not tiny_model.is_complete(tmp_path)


def test_tokenizer_round_trips_and_renders_chat(built: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built))
    text = "Hello world, 123!"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert text in prompt


def test_weights_are_seeded(built: Path, tmp_path: Path) -> None:
    other = tiny_model.build_tiny_model(tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
