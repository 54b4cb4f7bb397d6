"""The worker started for tests, benchmarks and the demo: ``serve run <config>`` as a child
process (the way an operator starts it), or ``deployed_worker`` in-process on a connected Ray.

This module owns launching the worker with the Serve CLI (its own Ray when no cluster
address is given), waiting until the poller reports it is running with replicas, and
stopping it with SIGINT as Ctrl-C would (``serve run`` then shuts the app and the Ray it
started down). Used by ``make demo`` and the end-to-end tests; never by the worker itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ray_worker.testing.ray_cluster import DEFAULT_RAY_ENV
from ray_worker.testing.waiting import wait_for

__all__ = ["ServeRun", "deploy_worker", "deployed_worker", "worker_running"]


class ServeRun:
    """``serve run <config>`` with ``env`` added to this process's environment."""

    def __init__(
        self,
        config: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        status_url: str = "http://127.0.0.1:8000/bella",
        log_path: str | os.PathLike[str] = ".run/serve-run.log",
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = Path(config)
        self.env = {**DEFAULT_RAY_ENV, **os.environ, **(env or {})}
        self.status_url = status_url
        self.log_path = Path(log_path)
        self.cwd = Path(cwd) if cwd else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeRun:
        """Launch ``serve run`` (output to ``log_path``) in a session of its own, with SIGINT at
        its default: ``stop`` is Ctrl-C, and a caller started with SIGINT ignored (``nohup ...
        &`` from a script, some CI runners) would pass that on (Python keeps an ignored SIGINT
        ignored), leaving every stop to the SIGTERM fallback."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        serve = Path(sys.executable).with_name("serve")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(serve), "run", str(self.config)],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
        return self

    def status(self) -> dict[str, Any] | None:
        """The poller's status, or None while it does not answer."""
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = httpx.get(self.status_url, timeout=10.0)
            if response.is_success:
                body = response.json()
                return body if isinstance(body, dict) else None
        return None

    def wait_ready(
        self, timeout_s: float = 600, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Wait until the worker runs and every pool has a replica; returns its status."""
        started = time.monotonic()
        last = ""
        while time.monotonic() - started < timeout_s:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"`serve run` exited with {code}; see {self.log_path}")
            status = self.status()
            state = last or "starting Ray Serve"
            if status is not None:
                pools = status.get("pools") or []
                replicas = [p.get("capacity", {}).get("replicas", 0) for p in pools]
                state = f"worker {status.get('state')}, replicas {replicas}"
                if status.get("state") == "running" and replicas and min(replicas) > 0:
                    if progress:
                        progress(f"ready after {time.monotonic() - started:.0f} s: {state}")
                    return status
            if progress and state != last:
                progress(f"{time.monotonic() - started:5.0f} s  {state}")
                last = state
            time.sleep(1.0)
        raise RuntimeError(
            f"the worker was not ready within {timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self, timeout_s: float = 90) -> int | None:
        """SIGINT (Ctrl-C), then SIGTERM, then SIGKILL of the process group."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the ``serve run`` output."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> ServeRun:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def deploy_worker(args: Mapping[str, Any], name: str, apikey: str) -> Any:
    """``serve.run`` the worker app ``name`` with ``args`` (a first deploy, or a redeploy of a
    changed config as ``serve deploy`` would make); returns its handle. ``apikey`` is set as
    ``BELLA_QUEUE_APIKEY`` only while the app is built. Blocking (Serve waits for the app)."""
    from ray import serve

    from ray_worker.app import build_app

    previous = os.environ.get("BELLA_QUEUE_APIKEY")
    os.environ["BELLA_QUEUE_APIKEY"] = apikey
    try:
        app = build_app(dict(args))
    finally:
        if previous is None:
            os.environ.pop("BELLA_QUEUE_APIKEY", None)
        else:
            os.environ["BELLA_QUEUE_APIKEY"] = previous
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    return serve.get_app_handle(name)


@contextlib.contextmanager
def deployed_worker(args: Mapping[str, Any], name: str, apikey: str) -> Iterator[Any]:
    """Deploy the worker app in-process on the connected Ray (``deploy_worker``); yields its
    handle. The app is deleted on exit."""
    from ray import serve

    try:
        yield deploy_worker(args, name, apikey)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(name)


async def worker_running(handle: Any, timeout_s: float = 180.0) -> dict[str, Any]:
    """Wait until the deployed worker polls with at least one LLM replica reporting load;
    returns its status. A status call that fails (the poller replica is being restarted)
    counts as not running yet."""

    async def running() -> dict[str, Any] | None:
        try:
            status: dict[str, Any] = await handle.status.remote()
        except Exception:
            return None
        pool = status["pools"][0]
        if status["state"] == "running" and pool["capacity"]["replicas"] > 0:
            return status
        return None

    return await wait_for(running, timeout=timeout_s, interval=0.25, message="worker running")
