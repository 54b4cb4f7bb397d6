"""Cancellation reaches the engine, end to end: the shared ``serve run`` (``configs/local.yaml``
with a 0.5 s ``cancel_check_interval_s``, ``tests/e2e/local-shared.yaml``) on the tiny model,
its other engines idle beside it.

A long offline task (1500 tokens, ``ignore_eos``) is cancelled while it runs, alone or (eight
of them) through their batch: the replica aborts it in vLLM within a few check intervals
(``/bella`` counts it cancelled and holds nothing; vLLM runs nothing), sends no complete (the
callback receiver and the emulator's completed counter see nothing), and a following task runs
and is answered.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import BatchRequest, ResponseMode
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.e2e import SharedWorker, chat, put
from ray_worker.testing.serve_run import ServeRun
from ray_worker.testing.waiting import wait_for

LONG_TOKENS = 1500
"""Far more than the check interval needs (the tiny model takes seconds for these), and with
the chat template's tokens still within ``max_model_len`` 2048. Alone, the tiny model writes
them in about 3.5 s on 2 cores."""
BATCH_LINES = 8
"""``max_num_seqs`` of the config: every line runs at once."""


@pytest.fixture(scope="module")
def worker(shared_worker: SharedWorker) -> ServeRun:
    return shared_worker.run


@pytest.fixture(scope="module")
def queue(shared_worker: SharedWorker) -> str:
    return shared_worker.queue("cancel")


def _status(worker: ServeRun) -> dict[str, Any]:
    status = worker.status()
    assert status is not None
    return status


def _engine_running(status: dict[str, Any]) -> int:
    """Requests vLLM runs, as the replicas last reported (``/bella`` pools' capacity)."""
    return sum(int(p.get("capacity", {}).get("engine_running", 0)) for p in status["pools"])


async def _completed_count(client: QueueClient, queue: str) -> int:
    stats = await client.stats(f"{queue}:1")
    return int(stats.get("completed_count") or 0)


async def _aborted_unanswered(worker: ServeRun, before: int, count: int = 1) -> dict[str, Any]:
    """Wait until the worker counts ``count`` more cancelled tasks, holds nothing and vLLM runs
    nothing."""

    def aborted() -> dict[str, Any] | None:
        status = _status(worker)
        done = (
            status.get("cancelled", 0) >= before + count
            and status.get("in_flight") == 0
            and _engine_running(status) == 0
        )
        return status if done else None

    return await wait_for(aborted, timeout=60, interval=0.2)


async def _following_task_runs(client: QueueClient, queue: str, receiver: CallbackReceiver) -> None:
    task_id = await client.put(
        put(
            queue,
            ResponseMode.CALLBACK,
            chat("after the cancel", 4),
            level=1,
            callback_url=receiver.url + "/next",
            timeout=120,
        )
    )
    bodies = await wait_for(
        lambda: receiver.answers(task_id),
        timeout=120,
        interval=0.1,
    )
    assert bodies[0]["status_code"] == 200


async def test_a_running_callback_task_cancelled_is_aborted_unanswered(
    worker: ServeRun, client: QueueClient, queue: str
) -> None:
    before = _status(worker).get("cancelled", 0)
    completed_before = await _completed_count(client, queue)
    with CallbackReceiver() as receiver:
        task_id = await client.put(
            put(
                queue,
                ResponseMode.CALLBACK,
                chat("a long one", LONG_TOKENS),
                level=1,
                callback_url=receiver.url + "/long",
                timeout=600,
            )
        )
        await wait_for(
            lambda: _status(worker).get("in_flight") == 1 or receiver.bodies("/long"),
            timeout=120,
            interval=0.1,
        )
        assert receiver.bodies("/long") == []  # still running (not answered, e.g. a 400)
        assert await client.cancel(task_id) == task_id

        status = await _aborted_unanswered(worker, before)
        assert status["cancelled"] == before + 1
        assert (await client.get_task(task_id)).status == "cancelled"

        await _following_task_runs(client, queue, receiver)
        # The long task's answer never went out: the receiver saw only the following task's.
        assert receiver.bodies("/long") == []
        assert await _completed_count(client, queue) == completed_before + 1
        print(f"aborted after cancel: {status}")


async def test_running_tasks_of_a_cancelled_batch_are_aborted_unanswered(
    worker: ServeRun, client: QueueClient, queue: str
) -> None:
    before = _status(worker).get("cancelled", 0)
    completed_before = await _completed_count(client, queue)
    # As many lines as the engine runs at once: they run side by side (slower steps, so they
    # surely outlive the check) and one batch request covers them all.
    lines = [
        {
            "custom_id": f"long-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat(f"a long batch line {i}", LONG_TOKENS),
        }
        for i in range(BATCH_LINES)
    ]
    uploaded = await client.upload_file(
        "\n".join(json.dumps(x) for x in lines).encode(), "long.jsonl"
    )
    batch = await client.create_batch(
        BatchRequest(input_file_id=uploaded["id"], endpoint="/v1/chat/completions"), queue=queue
    )
    await wait_for(
        lambda: _status(worker).get("in_flight", 0) >= BATCH_LINES, timeout=120, interval=0.1
    )
    assert await _completed_count(client, queue) == completed_before  # still running
    cancelled = await client.cancel_batch(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")

    status = await _aborted_unanswered(worker, before, BATCH_LINES)
    assert status["cancelled"] == before + BATCH_LINES

    with CallbackReceiver() as receiver:
        await _following_task_runs(client, queue, receiver)
    # Only the following task was completed; no batch line's complete ever came.
    assert await _completed_count(client, queue) == completed_before + 1
    assert (await client.get_batch(batch.id)).request_counts.completed == 0
