"""``LoadReporter`` (the LLM replica's load reports): a changed load is sent at the next read,
an unchanged one only when the heartbeat is due, and a failed report is sent again."""

from __future__ import annotations

import asyncio
from typing import Any

from ray_worker.config import CapacityConfig
from ray_worker.serve.load_report import LoadReporter
from ray_worker.testing.waiting import wait_for


class _Poller:
    """A stand-in for the poller's handle: records each report, fails while ``down``."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.down = False
        self.report_load = self

    async def _answer(self, report: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise RuntimeError("poller unavailable")
        self.reports.append(report)
        return {"backlog": 3}

    def remote(self, report: dict[str, Any]) -> Any:
        return self._answer(report)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _reporter(load: dict[str, Any], clock: _Clock) -> tuple[LoadReporter, _Poller]:
    poller = _Poller()

    async def get_load() -> dict[str, Any]:
        return {**load, "ts": clock.now}  # ts changes on every read: it is not a change

    reporter = LoadReporter(get_load, 0.001, heartbeat_s=2.0, clock=clock)
    reporter._find_poller = lambda: poller  # type: ignore[method-assign]
    reporter.start()
    await wait_for(lambda: poller.reports, timeout=5, interval=0.001)
    return reporter, poller


async def test_an_unchanged_load_is_sent_on_the_heartbeat_only() -> None:
    clock = _Clock()
    reporter, poller = await _reporter({"replica_id": "r1", "running": 0}, clock)
    try:
        skipped = reporter.reports_skipped
        await wait_for(lambda: reporter.reports_skipped >= skipped + 20, timeout=5, interval=0.001)
        assert len(poller.reports) == 1  # many reads, nothing new: one report
        assert reporter.backlog == 3
        clock.now += 2.0  # the heartbeat is due
        await wait_for(lambda: len(poller.reports) == 2, timeout=5, interval=0.001)
        skipped = reporter.reports_skipped
        await wait_for(lambda: reporter.reports_skipped >= skipped + 20, timeout=5, interval=0.001)
        assert len(poller.reports) == 2
    finally:
        await reporter.stop()


async def test_a_changed_load_is_sent_at_the_next_read() -> None:
    clock = _Clock()
    load: dict[str, Any] = {"replica_id": "r1", "running": 0, "held_ids": []}
    reporter, poller = await _reporter(load, clock)
    try:
        load["running"] = 1
        load["held_ids"] = ["t1"]
        await wait_for(lambda: len(poller.reports) == 2, timeout=5, interval=0.001)
        assert poller.reports[-1]["running"] == 1
        assert poller.reports[-1]["held_ids"] == ["t1"]
        assert clock.now == 100.0  # no heartbeat was due: the change alone sent it
    finally:
        await reporter.stop()


async def test_a_failed_report_is_sent_again_though_the_load_did_not_change() -> None:
    clock = _Clock()
    reporter, poller = await _reporter({"replica_id": "r1", "running": 0}, clock)
    try:
        poller.down = True
        clock.now += 2.0  # the heartbeat fails
        await wait_for(lambda: reporter.last_error is not None, timeout=5, interval=0.001)
        poller.down = False
        clock.now += 0.1  # well before the next heartbeat: sent because the last one failed
        await wait_for(lambda: len(poller.reports) == 2, timeout=5, interval=0.001)
        assert reporter.last_error is None
    finally:
        await reporter.stop()


def test_the_heartbeat_stays_within_the_staleness_and_above_the_read_interval() -> None:
    assert CapacityConfig().report_heartbeat_s == 2.0
    assert CapacityConfig(load_stale_after_s=1.0).report_heartbeat_s == 0.5
    assert CapacityConfig(load_heartbeat_s=0.1).report_heartbeat_s == 0.5  # the read interval
    assert (
        CapacityConfig(load_heartbeat_s=0.1, load_report_interval_s=0.05).report_heartbeat_s == 0.1
    )


async def test_stop_ends_the_loop() -> None:
    clock = _Clock()
    reporter, poller = await _reporter({"replica_id": "r1"}, clock)
    await reporter.stop()
    await asyncio.sleep(0.01)
    count = len(poller.reports)
    clock.now += 10
    await asyncio.sleep(0.02)
    assert len(poller.reports) == count
