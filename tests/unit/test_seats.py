"""Engine seats: online work starts at once on an engine full of offline work.

``Seats`` alone (hand-over order, preemption choice, the cap), then the ``TaskRunner`` with
seats on the real simulated engine (``tests/unit/sim_server.py``: ``BellaLLMServer``'s mixin
without Ray): an online task put into a full engine starts before any offline task ends; a
preempted offline task is answered exactly once, with the whole response; streaming tasks are
never preempted; no task is preempted more than the cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from ray_worker.bella.protocol import ResponseMode, Task
from ray_worker.hop import Outcome
from ray_worker.task.runner import TaskRunner
from ray_worker.task.seats import Seats
from tests.unit.fakes import FakeCompleter, FakeEventSink, make_task, settle, until
from tests.unit.sim_server import SimConfig, make_sim_server

# -- Seats alone -----------------------------------------------------------------------------


async def test_offline_stops_at_the_width_and_online_takes_the_reserved_seat() -> None:
    seats = Seats(2, 1, max_preemptions=2)
    async with (
        seats.hold("a", online=False, preemptible=True),
        seats.hold("b", online=False, preemptible=True),
    ):
        third = asyncio.create_task(_hold_briefly(seats, "c", online=False))
        await settle()
        assert not third.done()  # the width is full: it waits in the replica
        async with seats.hold("o", online=True):  # the online seat: no wait, no preemption
            assert seats.stats()["seats_online_in_use"] == 1
        assert seats.preemptions == 0
        assert not third.done()
    await third
    assert seats.stats()["seats_offline_in_use"] == 0


async def test_online_preempts_the_offline_run_started_last_and_it_goes_first_again() -> None:
    seats = Seats(2, 0, max_preemptions=1)
    ended: list[str] = []
    order: list[str] = []
    async with seats.hold("old", online=False, preemptible=True) as old:
        old.on_preempt = lambda: ended.append("old")
        await asyncio.sleep(0.01)
        young = await _enter(seats.hold("young", online=False, preemptible=True))
        young[1].on_preempt = lambda: ended.append("young")
        waiting = asyncio.create_task(_hold_briefly(seats, "later", online=False, order=order))
        online = asyncio.create_task(_hold_briefly(seats, "o", online=True, order=order))
        await settle()
        assert ended == ["young"]  # the least progress
        assert seats.preemptions == 1
        assert not online.done()
        # The preempted run lets go; its seat goes to the online task, not to the line.
        rerun = asyncio.create_task(
            _hold_briefly(seats, "young", online=False, first=True, order=order)
        )
        await young[0].__aexit__(None, None, None)
        await online
        await rerun
    await waiting
    assert order == ["o", "young", "later"]  # the re-run was first in the offline line


async def test_no_preemption_past_the_cap_nor_of_online_work() -> None:
    seats = Seats(1, 0, max_preemptions=1)
    called: list[str] = []
    async with seats.hold("capped", online=False, preemptible=False) as seat:
        seat.on_preempt = lambda: called.append("capped")
        online = asyncio.create_task(_hold_briefly(seats, "o1", online=True))
        await settle()
        assert called == []
        assert not online.done()
    await online
    async with seats.hold("o2", online=True) as seat:
        seat.on_preempt = lambda: called.append("o2")
        other = asyncio.create_task(_hold_briefly(seats, "o3", online=True))
        await settle()
        assert called == []
        assert not other.done()
    await other
    assert seats.preemptions == 0


async def test_a_cancelled_wait_leaves_no_seat_held() -> None:
    seats = Seats(1, 0)
    async with seats.hold("a", online=False):
        waiter = asyncio.create_task(_hold_briefly(seats, "b", online=False))
        await settle()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert seats.stats()["seats_offline_in_use"] == 0
    assert seats.stats()["seats_waiting_offline"] == 0
    async with seats.hold("c", online=False):
        pass


async def _enter(cm: Any) -> tuple[Any, Any]:
    return cm, await cm.__aenter__()


async def _hold_briefly(
    seats: Seats,
    task_id: str,
    *,
    online: bool,
    first: bool = False,
    order: list[str] | None = None,
) -> None:
    async with seats.hold(task_id, online=online, first=first):
        if order is not None:
            order.append(task_id)
        await asyncio.sleep(0.01)


# -- the runner with seats on the simulated engine ---------------------------------------------


class _Timeline:
    """Events and completes of every task, in the order they left."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.events = FakeEventSink()
        self.completer = FakeCompleter()
        log = self.log
        events, completer = self.events, self.completer

        class _Sink:
            async def progress(self, instance_id: str, task_id: str, *args: Any) -> None:
                log.append(("event", task_id))
                await events.progress(instance_id, task_id, *args)

            async def completion(
                self, instance_id: str, task_id: str, result: Mapping[str, Any]
            ) -> None:
                log.append(("answer", task_id))
                await events.completion(instance_id, task_id, result)

        class _Completer:
            async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
                log.append(("answer", task_id))
                await completer.complete(task_id, result)

        self.sink = _Sink()
        self.http = _Completer()

    def first(self, kind: str, task_id: str) -> int:
        return self.log.index((kind, task_id))


class _Engine:
    def __init__(self, server: Any) -> None:
        self.server = server

    def stream(
        self, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        result: AsyncIterator[dict[str, Any]] = self.server.run_task(
            endpoint, data, request_id=request_id, priority=priority
        )
        return result


async def _runner(width: int, online: int, cap: int) -> tuple[TaskRunner, _Timeline, Any]:
    config = SimConfig()
    config.experimental_configs["bella_sim_engine"] = {
        "max_num_seqs": width + online,
        "ttft_s": 0.0,
        "tokens_per_s": 50.0,
    }
    server = await make_sim_server(config)
    timeline = _Timeline()
    runner = TaskRunner(
        engine=_Engine(server),
        events=timeline.sink,
        completer=timeline.http,
        seats=Seats(width, online, max_preemptions=cap),
    )
    return runner, timeline, server


def _chat(tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}


def _offline(tokens: int = 20) -> Task:
    return make_task(ResponseMode.CALLBACK, data=_chat(tokens))


def _streaming(tokens: int = 5) -> Task:
    return make_task(ResponseMode.STREAMING, data=_chat(tokens))


def _assert_one_whole_answer(timeline: _Timeline, task: Task, tokens: int) -> None:
    answers = timeline.completer.of(task.task_id)
    assert len(answers) == 1, answers
    assert answers[0]["status_code"] == 200
    body = answers[0]["body"]
    assert body["usage"]["completion_tokens"] == tokens
    assert body["choices"][0]["message"]["content"]


async def test_online_task_starts_at_once_on_an_engine_full_of_offline_work() -> None:
    runner, timeline, server = await _runner(width=2, online=1, cap=2)
    offline = [_offline() for _ in range(3)]
    jobs = [runner.start(t) for t in offline]
    await until(lambda: server.engine.get_load()["running"] == 2)
    online = _streaming()
    job = runner.start(online)
    assert job is not None
    await until(lambda: ("event", online.task_id) in timeline.log)
    # The online stream started while every offline task still runs or waits for its seat.
    assert not any(kind == "answer" for kind, _ in timeline.log)
    results: list[Outcome] = await asyncio.gather(job, *(j for j in jobs if j is not None))
    assert [r["status_code"] for r in results] == [200] * 4
    assert runner.seats is not None
    assert runner.seats.preemptions == 0
    for task in offline:
        _assert_one_whole_answer(timeline, task, 20)


async def test_preempted_offline_task_gets_exactly_one_whole_answer() -> None:
    runner, timeline, server = await _runner(width=2, online=0, cap=2)
    first, second = _offline(), _offline()
    jobs = [runner.start(first)]
    await until(lambda: server.engine.get_load()["running"] == 1)
    jobs.append(runner.start(second))
    await until(lambda: server.engine.get_load()["running"] == 2)
    online = _streaming()
    online_job = runner.start(online)
    await until(lambda: ("event", online.task_id) in timeline.log)
    assert not any(kind == "answer" for kind, _ in timeline.log)
    assert runner.seats is not None
    assert runner.seats.preemptions == 1
    outcomes = await asyncio.gather(online_job, *jobs)
    assert [o["status_code"] for o in outcomes] == [200, 200, 200]
    # The one started last lost its run and ran again after the online task: one answer each.
    _assert_one_whole_answer(timeline, first, 20)
    _assert_one_whole_answer(timeline, second, 20)
    assert timeline.first("answer", online.task_id) < timeline.first("answer", second.task_id)
    assert timeline.first("answer", first.task_id) < timeline.first("answer", second.task_id)
    assert outcomes[2]["completion_tokens"] == 20  # the usage of the run that answered


async def test_streaming_tasks_are_never_preempted() -> None:
    runner, timeline, _server = await _runner(width=1, online=0, cap=2)
    long, late = _streaming(15), _streaming(5)
    first = runner.start(long)
    await until(lambda: ("event", long.task_id) in timeline.log)
    second = runner.start(late)
    outcomes = await asyncio.gather(first, second)
    assert [o["status_code"] for o in outcomes] == [200, 200]
    assert runner.seats is not None
    assert runner.seats.preemptions == 0
    # The late one waited for the seat: the first stream's tokens went out whole, before it.
    long_events = [i for i, entry in enumerate(timeline.log) if entry == ("event", long.task_id)]
    assert max(long_events[:-1]) < timeline.first("event", late.task_id)  # all but [DONE]
    assert outcomes[0]["completion_tokens"] == 15


async def test_a_task_is_preempted_at_most_the_cap() -> None:
    runner, timeline, server = await _runner(width=1, online=0, cap=1)
    victim = _offline(10)
    job = runner.start(victim)
    await until(lambda: server.engine.get_load()["running"] == 1)
    preempting = _streaming(3)
    online_done = runner.start(preempting)
    assert online_done is not None
    assert (await online_done)["status_code"] == 200
    assert runner.seats is not None
    assert runner.seats.preemptions == 1
    await until(lambda: server.engine.get_load()["running"] == 1)  # the victim runs again
    late = _streaming(3)
    late_done = runner.start(late)
    outcomes = await asyncio.gather(job, late_done)
    assert [o["status_code"] for o in outcomes] == [200, 200]
    assert runner.seats.preemptions == 1
    # Its cap spent, the re-run kept its seat (the late stream waited) and answered whole.
    _assert_one_whole_answer(timeline, victim, 10)


# -- the engine's seats in the config ----------------------------------------------------------


def test_online_seats_raise_the_engine_above_the_configured_width() -> None:
    from ray_worker.serve.llm_config import (
        cpu_llm_config,
        max_num_seqs_of,
        seats_of,
        sim_llm_config,
        with_online_seats,
    )

    sim = with_online_seats(sim_llm_config("m", max_num_seqs=64), 0.1, 2)
    assert seats_of(sim) == (64, 7, 2)
    assert max_num_seqs_of(sim) == 71
    assert max_num_seqs_of(with_online_seats(sim, 0.1, 2)) == 71  # once only
    vllm = with_online_seats(cpu_llm_config("/models/x", max_num_seqs=8), 0.1, 0)
    assert vllm.engine_kwargs["max_num_seqs"] == 9
    assert seats_of(vllm) == (8, 1, 0)
    off = with_online_seats(sim_llm_config("m"), 0.0, 2)
    assert seats_of(off) == (8, 0, 2)  # the simulated engine's default width
    assert max_num_seqs_of(off) == 8
