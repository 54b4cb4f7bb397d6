"""CancelWatch: a replica's long offline tasks that Bella-Queue cancelled (or whose batch it
cancelled) are aborted in the engine and left unanswered; failed checks never end a task; the
status requests per round are bounded and shared per batch.

A real ``TaskRunner`` on the fake engine; a fake status source stands in for Bella-Queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ray_worker.bella.protocol import Batch, ResponseMode, Task
from ray_worker.errors import QueueUnavailableError
from ray_worker.hop import Outcome
from ray_worker.task.cancel_watch import CancelWatch
from ray_worker.task.runner import TaskRunner
from tests.unit.fakes import Delay, FakeCompleter, FakeEngine, FakeEventSink, make_task, until

CALLBACK = ResponseMode.CALLBACK
BATCH = ResponseMode.BATCH
INTERVAL_S = 0.01


class FakeStatuses:
    """``get_task``/``get_batch`` answering from dicts; records every request."""

    def __init__(self) -> None:
        self.tasks: dict[str, str] = {}
        self.batches: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.error: BaseException | None = None

    async def get_task(self, task_id: str) -> Task:
        self.requests.append(("task", task_id))
        if self.error is not None:
            raise self.error
        wire = make_task(CALLBACK, task_id=task_id).model_dump(mode="json", exclude_none=True)
        wire["status"] = self.tasks.get(task_id, "queued")
        return Task.model_validate(wire)

    async def get_batch(self, batch_id: str) -> Batch:
        self.requests.append(("batch", batch_id))
        if self.error is not None:
            raise self.error
        return Batch.model_validate(
            {"id": batch_id, "object": "batch", "status": self.batches.get(batch_id, "in_progress")}
        )


class Rig:
    def __init__(self, *, interval_s: float = INTERVAL_S, max_requests: int = 20) -> None:
        self.engine = FakeEngine()
        self.completer = FakeCompleter()
        self.runner = TaskRunner(
            engine=self.engine, events=FakeEventSink(), completer=self.completer
        )
        self.statuses = FakeStatuses()
        self.watch = CancelWatch(
            self.runner, self.statuses, interval_s=interval_s, max_requests=max_requests
        )
        self.jobs: dict[str, asyncio.Task[Outcome]] = {}

    async def start_long(self, *tasks: Task) -> None:
        """Start ``tasks`` on 30 s engine calls and wait until each ran ``interval_s``."""
        for task in tasks:
            self.engine.script(Delay(30))
            job = self.runner.start(task)
            assert job is not None
            self.jobs[task.task_id] = job
        await until(lambda: self.engine.active == len(self.jobs))
        await until(
            lambda: all(age >= self.watch.interval_s for _, age in self.runner.offline_running())
        )

    def running(self) -> set[str]:
        return {t.task_id for t, _ in self.runner.offline_running()}


def batch_task(batch_id: str) -> Task:
    wire = make_task(BATCH).model_dump(mode="json", exclude_none=True)
    wire.update(batch_id=batch_id, trace_id=batch_id)
    return Task.model_validate(wire)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.runner.drain(0)


async def test_a_cancelled_task_is_aborted_unanswered_and_the_others_run_on(rig: Rig) -> None:
    kept, cancelled = make_task(CALLBACK), make_task(CALLBACK)
    await rig.start_long(kept, cancelled)
    rig.statuses.tasks[cancelled.task_id] = "cancelled"

    assert await rig.watch.check_once() == 1

    outcome = await rig.jobs[cancelled.task_id]
    assert outcome["cancelled"]
    assert not outcome["answered"]
    assert rig.engine.aborted == [cancelled.task_id]
    assert rig.completer.of(cancelled.task_id) == []
    assert rig.running() == {kept.task_id}
    assert sorted(rig.statuses.requests) == sorted(
        [("task", kept.task_id), ("task", cancelled.task_id)]
    )
    assert rig.runner.metrics.total("cancel_checks", kind="task", result="cancelled") == 1
    assert rig.runner.metrics.total("cancel_checks", kind="task", result="ok") == 1


@pytest.mark.parametrize("status", ["waiting", "queued", "succeeded"])
async def test_other_task_statuses_leave_the_task_running(rig: Rig, status: str) -> None:
    task = make_task(CALLBACK)
    await rig.start_long(task)
    rig.statuses.tasks[task.task_id] = status
    assert await rig.watch.check_once() == 0
    assert rig.running() == {task.task_id}


async def test_tasks_of_one_batch_share_one_request(rig: Rig) -> None:
    doomed = [batch_task("BATCH-1"), batch_task("BATCH-1")]
    other = batch_task("BATCH-2")
    await rig.start_long(*doomed, other)
    rig.statuses.batches["BATCH-1"] = "cancelling"

    assert await rig.watch.check_once() == 2

    assert sorted(rig.statuses.requests) == [("batch", "BATCH-1"), ("batch", "BATCH-2")]
    for task in doomed:
        assert (await rig.jobs[task.task_id])["cancelled"]
    assert rig.running() == {other.task_id}
    rig.statuses.batches["BATCH-2"] = "cancelled"
    assert await rig.watch.check_once() == 1
    assert rig.running() == set()
    assert rig.completer.completes == []


@pytest.mark.parametrize(
    "error", [QueueUnavailableError("HTTP 500", 500), RuntimeError("bug in a reader")]
)
async def test_a_failed_check_never_cancels(rig: Rig, error: BaseException) -> None:
    tasks = [make_task(CALLBACK), batch_task("BATCH-9")]
    await rig.start_long(*tasks)
    rig.statuses.error = error
    rig.statuses.tasks[tasks[0].task_id] = "cancelled"
    assert await rig.watch.check_once() == 0
    assert rig.running() == {t.task_id for t in tasks}
    assert rig.engine.aborted == []
    assert rig.runner.metrics.total("cancel_checks", result="error") == 2


async def test_young_tasks_are_not_asked_about() -> None:
    rig = Rig(interval_s=3600)
    rig.engine.script(Delay(30))
    task = make_task(CALLBACK)
    assert rig.runner.start(task) is not None
    await until(lambda: rig.engine.active == 1)
    assert await rig.watch.check_once() == 0
    assert rig.statuses.requests == []
    await rig.runner.drain(0)


async def test_requests_per_round_are_bounded_and_every_task_gets_its_turn() -> None:
    rig = Rig(max_requests=2)
    tasks = [make_task(CALLBACK) for _ in range(5)]
    await rig.start_long(*tasks)
    seen: list[set[str]] = []
    for _ in range(3):
        before = len(rig.statuses.requests)
        await rig.watch.check_once()
        seen.append({tid for _, tid in rig.statuses.requests[before:]})
    assert [len(s) for s in seen] == [2, 2, 2]
    # Least recently checked first: the first two rounds ask about four different tasks,
    # the third about the fifth (and one asked in round one).
    assert seen[0].isdisjoint(seen[1])
    assert (seen[0] | seen[1] | seen[2]) == {t.task_id for t in tasks}
    await rig.runner.drain(0)


async def test_the_loop_aborts_a_task_cancelled_while_it_runs(rig: Rig) -> None:
    task = make_task(CALLBACK)
    await rig.start_long(task)
    watching = asyncio.create_task(rig.watch.run())
    try:
        await until(lambda: len(rig.statuses.requests) >= 1)
        assert rig.running() == {task.task_id}
        rig.statuses.tasks[task.task_id] = "cancelled"
        outcome = await asyncio.wait_for(rig.jobs[task.task_id], 10)
        assert outcome["cancelled"]
        assert rig.watch.aborted == 1
    finally:
        watching.cancel()


def test_interval_must_be_positive() -> None:
    runner: Any = object()
    with pytest.raises(ValueError, match="interval_s"):
        CancelWatch(runner, FakeStatuses(), interval_s=0, max_requests=1)
