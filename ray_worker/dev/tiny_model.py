"""Build a tiny random-weight Llama with a real tokenizer and chat template, for tests and demos.

This module owns the test model: a byte-level BPE tokenizer trained on a small corpus generated
in code, a 2-layer Llama (hidden 128, 4 heads of 32: vLLM's CPU attention needs head_dim >= 32)
with seeded random weights, saved as safetensors with a ChatML chat template that renders tools,
so that vLLM serves ``/v1/chat/completions`` and ``/v1/completions`` from it. The tokenizer holds
``<think>``/``</think>`` and ``<tool_call>``/``</tool_call>`` as single tokens, for vLLM's
``deepseek_r1`` reasoning parser and ``hermes`` tool parser. Nothing is downloaded.

It must not be imported by the worker's serving path: it pulls in torch and transformers, and a
production deployment points its ``LLMConfig`` at a real model instead.

Run ``python -m ray_worker.dev.tiny_model --out .models/tiny-llama``; a complete directory is left
alone (pass ``--force`` to rebuild). ``--adapters .models/tiny-llama-lora`` also builds a
random-weight LoRA adapter of it (``build_tiny_adapter``, PEFT format) for the LoRA tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_ADAPTER_DIR",
    "DEFAULT_MODEL_DIR",
    "MODEL_SPEC",
    "TINY_ADAPTER",
    "build_tiny_adapter",
    "build_tiny_model",
    "ensure_tiny_model",
    "is_complete",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(".models/tiny-llama")
"""Where the model lives, relative to the repository (the current directory)."""

DEFAULT_ADAPTER_DIR = Path(".models/tiny-llama-lora")
"""LoRA adapters of the tiny model, one directory each (a ``lora_config`` loading path)."""

TINY_ADAPTER = "tiny-adapter"
"""The tiny model's test adapter: random non-zero B matrices, so greedy output differs."""

_ADAPTER_SPEC: dict[str, Any] = {"seed": 7, "r": 8, "lora_alpha": 16}

_MARKER = "bella-tiny-model.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

MODEL_SPEC: dict[str, Any] = {
    "format_version": 2,
    "seed": 1234,
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
"""Everything that shapes the model; a directory built from another spec is rebuilt."""

_BOS, _EOS, _PAD = "<s>", "</s>", "<pad>"
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_SPECIAL_TOKENS = [_PAD, _BOS, _EOS, _IM_START, _IM_END]

# ChatML. Content parts (lists) are flattened by vLLM before rendering ("string" format). Tools
# render Hermes-style (a system block listing them, ``<tool_call>`` JSON in assistant turns),
# so vLLM's ``hermes`` tool parser fits; an assistant turn with only tool calls has no content.
_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n<tools>' + (tools | tojson) + '</tools><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Plain added tokens (decoded as text, matched by structured outputs), one id each: vLLM's
# ``deepseek_r1`` reasoning parser and ``hermes`` tool parser look these markers up by id.
_MARKER_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

_WORDS: list[str] = (  # noqa: SIM905 (a word list reads better as text)
    "the a an queue task worker model token stream replica engine request response "
    "priority online offline batch callback blocking streaming redis ray serve vllm "
    "llama cache memory latency throughput capacity poll take complete expire abort "
    "hello world please tell me about what why how when where who which answer question "
    "is are was were be been have has had do does did can could will would should may "
    "and or but if then else because so while for with without from into over under "
    "one two three four five six seven eight nine ten hundred thousand "
    "red green blue yellow small large fast slow quiet loud early late new old "
    "system user assistant message content role chat completion embedding usage"
).split()


def _corpus(seed: int, lines: int = 600) -> list[str]:
    """A few dozen KB of pseudo-English, numbers, punctuation and code-ish text."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
            out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            out.append(f"Task {i}: {a} + {b} = {a + b}, took {rng.random():.3f} s.")
        elif kind == 2:
            key = rng.choice(_WORDS)
            out.append(f'{{"{key}": "{rng.choice(_WORDS)}", "n": {rng.randint(0, 99)}}}')
        else:
            role = rng.choice(["system", "user", "assistant"])
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
            out.append(f"{_IM_START}{role}\n{text}{_IM_END}")
    return out


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a model built by this module from the current ``MODEL_SPEC``."""
    marker = path / _MARKER
    if not marker.is_file() or not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        spec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return bool(spec == MODEL_SPEC)


def _train_tokenizer(seed: int, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok


def build_tiny_model(out: Path, *, force: bool = False) -> Path:
    """Build the tiny model into ``out`` (created) and return ``out``.

    A directory that already holds a complete model of the current spec is kept unless
    ``force``. The model is written to a temporary sibling directory and renamed into place,
    so a crash never leaves a half-written model that looks complete.
    """
    out = Path(out)
    if not force and is_complete(out):
        print(f"tiny model already complete at {out}", flush=True)
        return out

    started = time.monotonic()
    import torch
    import transformers
    from tokenizers import AddedToken

    # transformers' own annotations are partial; treat its classes as Any.
    llama_config: Any = transformers.LlamaConfig
    llama_model: Any = transformers.LlamaForCausalLM
    fast_tokenizer: Any = transformers.PreTrainedTokenizerFast

    spec = MODEL_SPEC
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        print("training byte-level BPE tokenizer ...", flush=True)
        raw = _train_tokenizer(spec["seed"], spec["vocab_size"])
        tokenizer = fast_tokenizer(
            tokenizer_object=raw,
            bos_token=_BOS,
            eos_token=_EOS,
            pad_token=_PAD,
            additional_special_tokens=[_IM_START, _IM_END],
            model_max_length=spec["max_position_embeddings"],
        )
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t in _MARKER_TOKENS]
        )
        tokenizer.chat_template = _CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        print(f"tokenizer: {len(tokenizer)} tokens", flush=True)

        print("initialising Llama weights ...", flush=True)
        torch.manual_seed(spec["seed"])
        config = llama_config(
            vocab_size=len(tokenizer),
            hidden_size=spec["hidden_size"],
            intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_hidden_layers"],
            num_attention_heads=spec["num_attention_heads"],
            num_key_value_heads=spec["num_key_value_heads"],
            max_position_embeddings=spec["max_position_embeddings"],
            bos_token_id=tokenizer.convert_tokens_to_ids(_BOS),
            eos_token_id=tokenizer.convert_tokens_to_ids(_EOS),
            pad_token_id=tokenizer.convert_tokens_to_ids(_PAD),
            tie_word_embeddings=False,
            dtype="float32",
        )
        model = llama_model(config)
        model.generation_config.eos_token_id = [
            config.eos_token_id,
            tokenizer.convert_tokens_to_ids(_IM_END),
        ]
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MARKER).write_text(json.dumps(spec, indent=2, sort_keys=True))

        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny model written to {out} ({n_params / 1e6:.2f}M parameters) "
        f"in {time.monotonic() - started:.1f} s",
        flush=True,
    )
    return out


def build_tiny_adapter(
    base: Path, out: Path, name: str = TINY_ADAPTER, *, force: bool = False
) -> Path:
    """Build a random-weight LoRA adapter (PEFT format) of the model in ``base`` at ``out/name``.

    Every projection of every layer gets rank-8 A and B matrices (B non-zero, unlike a fresh
    PEFT adapter), seeded, so the adapter visibly changes the model's output. Kept if present.
    """
    target = Path(out) / name
    if not force and (target / "adapter_config.json").is_file():
        print(f"tiny adapter already at {target}", flush=True)
        return target
    import peft
    import torch
    import transformers

    model: Any = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=_ADAPTER_SPEC["r"],
        lora_alpha=_ADAPTER_SPEC["lora_alpha"],
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,  # random A and B: a fresh adapter (B = 0) changes nothing
    )
    torch.manual_seed(_ADAPTER_SPEC["seed"])
    peft_model: Any = peft.get_peft_model(model, config)
    Path(out).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        peft_model.save_pretrained(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(tmp), target)
        target.chmod(0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"tiny adapter written to {target}", flush=True)
    return target


def ensure_tiny_model(path: Path | str = DEFAULT_MODEL_DIR) -> Path:
    """Return ``path`` as an absolute path, building the model there first if needed."""
    resolved = Path(path).resolve()
    if not is_complete(resolved):
        build_tiny_model(resolved)
    return resolved


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m ray_worker.dev.tiny_model [--out DIR] [--force]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="target directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    parser.add_argument(
        "--adapters", type=Path, default=None, help=f"also build {TINY_ADAPTER} into this dir"
    )
    args = parser.parse_args(argv)
    build_tiny_model(args.out, force=args.force)
    if args.adapters is not None:
        build_tiny_adapter(args.out, args.adapters, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
