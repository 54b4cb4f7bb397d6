"""Poller: capacity-sized takes, online before offline, backoff, duplicates, stop and status.

Assertions are on the recorded sequence of take requests and on the backoff values the pool
reports, never on elapsed time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray_worker.bella.protocol import Level, TakeStrategy, Task
from ray_worker.config import QueueSpec
from ray_worker.errors import AuthenticationError, QueueUnavailableError
from ray_worker.worker.poller import make_pools
from tests.unit.fakes import (
    by_queue,
    make_task,
    settle,
    until,
)
from tests.unit.poll_rig import ERR_0, ERR_MAX, IDLE_0, IDLE_MAX, PollRig, tasks_of

# -- pools -----------------------------------------------------------------------------------


def test_make_pools_groups_by_model_online_first() -> None:
    queues = [
        QueueSpec(name="a:1"),
        QueueSpec(name="b:0"),
        QueueSpec(name="c:1", model="x"),
        QueueSpec(name="a:0"),
        QueueSpec(name="d:0", model="x"),
    ]
    pools = make_pools(queues, {"a:1": "m", "b:0": "m", "c:1": "x", "a:0": "m", "d:0": "x"})
    assert [(p.model_id, p.online, p.offline) for p in pools] == [
        ("m", ["b:0", "a:0"], ["a:1"]),
        ("x", ["d:0"], ["c:1"]),
    ]
    assert all(p.state == "starting" for p in pools)


# -- what a take asks for ---------------------------------------------------------------------


async def test_first_take_lists_online_first_and_is_sized_by_offline_room(make: Any) -> None:
    rig = make(["q:1", "p:0"], max_take_size=32, process_timeout_s=60, min_age_seconds=2)
    rig.poller.start()
    await rig.takes(1)
    first = rig.requests[0]
    assert first.queues == ["p:0", "q:1"]
    assert first.size == 6  # target 8, reserve ceil(8 * 0.25) = 2 kept for level 0
    assert first.strategy is TakeStrategy.ACTIVE_PASSIVE
    assert first.process_timeout == 60
    assert first.process_max_retries == 2
    assert first.min_age_seconds == 2


async def test_size_is_capped_by_max_take_size(make: Any) -> None:
    rig = make(max_take_size=3)
    rig.poller.start()
    await rig.takes(1)
    assert rig.requests[0].size == 3


async def test_fifo_is_capped_at_ten(make: Any) -> None:
    rig = make(max_num_seqs=64, strategy="fifo", max_take_size=100)
    rig.poller.start()
    await rig.takes(1)
    assert rig.requests[0].size == 10
    assert rig.requests[0].strategy is TakeStrategy.FIFO


async def test_only_the_online_reserve_left_drops_offline_queues(make: Any) -> None:
    rig = make(["q:0", "q:1"], process_timeout_s=60)
    rig.capacity.acquire("m", Level.OFFLINE, 6)  # offline room used up; 2 kept for level 0
    rig.poller.start()
    await rig.takes(1)
    request = rig.requests[0]
    assert request.queues == ["q:0"]
    assert request.size == 2
    assert request.process_timeout == 0
    assert request.process_max_retries == 0


async def test_online_only_pool_sends_no_process_timeout(make: Any) -> None:
    rig = make(["q:0"], process_timeout_s=60)
    rig.poller.start()
    await rig.takes(1)
    assert rig.requests[0].queues == ["q:0"]
    assert rig.requests[0].size == 8
    assert rig.requests[0].process_timeout == 0


async def test_offline_only_pool_stops_at_the_reserve(make: Any) -> None:
    rig = make(["q:1"])
    rig.capacity.acquire("m", Level.OFFLINE, 6)
    rig.poller.start()
    await until(lambda: rig.pool.state == "at capacity")
    assert rig.requests == []


# -- capacity gates the take -------------------------------------------------------------------


async def test_no_take_without_replicas_then_a_report_starts_taking(make: Any) -> None:
    rig = make(max_num_seqs=None)
    rig.poller.start()
    await until(lambda: rig.pool.state == "waiting for replicas")
    assert rig.requests == []
    rig.report(max_num_seqs=4)
    await rig.takes(1)
    assert rig.requests[0].size == 3  # 4 - ceil(4 * 0.25)


async def test_no_take_at_capacity_until_a_task_is_released(make: Any) -> None:
    rig = make()
    rig.capacity.acquire("m", Level.ONLINE, 8)
    rig.poller.start()
    await until(lambda: rig.pool.state == "at capacity")
    assert rig.requests == []
    rig.capacity.release("m", Level.ONLINE)
    await rig.takes(1)
    # One seat of the 8 is free: online work first, offline work may have it too (the online
    # work overflows its 2 seats by 5, which offline work leaves of its width of 6: 1).
    assert rig.requests[0].queues == ["q:0", "q:1"]
    assert rig.requests[0].size == 1


async def test_taken_tasks_hold_capacity_until_answered(make: Any) -> None:
    gate = asyncio.Event()
    rig = make(engine_default=[gate, {"id": "r"}])
    rig.taker.add(tasks_of(4))
    rig.poller.start()
    await until(lambda: rig.engine.active == 4)
    await rig.takes(2)
    assert rig.capacity.model("m").in_flight[Level.OFFLINE] == 4
    assert rig.requests[1].size == 2  # offline room left: 6 - 4
    gate.set()
    await until(lambda: len(rig.completer.completes) == 4)
    await until(lambda: rig.capacity.model("m").total_in_flight == 0)


# -- pacing ----------------------------------------------------------------------------------


async def test_repolls_at_once_while_tasks_flow_then_backs_off(make: Any) -> None:
    rig = make(["q:1"])
    rig.taker.add(tasks_of(2), tasks_of(1), {}, {}, {}, {})
    rig.poller.start()
    await rig.takes(7)
    assert rig.taker.served[:6] == ["tasks:2", "tasks:1", "empty", "empty", "empty", "empty"]
    # The wait before each take: none while tasks flow, then doubling up to the cap (jittered).
    b = rig.backoffs
    assert b[0] == b[1] == b[2] == 0.0
    for i, upper in enumerate([IDLE_0, 2 * IDLE_0, IDLE_MAX, IDLE_MAX], start=3):
        assert upper * 0.5 <= b[i] <= upper
    assert rig.pool.tasks_taken == 3
    assert rig.pool.empty_takes >= 4


async def test_idle_backoff_resets_when_tasks_come(make: Any) -> None:
    rig = make(["q:1"])
    rig.taker.add({}, {}, {}, tasks_of(1), {})
    rig.poller.start()
    await rig.takes(6)
    b = rig.backoffs
    assert b[3] >= IDLE_MAX * 0.5  # after three empty takes
    assert b[4] == 0.0  # tasks came: re-poll at once
    assert IDLE_0 * 0.5 <= b[5] <= IDLE_0  # and the idle wait starts over


async def test_failed_takes_back_off_exponentially_then_recover(make: Any) -> None:
    rig = make(["q:1"])
    down = QueueUnavailableError("Bella-Queue is down", 503)
    rig.taker.add(down, down, down, down, tasks_of(1), {})
    rig.poller.start()
    await rig.takes(7)
    assert rig.states[1:5] == ["failing"] * 4
    assert rig.states[5] == "taking"
    assert rig.pool.last_error == "QueueUnavailableError: Bella-Queue is down"  # kept for status
    b = rig.backoffs
    for i, base in enumerate([ERR_0, 2 * ERR_0, ERR_MAX, ERR_MAX], start=1):
        assert base * 0.75 <= b[i] <= base * 1.25
    assert b[5] == 0.0  # the take after the failures brought tasks
    assert IDLE_0 * 0.5 <= b[6] <= IDLE_0
    assert rig.pool.failed_takes == 4
    assert rig.pool.errors_in_a_row == 0
    assert rig.dispatcher.metrics.total("take_failures", model="m") == 4


async def test_authentication_failures_keep_the_loop_alive(make: Any) -> None:
    rig = make()
    rig.taker.add(AuthenticationError("401"), AuthenticationError("401"))
    rig.poller.start()
    await rig.takes(3)
    assert rig.poller.alive
    assert rig.pool.failed_takes == 2


async def test_an_unexpected_error_kills_the_loop_visibly(make: Any) -> None:
    rig = make()
    rig.taker.add(RuntimeError("bug"))
    rig.poller.start()
    await until(lambda: not rig.poller.alive)
    failure = rig.poller.failure()
    assert isinstance(failure, RuntimeError)
    assert str(failure) == "bug"


# -- fan-out and limits ----------------------------------------------------------------------


def fanned(n: int, level: int = 1) -> Task:
    return make_task(
        "callback", queue="q", level=level, data={"messages": [{"role": "user"}], "n": n}
    )


async def test_a_task_with_n_holds_n_of_capacity_until_answered(make: Any) -> None:
    gate = asyncio.Event()
    rig = make(engine_default=[gate, {"id": "r"}])
    task = fanned(3)
    rig.taker.add(by_queue(task), by_queue(task))
    rig.poller.start()
    await until(lambda: rig.engine.active == 1)
    await rig.takes(3)
    assert rig.dispatcher.metrics.total("duplicates") == 1  # its 3 counted, released at once
    assert rig.capacity.model("m").in_flight[Level.OFFLINE] == 3
    assert rig.requests[2].size == 6 - 3  # offline room left after its 3 sequences
    gate.set()
    await until(lambda: rig.capacity.model("m").total_in_flight == 0)
    await settle()
    assert rig.capacity.model("m").in_flight == {Level.ONLINE: 0, Level.OFFLINE: 0}
    assert len(rig.completer.completes) == 1


async def test_a_task_over_max_n_is_400_without_a_replica_and_holds_nothing(make: Any) -> None:
    rig = make()
    task = fanned(17)  # DispatcherConfig's max_n is 16
    rig.taker.add(by_queue(task))
    rig.poller.start()
    await until(lambda: len(rig.completer.completes) == 1)
    await until(lambda: rig.capacity.model("m").total_in_flight == 0)
    (complete,) = rig.completer.of(task.task_id)
    assert complete["status_code"] == 400
    assert complete["body"]["error"]["param"] == "n"
    assert rig.engine.calls == []


async def test_a_queues_own_limit_applies_to_its_tasks(make: Any) -> None:
    rig = make([QueueSpec(name="q:1", max_output_tokens=64)])
    ok = make_task("callback", queue="q", level=1, data={"messages": [], "max_tokens": 64})
    over = make_task("callback", queue="q", level=1, data={"messages": [], "max_tokens": 65})
    rig.taker.add(by_queue(ok, over))
    rig.poller.start()
    await until(lambda: len(rig.completer.completes) == 2)
    assert rig.completer.of(ok.task_id)[0]["status_code"] == 200
    error = rig.completer.of(over.task_id)[0]["body"]["error"]
    assert (error["param"], error["type"]) == ("max_tokens", "invalid_request_error")
    assert [c.task_id for c in rig.replicas.calls] == [ok.task_id]


# -- duplicates ------------------------------------------------------------------------------


async def test_duplicates_are_released(make: Any) -> None:
    gate = asyncio.Event()
    rig = make(["q:1"], engine_default=[gate, {"id": "r"}])
    task = make_task("callback", queue="q", level=1)
    rig.taker.add(by_queue(task), by_queue(task))
    rig.poller.start()
    await rig.takes(3)
    assert rig.taker.served[:2] == ["tasks:1", "tasks:1"]
    assert rig.capacity.model("m").in_flight[Level.OFFLINE] == 1
    assert rig.dispatcher.metrics.total("duplicates") == 1
    gate.set()
    await until(lambda: rig.capacity.model("m").total_in_flight == 0)
    assert len(rig.engine.calls) == 1
    assert len(rig.completer.completes) == 1


# -- odd levels ------------------------------------------------------------------------------


async def test_a_task_of_an_unknown_level_is_dispatched_as_offline(make: Any) -> None:
    gate = asyncio.Event()
    rig = make(["q:1"], engine_default=[gate, {"id": "r"}])
    odd = make_task("callback", queue="q", level=7)
    assert odd.level == 7
    rig.taker.add({"q:1": [odd]}, tasks_of(1))
    rig.poller.start()
    await until(lambda: rig.engine.active == 2)
    assert rig.poller.alive  # no crash on Level(7)
    assert rig.taker.served[:2] == ["tasks:1", "tasks:1"]
    assert rig.capacity.model("m").in_flight == {Level.ONLINE: 0, Level.OFFLINE: 2}
    assert [(c.model_id, c.task_id) for c in rig.replicas.calls_for(odd.task_id)] == [
        ("m", odd.task_id)
    ]
    (call,) = rig.engine.calls_for(odd.task_id)
    assert call.priority == 1  # offline priority
    gate.set()
    await until(lambda: len(rig.completer.completes) == 2)
    assert [c["status_code"] for c in rig.completer.of(odd.task_id)] == [200]
    assert rig.events.events == []
    await until(lambda: rig.capacity.model("m").total_in_flight == 0)
    await rig.takes(4)
    assert rig.poller.alive


# -- several pools ---------------------------------------------------------------------------


async def test_each_model_has_its_own_loop_and_capacity(make: Any) -> None:
    rig = make(
        [QueueSpec(name="a:0", model="x"), QueueSpec(name="b:0", model="y")],
        models=("x", "y"),
        max_num_seqs=None,
    )
    rig.report("x", 4)
    rig.poller.start()
    await rig.takes(1)
    assert {tuple(r.queues) for r in rig.requests} == {("a:0",)}
    assert rig.pools[1].state == "waiting for replicas"
    rig.report("y", 2)
    await until(lambda: any(r.queues == ["b:0"] for r in rig.requests))
    assert next(r for r in rig.requests if r.queues == ["b:0"]).size == 2


# -- lifecycle and status --------------------------------------------------------------------


async def test_stop_ends_the_loops(make: Any) -> None:
    rig = make()
    rig.poller.start()
    rig.poller.start()  # idempotent
    await rig.takes(2)
    await rig.poller.stop()
    assert all(loop.done() for loop in rig.poller._loops)
    assert rig.pool.state == "stopped"
    assert rig.poller.alive


async def test_stop_while_waiting_for_capacity(make: Any) -> None:
    rig = make(max_num_seqs=None)
    rig.poller.start()
    await until(lambda: rig.pool.state == "waiting for replicas")
    await rig.poller.stop()
    assert rig.pool.state == "stopped"


async def test_stop_during_a_take_dispatches_what_it_took(make: Any) -> None:
    gate = asyncio.Event()
    rig = make(["q:1"])
    rig.taker.add(gate, tasks_of(2))
    rig.poller.start()
    await rig.takes(1)
    stopping = asyncio.create_task(rig.poller.stop())
    await settle()
    assert not stopping.done()  # stop() waits for the take in flight
    gate.set()  # the server answers the in-flight take after stop() began
    await stopping
    await until(lambda: len(rig.completer.completes) == 2)
    assert len(rig.requests) == 1


async def test_stop_gives_up_on_a_take_that_never_returns(make: Any) -> None:
    rig = make(["q:1"], take_timeout_s=0.05)
    rig.taker.add(asyncio.Event())  # never answered
    rig.poller.start()
    await rig.takes(1)
    await rig.poller.stop()
    assert all(loop.done() for loop in rig.poller._loops)
    assert rig.poller.alive
    assert rig.pool.state == "stopped"


async def test_stop_waits_for_a_take_until_its_own_http_timeouts_end_it(make: Any) -> None:
    # The answer comes after take_timeout_s, while the take's connect, write and read
    # timeouts (counted one after the other) have not all run out: its tasks are dispatched.
    gate = asyncio.Event()
    rig = make(["q:1"], take_timeout_s=0.05)
    rig.taker.timeout_s = 0.05  # a QueueClient's pool, write and read timeouts
    rig.taker.connect_timeout_s = 30.0
    rig.taker.add(gate, tasks_of(2))
    rig.poller.start()
    await rig.takes(1)
    stopping = asyncio.create_task(rig.poller.stop())
    await asyncio.sleep(0.3)  # take_timeout_s is long past; the take's own timeouts are not
    assert not stopping.done()
    gate.set()
    await stopping
    await until(lambda: len(rig.completer.completes) == 2)
    assert rig.pool.state == "stopped"


async def test_status_shape(make: Any) -> None:
    rig = make(["q:0", "q:1"])
    rig.taker.add(tasks_of(1))
    rig.poller.start()
    await until(lambda: rig.pool.tasks_taken == 1 and rig.pool.empty_takes >= 1)
    status = rig.poller.status()
    assert set(status) == {"in_flight", "pools"}
    assert isinstance(status["in_flight"], int)
    (pool,) = status["pools"]
    assert set(pool) == {
        "model",
        "queues",
        "state",
        "takes",
        "tasks_taken",
        "full_takes",
        "empty_takes",
        "failed_takes",
        "last_take_age_s",
        "last_take_size",
        "last_take_count",
        "backoff_s",
        "last_error",
        "backlog",
        "capacity",
    }
    assert pool["model"] == "m"
    assert pool["queues"] == ["q:0", "q:1"]
    assert pool["tasks_taken"] == 1
    assert pool["last_take_age_s"] >= 0
    assert pool["last_error"] is None
    assert pool["capacity"] == rig.capacity.snapshot()["m"]


def test_status_before_start() -> None:
    rig = PollRig()
    (pool,) = rig.poller.status()["pools"]
    assert pool["state"] == "starting"
    assert pool["last_take_age_s"] is None
    assert pool["takes"] == 0


# -- unreadable tasks ------------------------------------------------------------------------


async def test_unreadable_tasks_are_answered_400_and_the_rest_served(make: Any) -> None:
    from ray_worker.bella.protocol import TakeResponse

    rig = make(["q:0", "q:1"])
    good = make_task("callback", queue="q", level=1)
    online_bad = {
        "task_id": "T-bad-online",
        "ak": "sk-secret",
        "response_mode": "blocking",
        "instance_id": "10.0.0.5:8080",
        "data": "not an object",
    }
    offline_bad = {"task_id": "T-bad-offline", "response_mode": "carrier", "level": 1}
    no_id = {"response_mode": "blocking", "data": {}}
    wire = {"q:0": [online_bad, no_id], "q:1": [good.to_wire(), offline_bad, 42]}
    rig.taker.add(TakeResponse.from_wire(wire))
    rig.poller.start()
    await until(lambda: rig.completer.of(good.task_id) and rig.completer.of("T-bad-offline"))
    await until(lambda: rig.events.completions_of("T-bad-online"))
    assert rig.poller.alive
    assert [a["status_code"] for a in rig.completer.of(good.task_id)] == [200]
    for task_id, answers in (
        ("T-bad-online", rig.events.completions_of("T-bad-online")),
        ("T-bad-offline", rig.completer.of("T-bad-offline")),
    ):
        assert [a["status_code"] for a in answers] == [400], task_id
        assert answers[0]["body"]["error"]["type"] == "invalid_request_error"
    assert rig.dispatcher.metrics.total("invalid_tasks") == 4
    assert rig.dispatcher.metrics.total("invalid_tasks_dropped") == 2
    assert rig.pool.tasks_taken == 1
    # Nothing is left holding capacity.
    await until(lambda: rig.capacity.in_flight("m") == 0)


async def test_a_take_of_only_unreadable_tasks_is_not_an_empty_take(make: Any) -> None:
    from ray_worker.bella.protocol import TakeResponse

    rig = make(["q:1"])
    rig.taker.add(TakeResponse.from_wire({"q:1": [{"task_id": "T-x", "data": 1}]}))
    rig.poller.start()
    await rig.takes(2)
    assert rig.states[1] == "taking"
    await until(lambda: rig.completer.of("T-x"))
    assert rig.completer.of("T-x")[0]["status_code"] == 400


def test_the_one_backoff_doubles_its_jittered_step_to_the_cap_and_resets() -> None:
    import random

    from ray_worker.aio import SPREAD, Backoff

    backoff = Backoff(0.5, 3.0, jitter=SPREAD, rng=random.Random(7))
    waits = [backoff.next_s() for _ in range(5)]
    for wait_s, step_s in zip(waits, (0.5, 1.0, 2.0, 3.0, 3.0), strict=True):
        assert 0.75 * step_s <= wait_s <= 1.25 * step_s
    backoff.reset()
    assert 0.375 <= backoff.next_s() <= 0.625
