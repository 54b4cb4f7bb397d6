"""A throwaway local Ray cluster (``ray start --head --block`` as a child) for tests and demos.

This module owns starting one single-node Ray head on free loopback ports, connecting the current
process to it, and tearing down exactly the processes it started. A cold ``ray.init()`` costs
6-9 s on the 2-core test machines; connecting to a running head costs about 1.5 s, so a test
session starts one ``LocalRayCluster`` and every test connects to it.

It must not run ``ray stop`` (that kills every Ray on the machine, including other people's) and
must not be used by the worker itself: production connects to the cluster ``ray up`` made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ray_worker.testing.redis_server import free_port

__all__ = ["DEFAULT_RAY_ENV", "LocalRayCluster"]

DEFAULT_RAY_ENV: dict[str, str] = {
    # Ray 2.60 turns on token auth with the dashboard; local runs and tests go without.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # vLLM on CPU sizes its KV cache from all RAM unless told (GiB).
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment of the Ray processes (and the driver) where the caller's environment is silent."""


class LocalRayCluster:
    """One Ray head node on free loopback ports, owned by this object.

    ``start()`` launches ``ray start --head --block`` as a child process in its own session;
    ``stop()`` sends that process SIGTERM (Ray then kills the GCS, raylet and workers it
    started) and SIGKILLs the process group if it lingers. Every port Ray would otherwise take
    at a fixed default (client server 10001, dashboard agent 52365, ...) is chosen free, so
    several clusters can run side by side on one machine.
    """

    def __init__(
        self,
        num_cpus: float = 4,
        *,
        object_store_memory: int = 256 * 1024 * 1024,
        env: dict[str, str] | None = None,
        ray_executable: str | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.host = "127.0.0.1"
        self.port = free_port()
        self.env = {**DEFAULT_RAY_ENV, **(env or {})}
        exe = ray_executable or str(Path(sys.executable).with_name("ray"))
        if not Path(exe).exists():
            exe = shutil.which("ray") or exe
        self.ray_executable = exe
        self._temp_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._connected = False

    @property
    def address(self) -> str:
        """``127.0.0.1:<gcs port>``, for ``ray.init(address=...)``."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the ``ray start`` process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """The ``ray start`` output (useful when start-up fails)."""
        return None if self._temp_dir is None else self._temp_dir / "ray-start.log"

    def process_env(self) -> dict[str, str]:
        """The environment of the Ray processes: ours, with the caller's own values winning."""
        merged = dict(os.environ)
        for key, value in self.env.items():
            merged.setdefault(key, value)
        return merged

    def start(self, timeout_s: float = 90.0, attempts: int = 2) -> LocalRayCluster:
        """Start the head and wait until it accepts drivers.

        On an overloaded machine ``ray start`` can give up on its own GCS (a 30 s startup
        deadline inside Ray); it is then tried again, on fresh ports, up to ``attempts`` times.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RuntimeError:
                pid = self._proc.pid if self._proc is not None else None
                self.stop()
                if pid is not None:
                    # ray start may have died leaving its GCS or raylet behind (own session).
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
                if attempt == attempts:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> LocalRayCluster:
        if self.running:
            return self
        self._temp_dir = Path(tempfile.mkdtemp(prefix="bray-", dir="/tmp"))
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-port": free_port(),
        }
        args = [
            self.ray_executable,
            "start",
            "--head",
            "--block",
            f"--node-ip-address={self.host}",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_memory}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self._temp_dir}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        env = self.process_env()
        # The dashboard process binds a Prometheus port (44227) even when headless.
        env.setdefault("DASHBOARD_METRIC_PORT", str(free_port()))
        assert self.log_path is not None
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"ray start exited early; see {self.log_path}:\n{self._tail()}")
            if self._ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ray start did not come up in {timeout_s} s:\n{self._tail()}")

    def _ready(self) -> bool:
        assert self.log_path is not None
        try:
            return b"Ray runtime started" in self.log_path.read_bytes()
        except OSError:
            return False

    def _tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def connect(self, **init_kwargs: Any) -> Any:
        """``ray.init`` this process to the cluster (idempotent); returns Ray's context."""
        import ray

        for key, value in self.env.items():
            os.environ.setdefault(key, value)
        if ray.is_initialized():
            return None
        init_kwargs.setdefault("log_to_driver", False)
        ctx = ray.init(address=self.address, **init_kwargs)
        self._connected = True
        return ctx

    def disconnect(self) -> None:
        """Shut down Serve (if this process started it) and ``ray.shutdown`` the driver."""
        import ray

        if self._connected and ray.is_initialized():
            with contextlib.suppress(Exception):
                from ray import serve

                shutdown: Any = serve.shutdown
                shutdown()
            ray.shutdown()
        self._connected = False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect, then stop the processes this cluster started: SIGTERM to ``ray start``,
        and after ``timeout_s`` SIGKILL to its process group (every Ray process it started).

        The grace is short on purpose: once a ``serve run`` of vLLM had joined the cluster,
        ``ray start --block`` had not exited 30 s after SIGTERM, and none of its processes 5 s
        after it (the e2e tier, measured); the group was killed at the end either way."""
        self.disconnect()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
