"""CapacityTracker: remaining capacity from replica load reports and in-flight counts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_worker.bella.protocol import Level
from ray_worker.config import CapacityConfig
from ray_worker.hop import ReplicaLoad
from ray_worker.worker.capacity import CapacityTracker
from tests.unit.fakes import settle, until

ONLINE, OFFLINE = Level.ONLINE, Level.OFFLINE


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def load(
    replica: str = "r1",
    *,
    model: str = "m",
    max_num_seqs: int = 8,
    running: int = 0,
    waiting: int = 0,
    kv: float = 0.0,
    held: list[str] | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "replica_id": replica,
        "model_id": model,
        "running": running,
        "waiting": waiting,
        "kv_cache_usage": kv,
        "max_num_seqs": max_num_seqs,
    }
    if held is not None:
        report["held_ids"] = held
    return report


def tracker(
    models: tuple[str, ...] = ("m",), clock: Clock | None = None, **config: Any
) -> CapacityTracker:
    settings = {"target_ratio": 1.0, **config}
    return CapacityTracker(CapacityConfig(**settings), list(models), clock=clock or Clock())


def test_no_reports_no_capacity() -> None:
    cap = tracker()
    assert cap.replicas("m") == 0
    assert cap.target("m") == 0
    assert cap.remaining("m", ONLINE) == 0
    assert cap.remaining("m", OFFLINE) == 0


def test_remaining_is_slots_times_replicas_minus_in_flight() -> None:
    cap = tracker()
    cap.report(load("r1"))
    cap.report(load("r2"))
    assert cap.replicas("m") == 2
    assert cap.target("m") == 16
    assert cap.max_num_seqs("m") == 16
    assert cap.remaining("m", ONLINE) == 16
    cap.acquire("m", ONLINE, 5)
    cap.acquire("m", OFFLINE, 3)
    assert cap.remaining("m", ONLINE) == 8


def test_target_ratio_scales_slots_and_rounds_up() -> None:
    cap = tracker(target_ratio=1.25)
    cap.report(load(max_num_seqs=8))
    assert cap.target("m") == 10
    cap.report(load("r2", max_num_seqs=3))
    assert cap.target("m") == 10 + 4  # ceil(3 * 1.25)


def test_online_seats_offline_stops_at_the_width_online_gets_the_seats() -> None:
    cap = tracker()
    # An engine of 10 seqs: a width of 8 for offline work, 2 seats kept for online work.
    report = load(max_num_seqs=10)
    cap.report({**report, "offline_width": 8, "online_seats": 2})
    assert cap.target("m") == 10
    assert cap.remaining("m", OFFLINE) == 8
    assert cap.remaining("m", ONLINE) == 10
    cap.acquire("m", OFFLINE, 8)
    assert cap.remaining("m", OFFLINE) == 0
    assert cap.remaining("m", ONLINE) == 2
    cap.acquire("m", ONLINE, 2)
    assert cap.remaining("m", ONLINE) == 0
    assert cap.remaining("m", OFFLINE) == 0


def test_offline_waiting_beyond_the_width_does_not_hold_online_back() -> None:
    cap = tracker(target_ratio=1.25)
    report = load(max_num_seqs=10)
    cap.report({**report, "offline_width": 8, "online_seats": 2})
    assert cap.remaining("m", OFFLINE) == 10  # ceil(8 * 1.25): 2 wait in the replica
    cap.acquire("m", OFFLINE, 10)
    # Online tasks get the seats, and the seats of the 2 offline tasks that only wait.
    assert cap.remaining("m", ONLINE) == 2 + 2
    cap.acquire("m", ONLINE, 3)
    assert cap.remaining("m", ONLINE) == 1
    cap.release("m", OFFLINE, 10)
    # Online work overflowing its seats holds offline work back by as much.
    assert cap.remaining("m", OFFLINE) == 10 - 1


def test_zero_reserve_gives_offline_everything() -> None:
    cap = tracker(online_reserve_ratio=0.0)
    cap.report(load(max_num_seqs=4))
    assert cap.remaining("m", OFFLINE) == cap.remaining("m", ONLINE) == 4


def test_remaining_never_negative() -> None:
    cap = tracker()
    cap.report(load(max_num_seqs=2))
    cap.acquire("m", ONLINE, 5)
    assert cap.remaining("m", ONLINE) == 0
    assert cap.remaining("m", OFFLINE) == 0


def test_kv_cache_watermark_caps_slots_at_current_load() -> None:
    cap = tracker(kv_cache_high_watermark=0.9)
    cap.report(load(max_num_seqs=8, running=3, waiting=1, kv=0.89))
    assert cap.target("m") == 8
    cap.report(load(max_num_seqs=8, running=3, waiting=1, kv=0.9))
    assert cap.target("m") == 4  # no room beyond what it already holds
    cap.acquire("m", ONLINE, 4)
    assert cap.remaining("m", ONLINE) == 0
    cap.report(load(max_num_seqs=8, running=0, waiting=0, kv=0.97))
    assert cap.target("m") == 0


def test_stale_reports_stop_counting_a_replica() -> None:
    clock = Clock()
    cap = tracker(clock=clock, load_stale_after_s=5.0)
    cap.report(load("r1"))
    clock.now += 3
    cap.report(load("r2"))
    assert cap.replicas("m") == 2
    clock.now += 2.5  # r1 is 5.5 s old, r2 2.5 s
    assert cap.replicas("m") == 1
    assert cap.target("m") == 8
    clock.now += 3
    assert cap.replicas("m") == 0
    assert cap.remaining("m", ONLINE) == 0
    cap.report(load("r1"))
    assert cap.replicas("m") == 1


def test_a_newer_report_replaces_the_older_one() -> None:
    cap = tracker()
    cap.report(load(max_num_seqs=8))
    cap.report(load(max_num_seqs=2))
    assert cap.replicas("m") == 1
    assert cap.target("m") == 2


def test_unknown_model_reports_are_ignored() -> None:
    cap = tracker()
    cap.report(load(model="other"))
    assert cap.model_ids == ["m"]
    assert cap.replicas("m") == 0
    assert "other" not in cap.snapshot()


def test_models_are_independent() -> None:
    cap = tracker(models=("a", "b"))
    cap.report(load("ra", model="a", max_num_seqs=4))
    cap.report(load("rb", model="b", max_num_seqs=2))
    cap.acquire("a", ONLINE, 4)
    assert cap.remaining("a", ONLINE) == 0
    assert cap.remaining("b", ONLINE) == 2


def test_report_fields_default_and_max_num_seqs_floor() -> None:
    parsed = ReplicaLoad.from_report({"replica_id": 1, "model_id": "m", "max_num_seqs": 0})
    assert parsed == ReplicaLoad("1", "m", 0, 0, 0.0, 1)


def test_a_report_crosses_the_hop_as_a_dict_and_reads_back_the_same() -> None:
    load = ReplicaLoad(
        "r1",
        "m",
        running=3,
        waiting=1,
        kv_cache_usage=0.5,
        max_num_seqs=8,
        draining=True,
        held_ids=frozenset({"t1", "t2"}),
        held_online=1,
        held_offline=1,
        in_flight=2,
        engine="simulated",
        ts=12.5,
        outbox={"outbox_entries": 2, "complete_retries": 5},
    )
    report = load.as_report()
    assert report["held_ids"] == ["t1", "t2"]
    assert report["outbox_entries"] == 2  # the outbox figures travel flat, under their keys
    assert ReplicaLoad.from_report({**report, "unknown_key": 1}) == load


def test_acquire_release_and_release_floor() -> None:
    cap = tracker()
    cap.acquire("m", ONLINE)
    cap.acquire("m", OFFLINE, 2)
    assert cap.model("m").in_flight == {ONLINE: 1, OFFLINE: 2}
    assert cap.model("m").total_in_flight == 3
    cap.release("m", OFFLINE)
    cap.release("m", ONLINE, 5)  # more than held: clamps at zero
    assert cap.model("m").in_flight == {ONLINE: 0, OFFLINE: 1}


def test_a_fanned_out_task_counts_its_n_and_releases_it_symmetrically() -> None:
    cap = tracker()
    cap.report(load(max_num_seqs=8))
    cap.acquire("m", ONLINE, 4, task_id="t1")
    cap.acquire("m", ONLINE, 1, task_id="t2")
    assert cap.in_flight("m") == 5
    assert cap.remaining("m", ONLINE) == 3
    # The replica's report listing both does not count them again.
    cap.report(load(max_num_seqs=8, held=["t1", "t2"]))
    assert cap.in_flight("m") == 5
    cap.release("m", ONLINE, 4, task_id="t1")
    assert cap.in_flight("m") == 1
    assert cap.remaining("m", ONLINE) == 7
    cap.release("m", ONLINE, 1, task_id="t2")
    assert cap.model("m").in_flight == {ONLINE: 0, OFFLINE: 0}
    # A late report still listing them counts nothing (they were released).
    cap.report(load(max_num_seqs=8, held=["t1", "t2"]))
    assert cap.in_flight("m") == 0
    assert cap.remaining("m", ONLINE) == 8


def test_unknown_model_in_acquire_is_a_key_error() -> None:
    cap = tracker()
    with pytest.raises(KeyError):
        cap.acquire("nope", ONLINE)
    with pytest.raises(KeyError):
        cap.model("nope")


def test_decline_counts_a_backlog_hint() -> None:
    cap = tracker()
    cap.decline("m", 3)
    cap.decline("m")
    assert cap.snapshot()["m"]["declined"] == 4


def test_snapshot_shape() -> None:
    cap = tracker()
    cap.report(load("r1", running=2, waiting=1, kv=0.5))
    cap.report(load("r2", running=1, kv=0.25))
    cap.acquire("m", ONLINE)
    cap.acquire("m", OFFLINE, 2)
    assert cap.snapshot() == {
        "m": {
            "replicas": 2,
            "draining": 0,
            "target": 16,
            "max_num_seqs": 16,
            "in_flight_online": 1,
            "in_flight_offline": 2,
            "remaining_online": 13,
            "remaining_offline": 16 - 2 - 1,
            "engine_running": 3,
            "engine_waiting": 1,
            "kv_cache_usage_max": 0.5,
            "offline_width": 16,
            "online_seats": 0,
            "online_seats_in_use": 0,
            "offline_seats_in_use": 0,
            "preemptions": 0,
            "declined": 0,
            "held_unknown": 0,
        }
    }


# -- held_ids: tasks a replica runs that this tracker did not count ----------------------


def test_unknown_held_ids_count_as_in_flight() -> None:
    cap = tracker()
    cap.report(load("r1", held=["t1", "t2", "t3"]))
    assert cap.in_flight("m") == 3
    assert cap.remaining("m", ONLINE) == 8 - 3
    assert cap.remaining("m", OFFLINE) == 8 - 3
    assert cap.snapshot()["m"]["held_unknown"] == 3
    assert cap.snapshot()["m"]["in_flight_online"] == 0  # its own counts are untouched


def test_held_ids_this_tracker_acquired_are_not_counted_twice() -> None:
    cap = tracker()
    cap.acquire("m", ONLINE, task_id="mine-1")
    cap.acquire("m", OFFLINE, task_id="mine-2")
    cap.report(load("r1", held=["mine-1", "mine-2", "theirs"]))
    assert cap.in_flight("m") == 3  # 2 counted here + 1 unknown
    assert cap.remaining("m", ONLINE) == 5
    assert cap.snapshot()["m"]["held_unknown"] == 1


def test_released_ids_in_a_stale_report_are_not_counted() -> None:
    cap = tracker()
    cap.acquire("m", OFFLINE, task_id="done-1")
    cap.acquire("m", ONLINE, task_id="done-2")
    cap.release("m", OFFLINE, task_id="done-1")
    cap.release("m", ONLINE, task_id="done-2")
    cap.report(load("r1", held=["done-1", "done-2"]))  # sent before the releases arrived
    assert cap.in_flight("m") == 0
    assert cap.remaining("m", ONLINE) == 8
    assert cap.snapshot()["m"]["held_unknown"] == 0


def test_held_ids_are_summed_over_replicas_and_replaced_by_the_next_report() -> None:
    cap = tracker()
    cap.report(load("r1", held=["a", "b"]))
    cap.report(load("r2", held=["c"]))
    assert cap.in_flight("m") == 3
    cap.report(load("r1", held=[]))  # its tasks ended
    assert cap.in_flight("m") == 1
    cap.report(load("r2"))  # a report without held_ids holds nothing unknown
    assert cap.in_flight("m") == 0


def test_held_ids_of_a_stale_replica_stop_counting() -> None:
    clock = Clock()
    cap = tracker(clock=clock, load_stale_after_s=5.0)
    cap.report(load("r1", held=["a", "b"]))
    assert cap.in_flight("m") == 2
    clock.now += 10
    assert cap.in_flight("m") == 0


# -- wait_changed ------------------------------------------------------------------------


async def _waiter(cap: CapacityTracker, timeout_s: float = 30.0) -> asyncio.Task[None]:
    task = asyncio.create_task(cap.wait_changed(timeout_s))
    await settle()
    assert not task.done()
    return task


async def test_wait_changed_wakes_on_release() -> None:
    cap = tracker()
    cap.acquire("m", ONLINE)
    task = await _waiter(cap)
    cap.release("m", ONLINE)
    await until(task.done)


async def test_wait_changed_wakes_on_a_new_replica() -> None:
    cap = tracker()
    task = await _waiter(cap)
    cap.report(load("r1"))
    await until(task.done)


async def test_wait_changed_wakes_when_slots_change() -> None:
    cap = tracker()
    cap.report(load(max_num_seqs=4))
    task = await _waiter(cap)
    cap.report(load(max_num_seqs=6))
    await until(task.done)


async def test_wait_changed_ignores_reports_that_change_nothing() -> None:
    cap = tracker()
    cap.report(load(max_num_seqs=4, running=1))
    task = await _waiter(cap)
    cap.report(load(max_num_seqs=4, running=2))  # same slots: capacity did not grow
    await settle()
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_changed_wakes_when_a_stale_replica_reports_again() -> None:
    clock = Clock()
    cap = tracker(clock=clock, load_stale_after_s=5.0)
    cap.report(load("r1"))
    clock.now += 10  # r1 went silent
    assert cap.remaining("m", ONLINE) == 0  # the poller sees no room (and r1 is dropped)
    task = await _waiter(cap)
    cap.report(load("r1"))  # same slots as its last report, but it is back
    await until(task.done)
    assert cap.remaining("m", ONLINE) == 8


async def test_wait_changed_times_out_quietly() -> None:
    cap = tracker()
    await cap.wait_changed(0.005)  # returns, does not raise
    assert not cap._waiters


async def test_wait_changed_wakes_every_waiter() -> None:
    cap = tracker()
    cap.acquire("m", ONLINE)
    tasks = [await _waiter(cap) for _ in range(3)]
    cap.release("m", ONLINE)
    await until(lambda: all(t.done() for t in tasks))
    assert not cap._waiters


def test_a_draining_replica_gives_no_capacity_but_its_tasks_stay_in_flight() -> None:
    cap = tracker()
    cap.report(load("r1"))
    cap.report({**load("r2", held=["t-old"]), "draining": True})
    assert cap.replicas("m") == 1
    assert cap.target("m") == 8  # r1 alone
    assert cap.in_flight("m") == 1  # r2 still runs a task this poller did not hand out
    assert cap.remaining("m", ONLINE) == 7
    snap = cap.snapshot()["m"]
    assert (snap["replicas"], snap["draining"]) == (1, 1)


def test_task_fate_from_the_reports_after_a_failed_call() -> None:
    clock = Clock()
    cap = tracker(clock=clock, load_stale_after_s=5)
    cap.report(load("r1", held=["t1"]))
    since = cap.now()
    assert cap.task_fate("m", "r1", "t1", since=since) == "unknown"  # no report since
    clock.now += 0.5
    cap.report(load("r1", held=["t1"]))
    assert cap.task_fate("m", "r1", "t1", since=since) == "held"
    clock.now += 0.5
    cap.report(load("r1", held=[]))
    assert cap.task_fate("m", "r1", "t1", since=since) == "ended"
    clock.now += 6
    assert cap.task_fate("m", "r1", "t1", since=since) == "gone"  # stale: it died
    assert cap.task_fate("m", "r9", "t1", since=since) == "gone"  # never reported
