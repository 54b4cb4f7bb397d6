"""The CPU cores of a CPU engine whose model runs in the engine process (the ``uni`` executor).

vLLM binds a CPU model to cores only where the model has a process of its own (the ``mp``
executor): with ``VLLM_CPU_OMP_THREADS_BIND=auto``, its default, the model process gets the
cores but the last ``VLLM_CPU_NUM_OF_RESERVED_CPU`` (1), which the serving processes keep. With
``uni`` (``vllm_engine._honour_executor_backend``) nothing is bound: the engine process then
moves between all cores, sharing each with the replica, the publisher, the poller and Ray.

This module binds the engine process the way vLLM binds its model process, right after the
process started (each thread it has then; those it starts later inherit the cores):

- ``nobind``: nothing is bound;
- an explicit list (``0-3``; ``0-3|4-7`` for several engines on one node): the first entry
  that no other engine of the node holds;
- ``auto``: as many cores as the engine has threads (``OMP_NUM_THREADS``), the lowest of the
  replica's allowed cores that no other engine holds, keeping the reserved ones (the highest)
  free. Where too few are left, nothing is bound.

The engines of a node record their cores in one file (``CLAIMS_FILE`` in the temp folder,
locked with ``flock``; ``[]`` for an engine left unbound), so a second replica on the node does
not bind its engine to the first one's core; a claim ends with its process. Linux only;
elsewhere nothing is bound. It must not import vLLM or Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "CLAIMS_FILE",
    "bind_engine_process",
    "choose_cores",
    "claims_file",
    "live_claims",
    "parse_cpu_list",
]

CLAIMS_FILE = "bella-ray-worker-engine-cpus.json"
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
DEFAULT_RESERVED = 1
"""vLLM's reserve on x86 (``ompmultiprocessing.OMPProcessManager``)."""


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,5"`` as ``[0, 1, 2, 3, 5]``; raises ``ValueError`` on anything else."""
    cores: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bad CPU list {text!r}")
        cores.extend(c for c in range(lo, hi + 1) if c not in cores)
    return cores


def choose_cores(
    bind: str, allowed: Collection[int], threads: int, reserved: int, taken: Collection[int]
) -> list[int] | None:
    """The cores for one engine process, or None to leave it unbound (see the module doc).

    ``allowed``: the cores this replica may use; ``taken``: those other engines of the node
    hold. Raises ``ValueError`` for a bind setting that does not parse.
    """
    bind = bind.strip()
    if bind == "nobind":
        return None
    busy = set(taken)
    if bind != "auto":
        for entry in bind.split("|"):
            cores = parse_cpu_list(entry)
            if not busy.intersection(cores):
                return cores
        return None
    usable = sorted(allowed)
    if reserved > 0:
        usable = usable[:-reserved]
    free = [c for c in usable if c not in busy]
    if threads < 1 or len(free) < threads:
        return None
    return free[:threads]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _claims(path: Path) -> Iterator[dict[int, list[int]]]:
    """The node's claims, live processes only, under an exclusive lock; written back on exit."""
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        try:
            raw = json.loads(handle.read() or "{}")
            claims = {int(pid): [int(c) for c in cores] for pid, cores in raw.items()}
        except (ValueError, TypeError, AttributeError):
            claims = {}
        claims = {pid: cores for pid, cores in claims.items() if _alive(pid)}
        yield claims
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({str(pid): cores for pid, cores in claims.items()}))


def claims_file() -> Path:
    """Where the engines of this node record their cores."""
    return Path(tempfile.gettempdir()) / CLAIMS_FILE


def live_claims(path: Path | None = None) -> dict[int, list[int]]:
    """The engines of this node that are alive, with their cores (``[]``: left unbound)."""
    with _claims(path or claims_file()) as claims:
        return dict(claims)


def _set_affinity(pid: int, cores: list[int]) -> None:
    """Bind every thread of ``pid`` (a just started process has one, or a few)."""
    os.sched_setaffinity(pid, cores)
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cores)


def _threads(env: Mapping[str, str], allowed: int, reserved: int) -> int:
    with contextlib.suppress(ValueError):
        return int(env.get("OMP_NUM_THREADS", ""))
    return max(1, allowed - reserved)


def bind_engine_process(
    pid: int, *, env: Mapping[str, str] | None = None, claims_path: Path | None = None
) -> list[int] | None:
    """Bind the just started engine process ``pid`` to its cores; returns them (None: unbound).

    ``env`` (default ``os.environ``) holds the settings the engine process inherited. Never
    raises: a setting that does not parse or a failed call leaves the process unbound (logged).
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    env = os.environ if env is None else env
    path = claims_path or claims_file()
    bind = env.get(BIND_ENV) or "auto"
    allowed = os.sched_getaffinity(0)
    try:
        reserved = int(env.get(RESERVED_ENV) or DEFAULT_RESERVED)
        threads = _threads(env, len(allowed), reserved)
        with _claims(path) as claims:
            taken = {c for cores in claims.values() for c in cores}
            cores = choose_cores(bind, allowed, threads, reserved, taken)
            if cores is not None:
                _set_affinity(pid, cores)
            claims[pid] = cores or []  # an unbound engine is recorded too: the hook ran
    except (OSError, ValueError) as err:
        logger.warning("the engine process runs on every core: binding it failed: %s", err)
        return None
    if cores is None:
        logger.info(
            "the engine process runs on every core (%s=%s, no free core among %s)",
            BIND_ENV,
            bind,
            sorted(allowed),
        )
    else:
        logger.info("the engine process (pid %d) runs on cores %s", pid, cores)
    return cores
