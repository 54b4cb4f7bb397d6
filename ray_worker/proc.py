"""Process set-up of the worker's own processes (Linux; no Ray, no asyncio).

This module owns the one call both the vLLM engine's processes and ``ray-worker serve``'s
``serve run`` make right after they start: ``prctl(PR_SET_PDEATHSIG)``, which asks the kernel
for a signal when the parent thread goes. Without it, a parent killed with SIGKILL leaves its
children running (an engine holding GPU memory, a ``serve run`` holding its Ray instance and
port 8000). Elsewhere than Linux nothing changes. And ``tolerate_surrogates_in_output``, which
every Ray actor of the worker calls first: Ray opens their stdout/stderr strict, so a log line
echoing a task's lone surrogate would raise out of the logging call and lose the answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent", "set_parent_death_signal", "tolerate_surrogates_in_output"]

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: signal.Signals = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent goes; True if set.

    A parent that went before the call is not signalled for: ``die_with_parent`` checks.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """In a child of ``parent_pid``, first thing: get ``sig`` when the parent goes, and exit
    at once if it went already (before the signal was set)."""
    if set_parent_death_signal(sig) and os.getppid() != parent_pid:
        os._exit(1)


def tolerate_surrogates_in_output() -> None:
    """Make ``sys.stdout``/``sys.stderr`` write what they cannot encode as backslash escapes.

    Ray opens a worker's log streams with strict UTF-8: a lone surrogate (JSON allows
    ``"\\ud800"`` in any field a task carries, such as ``data.model``) in a log line makes the
    handler's write raise, and ``logging.Handler.handleError`` then prints the traceback (which
    holds the same text) to the same stream, which raises again, out of the logging call and
    past the code answering the task. Idempotent; streams without ``reconfigure`` are left be.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # Ray's wrapper forwards it
        if callable(reconfigure):
            with contextlib.suppress(Exception):
                reconfigure(errors="backslashreplace")
