"""Two Ray nodes on loopback: each node's LLM replica streams through its own node's publisher.

The scenario runs in a child process (``python -m ray_worker.testing.two_node``): this test
process is already connected to the session's Ray cluster, and a process joins one cluster
only. The child starts redis-server, the emulator, a Ray head and a second Ray node, deploys
the worker app (simulated engine, two LLM replicas, at most one per node), streams 16 tasks
of 300 tokens at once and prints a JSON report, stopping everything it started on the way
out. Here we assert on that report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from ray_worker.testing.two_node import REPORT_PREFIX

TASKS = 16
MAX_TOKENS = 300
TIMEOUT_S = 280


def _run_child() -> tuple[dict[str, Any] | None, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable,
        "-m",
        "ray_worker.testing.two_node",
        f"--tasks={TASKS}",
        f"--max-tokens={MAX_TOKENS}",
        "--tokens-per-s=100",
    ]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the child stop its Ray nodes, redis and emulator; then the group.
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        err.seek(0)
        stderr_tail = err.read()[-6000:].decode(errors="replace")
    report = None
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(REPORT_PREFIX):
            report = json.loads(line[len(REPORT_PREFIX) :])
    return report, stderr_tail


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    result, stderr_tail = _run_child()
    assert result is not None, f"no report from the two-node check; stderr:\n{stderr_tail}"
    assert result["ok"], (
        f"two-node check failed: {result.get('error')}\n{result.get('traceback', '')}\n"
        f"stderr:\n{stderr_tail}"
    )
    return result


def test_two_nodes_each_with_its_own_publisher(report: dict[str, Any]) -> None:
    node_ids = {n["node_id"] for n in report["nodes"]}
    assert len(node_ids) == 2
    publishers = report["after"]["publishers"]
    assert len(publishers) == 2
    # Named for the node it runs on, pinned there, one per node.
    for p in publishers:
        assert p["node_id"] == p["named_node_id"]
    assert {p["node_id"] for p in publishers} == node_ids
    assert len({p["actor_id"] for p in publishers}) == 2


def test_each_replica_uses_the_publisher_of_its_own_node(report: dict[str, Any]) -> None:
    publishers = {p["node_id"]: p for p in report["after"]["publishers"]}
    replicas = [r for r in report["after"]["replicas"] if r.get("is_llm_replica", True)]
    assert len(replicas) == 2
    assert {r["node_id"] for r in replicas} == set(publishers), "one LLM replica per node"
    for r in replicas:
        own = publishers[r["node_id"]]
        assert r["session"] in own["lease_sessions"], (r, own)
        others = [p for node, p in publishers.items() if node != r["node_id"]]
        assert all(r["session"] not in p["lease_sessions"] for p in others)
        if "publisher_actor_id" in r:  # read inside the replica (Serve internals permitting)
            assert r["publisher_actor_id"] == own["actor_id"]
        # Nothing had to be re-resolved or retried on the way.
        assert r["client_stats"]["reattached"] == 0
        assert r["client_stats"]["failed_events"] == 0


def test_both_publishers_carried_events(report: dict[str, Any]) -> None:
    publishers = {p["node_id"]: p for p in report["after"]["publishers"]}
    replicas = [r for r in report["after"]["replicas"] if r.get("is_llm_replica", True)]
    for r in replicas:
        own = publishers[r["node_id"]]
        sent = r["client_stats"]["sent_events"]
        assert sent > 0, f"replica {r['name']} ran no task"
        assert own["published"] >= sent > 0
        assert own["dropped_progress"] == own["dropped_completions"] == 0
        assert own["last_error"] is None
    # Every event reached Redis exactly once: each stream's SSE events plus its completion.
    streamed = sum(s["events"] for s in report["streams"])
    assert sum(p["published"] for p in publishers.values()) == streamed + TASKS


def test_every_stream_is_complete_and_in_order(report: dict[str, Any]) -> None:
    streams = report["streams"]
    assert len(streams) == TASKS
    for s in streams:
        assert "error" not in s, s
        assert s["in_order"], s  # ids 0..n-1
        assert s["done"], s  # then "[DONE]"
        assert s["events"] >= MAX_TOKENS, s
