"""``ray-worker serve``: ``serve run`` supervised, so that a SIGTERM drains it as Ctrl-C does.

This module owns the supervision of one child process: the child ``serve run CONFIG`` (in
its own session, with SIGINT at its default), the forwarding of SIGTERM and SIGINT to it as
one SIGINT, and the death pipe (``proc.die_with_parent``: the kernel sends the child SIGTERM
when this process is killed outright). It must not import Ray (the child starts it) nor
anything of the worker beyond ``proc``; it prints one line per forwarded signal and nothing
else.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ray_worker.proc import die_with_parent

__all__ = ["main", "supervise"]


def main(argv: list[str]) -> int:
    """``serve run CONFIG``, with SIGTERM turned into Ctrl-C so that a stop drains the worker.

    A SIGTERM to ``serve run`` itself makes Ray abort at once; here both SIGTERM and SIGINT
    reach ``serve run`` as one SIGINT, which deletes the app (the poller drains its in-flight
    tasks) and stops the Ray instance it started. See ``supervise``.
    """
    parser = argparse.ArgumentParser(
        prog="ray-worker serve", description="serve run CONFIG, draining on SIGTERM too"
    )
    parser.add_argument("config", help="Serve config file, e.g. configs/deepseek.yaml")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="more `serve run` flags")
    ns = parser.parse_args(argv)
    serve = Path(sys.executable).with_name("serve")
    return supervise([str(serve) if serve.exists() else "serve", "run", ns.config, *ns.serve_args])


def supervise(command: Sequence[str]) -> int:
    """Run ``command`` until it exits; SIGTERM or SIGINT here reach it as one SIGINT.

    The child runs in its own session, so a terminal's Ctrl-C reaches this process only and is
    forwarded exactly once. It starts with SIGINT at its default even when this process was
    started with SIGINT ignored (``nohup cmd &`` from a script does that, and Python keeps an
    ignored SIGINT ignored), or the forwarded SIGINT would never stop it. If this process is
    killed (SIGKILL, OOM), the child gets SIGTERM from the kernel instead of running on
    unsupervised (Linux). Returns the child's exit status.
    """
    parent = os.getpid()

    def child_setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent(parent, signal.SIGTERM)

    proc = subprocess.Popen(list(command), start_new_session=True, preexec_fn=child_setup)
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            print(f"ray-worker serve: {signal.Signals(signum).name}: draining", flush=True)
            proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc.wait()
