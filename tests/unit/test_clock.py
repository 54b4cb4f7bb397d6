"""The server's clock from its Date headers, and deadlines that use it."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from ray_worker.bella.clock import ServerClock
from ray_worker.bella.protocol import ResponseMode, now_ms
from ray_worker.hop import deadline_ms
from ray_worker.task.runner import TaskRunner
from tests.unit.fakes import FakeCompleter, FakeEngine, FakeEventSink, make_task

RESPONSE = {"object": "chat.completion", "choices": []}


def _date(epoch_s: float) -> str:
    return formatdate(epoch_s, usegmt=True)


@pytest.mark.parametrize("skew_s", [300, -300])
def test_offset_follows_the_servers_date_header(skew_s: int) -> None:
    clock = ServerClock()
    local = 1_800_000_000.25
    clock.observe(_date(local + skew_s), local - 0.01, local + 0.01)
    assert abs(clock.offset_ms - skew_s * 1000) <= 1000
    assert abs(clock.now_ms() - (now_ms() + skew_s * 1000)) <= 1100


def test_skew_within_the_headers_resolution_counts_as_none() -> None:
    clock = ServerClock()
    local = 1_800_000_000.9
    clock.observe(_date(local), local - 0.001, local + 0.001)
    assert clock.offset_ms == 0


def test_unreadable_or_missing_headers_are_ignored() -> None:
    clock = ServerClock()
    for header in (None, "", "yesterday", "Mon, 99 Foo 20 25:61:61 GMT"):
        clock.observe(header, 0.0, 0.0)
    assert clock.offset_ms == 0


def test_one_odd_header_does_not_move_the_offset() -> None:
    clock = ServerClock()
    local = 1_800_000_000.5
    for _ in range(4):
        clock.observe(_date(local + 300), local, local)
    clock.observe(_date(local), local, local)  # a stray proxy's clock
    assert abs(clock.offset_ms - 300_000) <= 1000


@pytest.mark.parametrize("skew_s", [300, -300])
async def test_online_tasks_are_served_and_expired_ones_refused_under_skew(skew_s: int) -> None:
    server_now = now_ms() + skew_s * 1000
    events = FakeEventSink()
    runner = TaskRunner(
        engine=FakeEngine(default=[RESPONSE]),
        events=events,
        completer=FakeCompleter(),
        clock=lambda: now_ms() + skew_s * 1000,
    )
    fresh = make_task(ResponseMode.BLOCKING, start_time=server_now, expire_in_ms=None)
    fresh = fresh.model_copy(update={"expire_time": server_now + 60_000})
    stale = fresh.model_copy(
        update={"task_id": fresh.task_id + "x", "expire_time": server_now - 1_000}
    )
    assert (await runner.run(fresh))["status_code"] == 200
    assert (await runner.run(stale))["status_code"] == 408


def test_a_level_1_task_stops_mattering_when_the_server_gives_up_redelivering() -> None:
    now = now_ms()
    offline = make_task(ResponseMode.CALLBACK, level=1, expire_in_ms=86_400_000)
    assert deadline_ms(offline, 600, now=now, redelivery_window_s=90) == now + 90_000
    assert deadline_ms(offline, 600, now=now) == offline.expire_time
    online = make_task(ResponseMode.STREAMING, expire_in_ms=60_000)
    assert deadline_ms(online, 600, now=now, redelivery_window_s=1) == online.expire_time
    level_0 = make_task(ResponseMode.CALLBACK, level=0, expire_in_ms=60_000)
    assert deadline_ms(level_0, 600, now=now, redelivery_window_s=1) == level_0.expire_time
