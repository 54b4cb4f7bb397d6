"""Unit tests of ``ray_worker.task.outbox``: answers retried until delivered or expired,
bounded by bytes with backpressure, drained at a stop."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ray_worker.bella.protocol import Task
from ray_worker.config import DispatcherConfig
from ray_worker.errors import (
    AuthenticationError,
    BadRequestError,
    QueueGatewayError,
    QueueUnavailableError,
)
from ray_worker.task.outbox import Outbox
from ray_worker.testing.waiting import wait_for


@pytest.fixture(autouse=True)
def _outboxes_stop_with_their_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every outbox a test makes stops delivering when the test ends: a retry loop left
    running (an answer whose Bella-Queue stays down) would go on in the next tests, which
    share the event loop, spending their CPU and logging into their captured records."""
    made: list[Outbox] = []
    init = Outbox.__init__

    def tracked(self: Outbox, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Outbox, "__init__", tracked)
    yield
    for outbox in made:
        outbox.hand_over()


FAST = DispatcherConfig(complete_backoff_initial_s=0.01, complete_backoff_max_s=0.02)


class FlakyCompleter:
    """Fails every call while ``down``; records what it accepted."""

    def __init__(self, *, fail_first: int = 0, error: Exception | None = None) -> None:
        self.fail_first = fail_first
        self.down = False
        self.error = error or QueueUnavailableError("connection refused")
        self.calls = 0
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.gate: asyncio.Event | None = None

    async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down or self.calls <= self.fail_first:
            raise self.error
        self.accepted.append((task_id, dict(result)))


def _task(task_id: str, level: int = 1, expire_in_s: float | None = 60.0) -> Task:
    now = int(time.time() * 1000)
    expire = 0 if expire_in_s is None else now + int(expire_in_s * 1000)
    return Task.model_validate(
        {
            "task_id": task_id,
            "endpoint": "/v1/chat/completions",
            "queue": "q",
            "level": level,
            "data": {},
            "response_mode": "callback",
            "start_time": now,
            "expire_time": expire,
        }
    )


async def _settled(outbox: Outbox) -> None:
    async def empty() -> bool:
        return outbox.entries == 0

    await wait_for(empty, timeout=10, interval=0.005, message="outbox empty")


async def test_a_failing_complete_is_retried_until_it_succeeds() -> None:
    completer = FlakyCompleter(fail_first=7)
    outbox = Outbox(completer, FAST)
    outbox.expect(_task("T1"))
    await outbox.complete("T1", {"status_code": 200, "request_id": "T1"})
    assert outbox.entries == 1  # complete() returned at once; delivery runs behind
    await _settled(outbox)
    assert completer.accepted == [("T1", {"status_code": 200, "request_id": "T1"})]
    assert outbox.counters.retries == 7
    assert outbox.counters.delivered == 1
    assert outbox.metrics.total("complete_retries") == 7
    assert outbox.bytes == 0


async def test_an_outage_longer_than_the_old_retry_budget_loses_nothing() -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST)
    for i in range(20):
        outbox.expect(_task(f"T{i}", level=i % 2))
        await outbox.complete(f"T{i}", {"status_code": 200})
    await asyncio.sleep(0.5)  # many backoff rounds (cap 20 ms), far past 6 attempts
    assert completer.calls > 20 * 6
    assert outbox.entries == 20
    assert outbox.stats()["outbox_entries"] == 20
    completer.down = False
    await _settled(outbox)
    assert sorted(t for t, _ in completer.accepted) == sorted(f"T{i}" for i in range(20))
    assert outbox.counters.expired == 0


async def test_success_after_failures_wakes_the_others() -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, DispatcherConfig(complete_backoff_initial_s=30))
    for i in range(3):
        await outbox.complete(f"T{i}", {"status_code": 200})
    await asyncio.sleep(0.05)
    completer.down = False
    await outbox.complete("T9", {"status_code": 200})  # its first attempt succeeds
    await _settled(outbox)  # the others did not wait out their 15-30 s backoff
    assert len(completer.accepted) == 4


async def test_an_answer_is_given_up_when_its_task_expired(
    caplog: pytest.LogCaptureFixture,
) -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST)
    outbox.expect(_task("T-EXP", level=0, expire_in_s=0.2))
    with caplog.at_level(logging.ERROR, logger="ray_worker.task.outbox"):
        await outbox.complete("T-EXP", {"status_code": 200})
        await _settled(outbox)
    assert completer.accepted == []
    assert outbox.counters.expired == 1
    assert outbox.metrics.total("complete_given_up", reason="expired") == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.task_id == "T-EXP"  # type: ignore[attr-defined]
    assert "level-0" in record.getMessage()


async def test_a_task_without_expire_time_retries_for_the_configured_max() -> None:
    completer = FlakyCompleter()
    completer.down = True
    config = FAST.model_copy(update={"complete_max_retry_s": 0.2})
    outbox = Outbox(completer, config)
    outbox.expect(_task("T0", expire_in_s=None))
    await outbox.complete("T0", {"status_code": 200})
    await asyncio.sleep(0.1)
    assert outbox.entries == 1
    await _settled(outbox)
    assert outbox.counters.expired == 1


async def test_a_permanent_refusal_is_not_retried() -> None:
    completer = FlakyCompleter(fail_first=1, error=BadRequestError("bad task id"))
    outbox = Outbox(completer, FAST)
    await outbox.complete("TASK-bad", {"status_code": 200})
    await _settled(outbox)
    assert completer.calls == 1
    assert outbox.counters.rejected == 1


async def test_the_byte_bound_holds_new_answers_back_until_there_is_room() -> None:
    completer = FlakyCompleter()
    completer.down = True
    config = FAST.model_copy(update={"outbox_max_bytes": 300, "outbox_max_entries": 100})
    outbox = Outbox(completer, config)
    big = {"status_code": 200, "body": {"text": "x" * 100}}
    await outbox.complete("A", big)
    await outbox.complete("B", big)
    assert outbox.bytes > 200
    waiting = asyncio.create_task(outbox.complete("C", big))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # backpressure: the answer waits, nothing is dropped
    assert outbox.entries == 2
    assert outbox.counters.backpressured == 1
    assert outbox.metrics.total("outbox_backpressure") == 1
    completer.down = False
    await asyncio.wait_for(waiting, 5)
    await _settled(outbox)
    assert sorted(t for t, _ in completer.accepted) == ["A", "B", "C"]


async def test_the_entry_bound_holds_new_answers_back() -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST.model_copy(update={"outbox_max_entries": 2}))
    await outbox.complete("A", {})
    await outbox.complete("B", {})
    waiting = asyncio.create_task(outbox.complete("C", {}))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    completer.down = False
    await asyncio.wait_for(waiting, 5)
    await _settled(outbox)
    assert len(completer.accepted) == 3


async def test_an_answer_larger_than_the_bound_still_goes_alone() -> None:
    completer = FlakyCompleter()
    outbox = Outbox(completer, FAST.model_copy(update={"outbox_max_bytes": 10}))
    await asyncio.wait_for(outbox.complete("BIG", {"body": "y" * 1000}), 1)
    await _settled(outbox)
    assert completer.accepted[0][0] == "BIG"


async def test_backpressure_ends_in_a_visible_give_up_when_the_task_expires() -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST.model_copy(update={"outbox_max_entries": 1}))
    outbox.expect(_task("A", expire_in_s=30))
    await outbox.complete("A", {})
    outbox.expect(_task("B", expire_in_s=0.1))
    with pytest.raises(QueueUnavailableError):
        await outbox.complete("B", {})
    assert outbox.counters.expired == 1


async def test_drain_delivers_what_it_can_within_its_time() -> None:
    completer = FlakyCompleter(fail_first=3)
    # A long backoff: the drain cuts it short (it caps the waits and wakes every answer).
    outbox = Outbox(completer, DispatcherConfig(complete_backoff_initial_s=5))
    await outbox.complete("T1", {"status_code": 200})
    await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await outbox.drain(10) == 0
    assert time.monotonic() - started < 8
    assert [t for t, _ in completer.accepted] == ["T1"]


async def test_drain_gives_up_visibly_what_it_could_not_deliver(
    caplog: pytest.LogCaptureFixture,
) -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST)
    outbox.expect(_task("L1", level=1))
    await outbox.complete("L1", {"status_code": 200})
    outbox.expect(_task("L0", level=0))
    await outbox.complete("L0", {"status_code": 200})
    with caplog.at_level(logging.ERROR, logger="ray_worker.task.outbox"):
        assert await outbox.drain(0.2) == 2
    assert outbox.counters.undelivered_at_stop == 2
    assert outbox.metrics.total("complete_given_up", reason="undelivered_at_stop") == 2
    messages = {r.task_id: r.getMessage() for r in caplog.records}  # type: ignore[attr-defined]
    assert "redelivers" in messages["L1"]
    assert "lost" in messages["L0"]
    # A complete after the stop does not wait for room forever: refused, counted.
    with pytest.raises(QueueUnavailableError):
        await outbox.complete("LATE", {})


async def test_a_second_answer_for_a_task_replaces_the_first() -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST)
    await outbox.complete("T", {"n": 1})
    await outbox.complete("T", {"n": 2})
    assert outbox.entries == 1
    completer.down = False
    await _settled(outbox)
    assert completer.accepted == [("T", {"n": 2})]


# -- who refused: a gateway in front of Bella-Queue, or Bella-Queue itself ------------------


def _gateway(status: int = 429, retry_after_s: float | None = None) -> QueueGatewayError:
    return QueueGatewayError(f"HTTP {status} from a gateway (<html>)", status, retry_after_s)


@pytest.mark.parametrize(
    "error",
    [
        _gateway(429),
        _gateway(403),
        _gateway(404),
        _gateway(302),
        AuthenticationError("HTTP 401"),
        QueueUnavailableError("Queue full", 503),
    ],
    ids=["429", "403", "404", "302", "401", "503"],
)
async def test_anything_but_bellas_own_refusal_is_retried(error: Exception) -> None:
    completer = FlakyCompleter(fail_first=3, error=error)
    outbox = Outbox(completer, FAST)
    outbox.expect(_task("T"))
    await outbox.complete("T", {"status_code": 200})
    await _settled(outbox)
    assert [t for t, _ in completer.accepted] == ["T"]
    assert outbox.counters.rejected == 0
    assert outbox.counters.retries == 3


async def test_failed_attempts_are_counted_by_cause() -> None:
    completer = FlakyCompleter()
    errors = iter(
        [_gateway(429), _gateway(429), AuthenticationError("401"), QueueUnavailableError("x")]
    )

    async def complete(task_id: str, result: Mapping[str, Any]) -> None:
        error = next(errors, None)
        if error is not None:
            raise error
        completer.accepted.append((task_id, dict(result)))

    completer.complete = complete  # type: ignore[method-assign]
    outbox = Outbox(completer, FAST)
    await outbox.complete("T", {})
    await _settled(outbox)
    assert outbox.counters.failed_attempts == {
        "gateway_429": 2,
        "unauthorized": 1,
        "unreachable": 1,
    }


async def test_bellas_own_4xx_is_given_up_at_once_whatever_its_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    completer = FlakyCompleter(error=BadRequestError("no such task", 404))
    completer.down = True
    outbox = Outbox(completer, FAST)
    with caplog.at_level(logging.ERROR, logger="ray_worker.task.outbox"):
        await outbox.complete("T", {})
        await _settled(outbox)
    assert completer.calls == 1
    assert outbox.counters.rejected == 1
    assert outbox.metrics.total("complete_given_up", reason="rejected") == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "rejected" in record.getMessage()
    assert "Bella-Queue refused it" in record.getMessage()


class _Pauses:
    """Records the waits the outbox decides on, without waiting."""

    def __init__(self) -> None:
        self.waits: list[tuple[float, float]] = []

    async def __call__(self, delay_s: float, floor_s: float) -> None:
        self.waits.append((delay_s, floor_s))
        await asyncio.sleep(0)


async def test_a_retry_waits_at_least_the_answers_retry_after() -> None:
    completer = FlakyCompleter(fail_first=2, error=_gateway(429, retry_after_s=1.5))
    outbox = Outbox(completer, FAST)  # its own backoff is 10-20 ms
    pauses = _Pauses()
    outbox._pause = pauses  # type: ignore[method-assign]
    outbox.expect(_task("T", expire_in_s=60))
    await outbox.complete("T", {})
    await _settled(outbox)
    assert [round(d, 6) for d, _ in pauses.waits] == [1.5, 1.5]
    assert [f for _, f in pauses.waits] == [1.5, 1.5]  # another's success does not cut it


async def test_retry_after_never_keeps_an_answer_past_its_deadline() -> None:
    completer = FlakyCompleter(error=_gateway(429, retry_after_s=3600))
    completer.down = True
    outbox = Outbox(completer, FAST)
    pauses = _Pauses()
    outbox._pause = pauses  # type: ignore[method-assign]
    outbox.expect(_task("T", expire_in_s=30))
    await outbox.complete("T", {})
    await wait_for(lambda: pauses.waits, 5, interval=0.005)
    delay_s, floor_s = pauses.waits[0]
    assert 25 < delay_s <= 30
    assert floor_s == delay_s


async def test_a_wake_up_does_not_cut_a_retry_after_short() -> None:
    outbox = Outbox(FlakyCompleter(), FAST)
    held = asyncio.create_task(outbox._pause(30, 30))
    plain = asyncio.create_task(outbox._pause(30, 0))
    await asyncio.sleep(0.01)
    outbox._wake_all()  # another answer got through
    await asyncio.wait_for(plain, 5)
    await asyncio.sleep(0.05)
    assert not held.done()
    held.cancel()


# -- hand-over ------------------------------------------------------------------------------


async def test_hand_over_returns_the_undelivered_answers_and_stops_delivering() -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST)
    tasks = [_task("A", level=1, expire_in_s=60), _task("B", level=0, expire_in_s=90)]
    for task in tasks:
        outbox.expect(task)
        await outbox.complete(task.task_id, {"status_code": 200, "request_id": task.task_id})
    await wait_for(lambda: completer.calls >= 4, 5, interval=0.005)

    handed = outbox.hand_over()

    assert [a["task_id"] for a in handed] == ["A", "B"]
    assert [a["level"] for a in handed] == [1, 0]
    assert [a["deadline"] for a in handed] == [t.expire_time / 1000 for t in tasks]
    assert handed[0]["result"] == {"status_code": 200, "request_id": "A"}
    assert all(a["attempts"] >= 1 for a in handed)
    assert pickle.loads(pickle.dumps(handed)) == handed
    assert outbox.entries == 0
    assert outbox.bytes == 0
    assert outbox.counters.handed_over == 2
    assert outbox.stats()["complete_handed_over"] == 2
    assert outbox.stats()["complete_given_up"] == 0
    calls = completer.calls
    completer.down = False
    await asyncio.sleep(0.1)  # many backoff rounds: nothing more is sent from here
    assert completer.calls == calls
    assert completer.accepted == []
    with pytest.raises(QueueUnavailableError):
        await outbox.complete("LATE", {})


async def test_adopted_answers_are_delivered_with_their_deadlines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = FlakyCompleter()
    first.down = True
    old = Outbox(first, FAST)
    old.expect(_task("A", level=1, expire_in_s=60))
    await old.complete("A", {"n": 1})
    await wait_for(lambda: first.calls >= 2, 5, interval=0.005)
    handed = old.hand_over()
    attempts = handed[0]["attempts"]
    # One whose task expired since it was handed over (from another replica, say).
    gone = {"task_id": "GONE", "result": {}, "deadline": time.time() - 1, "level": 0}

    second = FlakyCompleter(fail_first=1)
    new = Outbox(second, FAST)
    with caplog.at_level(logging.INFO, logger="ray_worker.task.outbox"):
        assert new.adopt([*pickle.loads(pickle.dumps(handed)), gone]) == 2
        await _settled(new)
    assert second.accepted == [("A", {"n": 1})]
    assert new.counters.adopted == 2
    assert new.counters.expired == 1  # GONE: past its deadline, given up, logged
    assert new.stats()["complete_adopted"] == 2
    assert new.counters.delivered == 1
    # The attempts carried over count on: one failed here, the next one went through.
    assert f"delivered after {attempts + 2} attempts" in caplog.text


async def test_an_adopted_answer_replaces_one_waiting_for_the_same_task() -> None:
    completer = FlakyCompleter()
    completer.down = True
    outbox = Outbox(completer, FAST)
    await outbox.complete("T", {"n": 1})
    deadline = time.time() + 60
    outbox.adopt([{"task_id": "T", "result": {"n": 2}, "deadline": deadline, "level": 1}])
    assert outbox.entries == 1
    completer.down = False
    await _settled(outbox)
    assert completer.accepted == [("T", {"n": 2})]


async def test_adopt_refuses_when_closed_or_malformed_taking_none() -> None:
    outbox = Outbox(FlakyCompleter(), FAST)
    good = {"task_id": "T", "result": {}, "deadline": time.time() + 60, "level": 1}
    with pytest.raises(ValueError, match="handed-over answer"):
        outbox.adopt([good, {"task_id": "U", "result": {}}])  # no deadline
    with pytest.raises(ValueError, match="handed-over answer"):
        outbox.adopt([{**good, "result": "not a mapping"}])
    assert outbox.entries == 0
    assert outbox.hand_over() == []
    with pytest.raises(QueueUnavailableError):
        outbox.adopt([good])
    assert outbox.counters.adopted == 0
