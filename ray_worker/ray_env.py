"""The environment ``serve run`` builds the app in, read for ``ray-worker check``.

``serve run CONFIG`` with no Ray running starts Ray from its own shell: the app is built with
that shell's environment. With a Ray already running (``ray up`` left one; ``RAY_ADDRESS``), it
only submits the config, and Serve's controller builds the app in a Ray task whose environment
is the one that Ray's ``ray start`` had. The ``BELLA_*`` variables of the shell that runs
``ray-worker check`` then mean nothing to the app (README, "Where the environment is read").

:func:`running_ray` finds the Ray that ``serve run`` would join, as ``ray.init`` does;
:func:`ray_environment` reads, in a task on it, which variables of the environment contract are
set there, each as a fingerprint (a hash prefix, never the value: the API key does not leave
the cluster's processes). Runs in the operator's shell; the task runs on a node of that Ray,
the one this shell is on when the driver is (the head, after ``ray attach``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from ray_worker.config import EnvSettings

__all__ = ["CONTRACT", "fingerprints", "ray_environment", "running_ray"]

CONTRACT: tuple[str, ...] = tuple(f"BELLA_{name}".upper() for name in EnvSettings.model_fields)
"""The environment contract's variables, from ``EnvSettings``."""


def fingerprints(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Each contract variable's fingerprint in ``environ`` (None when unset or empty)."""
    return {
        name: hashlib.sha256(value.encode()).hexdigest()[:16]
        if (value := environ.get(name))
        else None
        for name in CONTRACT
    }


def running_ray() -> str | None:
    """The address of the Ray that ``serve run`` (``ray.init()``) would join from this shell:
    ``RAY_ADDRESS``, else the last ``ray start`` on this machine; None when it would start its
    own. Uses Ray's own resolution (``ray._private.services``, checked on Ray 2.60)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        # None: what ``ray.init()`` passes (typed ``str`` in Ray, documented as optional).
        address: str | None = canonicalize_bootstrap_address(None)  # type: ignore[arg-type]
    except (ConnectionError, ValueError):
        return None
    return address


def _read_there() -> dict[str, str | None]:
    return fingerprints(os.environ)


def ray_environment(address: str, timeout_s: float) -> dict[str, str | None]:
    """The contract's fingerprints in a task on the Ray at ``address``; raises
    ``TimeoutError`` or Ray's error when that Ray does not answer in ``timeout_s``."""
    result: dict[str, Any] = {}

    def run() -> None:
        import ray

        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            try:
                task = ray.remote(num_cpus=0)(_read_there)
                result["value"] = ray.get(task.remote(), timeout=timeout_s)
            finally:
                ray.shutdown()
        except Exception as err:  # reported to the caller's thread
            result["error"] = err

    # A daemon thread: a Ray that never answers must not hold the CLI's exit.
    thread = threading.Thread(target=run, name="ray-environment", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"the Ray at {address} did not answer within {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    value: dict[str, str | None] = result["value"]
    return value
