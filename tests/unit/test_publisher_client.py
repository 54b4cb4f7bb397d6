"""EventBatcher: caller-side coalescing of event-bus entries, with a fake ``send``; and
``EventBusClient`` around a fake publisher actor (deaths, resends, confirmation deadlines)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from ray.exceptions import RayActorError

from ray_worker.bella.clock import ServerClock
from ray_worker.bella.protocol import (
    COMPLETION_EVENT,
    PROGRESS_EVENT,
    CompletionEvent,
    ProgressEvent,
    decode_event,
)
from ray_worker.errors import EventBusUnavailableError
from ray_worker.eventbus import client as client_module
from ray_worker.eventbus.batching import EventBatcher
from ray_worker.eventbus.client import EventBusClient
from ray_worker.eventbus.shared import Batch, Entry
from tests.unit.fakes import settle, until


class FakeSend:
    """Records batches; can hold calls on a gate and fail a number of times."""

    def __init__(self, *, fail_times: int = 0, always_fail: bool = False) -> None:
        self.batches: list[Batch] = []
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_times = fail_times
        self.always_fail = always_fail
        self.jitter = False

    async def __call__(self, batch: Batch) -> None:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if self.jitter:
                await settle(random.randint(0, 3))
            if self.always_fail or self.fail_times > 0:
                self.fail_times -= 1
                raise ConnectionError("replica unavailable")
            self.batches.append(list(batch))
        finally:
            self.in_flight -= 1

    @property
    def entries(self) -> Batch:
        return [entry for batch in self.batches for entry in batch]


def entry(i: int) -> Entry:
    return ("stream", {"n": str(i)}, "", "")


async def test_first_event_is_sent_at_once() -> None:
    send = FakeSend()
    client = EventBatcher(send)
    await client.emit(*entry(0))
    await until(lambda: len(send.batches) == 1)
    assert send.batches == [[entry(0)]]
    await client.flush()


async def test_events_coalesce_while_a_send_is_in_flight() -> None:
    send = FakeSend()
    send.gate.clear()
    client = EventBatcher(send)
    await client.emit(*entry(0))
    await until(lambda: send.calls == 1)
    for i in range(1, 50):
        await client.emit(*entry(i))
    await settle()
    assert send.calls == 1, "no second send while one is in flight"
    send.gate.set()
    await client.flush()
    assert send.batches == [[entry(0)], [entry(i) for i in range(1, 50)]]
    assert send.max_in_flight == 1
    stats = client.stats()
    assert stats["sent_batches"] == 2
    assert stats["sent_events"] == 50
    assert stats["largest_batch"] == 49


async def test_per_task_order_across_many_concurrent_tasks() -> None:
    send = FakeSend()
    send.jitter = True
    client = EventBatcher(send, topic="t:")
    tasks, events = 40, 60

    async def stream(task: int) -> None:
        for i in range(events):
            await client.progress("inst", f"task-{task}", str(i), "message", {"i": i})
            if random.random() < 0.3:
                await asyncio.sleep(0)
        await client.completion("inst", f"task-{task}", {"status_code": 200})

    await asyncio.gather(*(stream(t) for t in range(tasks)))
    await client.flush()
    assert send.max_in_flight == 1
    seen: dict[str, list[str]] = {}
    for key, fields, *_ in send.entries:
        assert key == "t:inst"
        event = decode_event(fields)
        assert event is not None
        label = event.event_id if isinstance(event, ProgressEvent) else "done"
        seen.setdefault(event.task_id, []).append(label or "")
    expected = [str(i) for i in range(events)] + ["done"]
    assert seen == {f"task-{t}": expected for t in range(tasks)}
    assert len(send.batches) < tasks * (events + 1), "events were coalesced"


async def test_pending_is_bounded_and_emit_waits() -> None:
    send = FakeSend()
    send.gate.clear()
    client = EventBatcher(send, max_pending=5)
    await client.emit(*entry(0))
    await until(lambda: send.calls == 1)
    for i in range(1, 6):
        await client.emit(*entry(i))
    blocked = asyncio.create_task(client.emit(*entry(6)))
    await settle()
    assert not blocked.done(), "emit waits while max_pending entries are waiting"
    assert client.stats()["pending"] == 5
    send.gate.set()
    await asyncio.wait_for(blocked, 5)
    await client.flush()
    assert send.entries == [entry(i) for i in range(7)]


async def test_transient_send_failures_are_retried_in_order() -> None:
    send = FakeSend(fail_times=2)
    client = EventBatcher(send, backoff_initial_s=0.001, backoff_max_s=0.002)
    for i in range(3):
        await client.emit(*entry(i))
    await client.completion("inst", "task-1", {"status_code": 200})
    assert [fields.get("n") for _, fields, *_ in send.entries[:3]] == ["0", "1", "2"]
    assert isinstance(decode_event(send.entries[-1][1]), CompletionEvent)
    assert client.stats()["send_retries"] == 2
    assert client.stats()["failed_batches"] == 0


async def test_persistent_send_failure_is_surfaced_to_completion_and_flush() -> None:
    send = FakeSend(always_fail=True)
    client = EventBatcher(send, send_timeout_s=0.05, backoff_initial_s=0.005, backoff_max_s=0.01)
    await client.progress("inst", "task-1", "0", "message", "hello")
    with pytest.raises(EventBusUnavailableError, match="replica unavailable"):
        await client.completion("inst", "task-1", {"status_code": 200})
    await client.emit(*entry(1))
    with pytest.raises(EventBusUnavailableError):
        await client.flush()
    stats = client.stats()
    assert stats["failed_batches"] >= 2
    assert stats["failed_events"] == 3
    assert "replica unavailable" in (stats["last_error"] or "")
    # The client keeps working once the publisher is back.
    send.always_fail = False
    await client.completion("inst", "task-2", {"status_code": 200})
    assert len(send.entries) == 1


async def test_flush_waits_for_in_flight_and_pending() -> None:
    send = FakeSend()
    send.gate.clear()
    client = EventBatcher(send)
    await client.emit(*entry(0))
    await until(lambda: send.calls == 1)
    await client.emit(*entry(1))
    flushing = asyncio.create_task(client.flush())
    await settle()
    assert not flushing.done()
    send.gate.set()
    await asyncio.wait_for(flushing, 5)
    assert send.entries == [entry(0), entry(1)]
    await client.flush()  # nothing pending: returns at once


async def test_helpers_encode_exact_fields() -> None:
    send = FakeSend()
    client = EventBatcher(send, topic="redis-mesh:private-stream:test:")
    await client.progress("10.0.0.5:8080", "TASK-1", "0", "message", {"x": 1})
    await client.completion("10.0.0.5:8080", "TASK-1", {"status_code": 200, "request_id": "r"})
    (k1, progress, t1, e1), (k2, completion, t2, e2) = send.entries
    assert k1 == k2 == "redis-mesh:private-stream:test:10.0.0.5:8080"
    # Each entry carries its task and event ids beside the fields (the writer reads no JSON).
    assert (t1, e1, t2, e2) == ("TASK-1", "0", "TASK-1", "")
    assert set(progress) == set(completion) == {"name", "from", "payload", "context", "timestamp"}
    decoded = decode_event(progress)
    assert isinstance(decoded, ProgressEvent)
    assert (decoded.task_id, decoded.event_id, decoded.event_data) == ("TASK-1", "0", {"x": 1})
    done = decode_event(completion)
    assert isinstance(done, CompletionEvent)
    assert done.result == {"status_code": 200, "request_id": "r"}


async def test_closed_client_refuses_events() -> None:
    client = EventBatcher(FakeSend())
    await client.emit(*entry(0))
    await client.aclose()
    with pytest.raises(EventBusUnavailableError):
        await client.emit(*entry(1))


async def test_send_seq_numbers_batches_and_keeps_the_number_on_retry() -> None:
    send = FakeSend(fail_times=2)
    seen: list[tuple[int, int]] = []

    async def send_seq(seq: int, batch: Batch) -> None:
        seen.append((seq, len(batch)))
        await send(batch)

    client = EventBatcher(send_seq=send_seq, backoff_initial_s=0.001, backoff_max_s=0.002)
    await client.emit(*entry(0))
    await client.flush()
    await client.emit(*entry(1))
    await client.flush()
    assert [seq for seq, _ in seen] == [1, 1, 1, 2], "a retried batch keeps its number"
    assert send.entries == [entry(0), entry(1)]


def test_exactly_one_send_function() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        EventBatcher()
    with pytest.raises(ValueError, match="exactly one"):
        EventBatcher(FakeSend(), send_seq=FakeSend())  # type: ignore[arg-type]


async def test_interval_gathers_events_but_first_chunks_and_completions_leave_at_once() -> None:
    send = FakeSend()
    # An interval no test run reaches: whatever leaves early left because it was urgent.
    client = EventBatcher(send, topic="t:", min_interval_s=3600)
    await client.progress("i", "A", "0", "message", {"n": 0})
    await until(lambda: len(send.batches) == 1)
    for n in range(1, 6):
        await client.progress("i", "A", str(n), "message", {"n": n})
    await settle()
    assert len(send.batches) == 1, "later chunks wait for the interval"
    await client.progress("i", "B", "0", "message", {"n": 0})  # another stream's first chunk
    await until(lambda: len(send.batches) == 2)
    assert [json.loads(f["payload"])["eventId"] for _, f, *_ in send.batches[1]] == [
        "1",
        "2",
        "3",
        "4",
        "5",
        "0",
    ]
    await client.progress("i", "A", "6", "message", {"n": 6})
    await asyncio.wait_for(client.completion("i", "A", {"status_code": 200}), 5)
    assert len(send.batches) == 3
    assert [f["name"] for _, f, *_ in send.batches[2]] == [PROGRESS_EVENT, COMPLETION_EVENT]
    await client.progress("i", "B", "1", "message", {"n": 1})
    await asyncio.wait_for(client.flush(), 5)  # flush does not wait for the interval either
    assert len(send.batches) == 4


# ------------------------------------------------------------------ EventBusClient
# A fake publisher actor: handle.method.remote(...) is awaitable like a Ray ObjectRef.


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


class FakeActor:
    """Buffers nothing: a batch it accepts is "written" at once, unless ``hold``. ``dead``
    makes every call raise ``RayActorError`` (what a SIGKILLed actor's callers see).

    With ``marks`` its publish and lease replies carry the client's written mark (the last
    batch seq written, as ``RedisPublisher`` does); without, it answers like an actor of a
    version without marks. ``write()`` writes what ``hold`` kept back; completions of tasks
    in ``silent`` are written but never reported by ``delivery`` (the reply was lost)."""

    def __init__(self, *, marks: bool = False, tagged: bool = True) -> None:
        self.dead = False
        self.tagged = tagged
        self.hold = False
        self.marks = marks
        self.silent: set[str] = set()
        self.entries: Batch = []
        self.fates: dict[str, bool] = {}
        self.leases: list[tuple[Any, ...]] = []
        self.accepted = 0
        self.written = 0
        self.held: list[Batch] = []
        for name in ("publish", "lease", "delivery", "release", "check_health", "target"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    def _check(self) -> None:
        if self.dead:
            raise RayActorError()

    async def _publish(self, _session: str, seq: int, batch: Batch) -> Any:
        self._check()
        self.entries.extend(batch)
        self.accepted = seq
        self.held.append(batch)
        if not self.hold:
            self.write()
        return ("ok", self.written) if self.marks else "ok"

    def write(self) -> None:
        """Redis acknowledges everything accepted so far."""
        for batch in self.held:
            for _key, fields, *_ in batch:
                task_id = json.loads(fields["payload"])["taskId"]
                if fields["name"] == COMPLETION_EVENT and task_id not in self.silent:
                    self.fates[task_id] = True
        self.held.clear()
        self.written = self.accepted

    async def _lease(self, *args: Any) -> Any:
        self._check()
        self.leases.append(args)
        return (True, self.written) if self.marks else True

    async def _delivery(self, task_ids: list[str], wait_s: float) -> dict[str, bool]:
        self._check()
        await asyncio.sleep(min(wait_s, 0.01))
        self._check()
        return {t: self.fates.pop(t) for t in task_ids if t in self.fates}

    async def _release(self, _session: str) -> None:
        self._check()

    async def _target(self) -> dict[str, Any]:
        self._check()
        out: dict[str, Any] = {"url": "redis://x", "topic": "t:", "exiting": False}
        if self.tagged:
            out["tagged_entries"] = True
        return out

    async def _check_health(self) -> None:
        self._check()

    def events(self, task_id: str) -> list[Any]:
        out = []
        for _key, fields, *_ in self.entries:
            event = decode_event(fields)
            if event is not None and event.task_id == task_id:
                out.append(event)
        return out


@pytest.fixture
def actors(monkeypatch: pytest.MonkeyPatch) -> list[FakeActor]:
    """The node's publishers, in the order ``node_publisher`` hands them out (a fresh one
    each time the previous died)."""
    made: list[FakeActor] = []

    def node_publisher(*_args: Any, **_kw: Any) -> FakeActor:
        if not made or made[-1].dead:
            made.append(FakeActor(marks=made[0].marks if made else False))
        return made[-1]

    monkeypatch.setattr(client_module, "node_publisher", node_publisher)
    return made


def labels_of(events: list[Any]) -> list[str]:
    return [
        str(e.event_id) if isinstance(e, ProgressEvent) else f"done:{e.result['status_code']}"
        for e in events
    ]


async def test_a_dead_publishers_streams_end_in_an_error_and_its_blocking_answers_are_resent(
    actors: list[FakeActor],
) -> None:
    client = EventBusClient("app", "replica", call_timeout_s=1.0, confirm_timeout_s=30)
    await client.start("redis://x", "t:")
    first = actors[0]
    first.hold = True  # accepted, never written: lost with the actor
    for i in range(3):
        await client.progress("inst", "STREAM", str(i), "message", {"i": i})
    await client.flush()
    blocking = asyncio.create_task(
        client.completion("inst", "BLOCK", {"status_code": 200, "request_id": "BLOCK"})
    )
    await until(lambda: any(f["name"] == COMPLETION_EVENT for _, f, *_ in first.entries))
    first.dead = True  # SIGKILL: what it held is gone

    # The stream goes on (its next events reveal the death), then finishes with [DONE].
    await client.progress("inst", "STREAM", "3", "message", {"i": 3})
    await client.progress("inst", "STREAM", "4", "message", "[DONE]")
    await asyncio.wait_for(
        client.completion("inst", "STREAM", {"status_code": 200, "request_id": "STREAM"}), 10
    )
    await asyncio.wait_for(blocking, 10)
    (_, second) = actors
    # The stream may have lost 0..2: an error chunk after its last event and a 503, no [DONE].
    stream = second.events("STREAM")
    assert labels_of(stream) == ["5", "done:503"]
    assert stream[0].event_data["error"]["code"] == "events_lost"
    # The blocking answer the dead actor held is sent again, unchanged.
    assert labels_of(second.events("BLOCK")) == ["done:200"]

    # A stream that starts on the new publisher is not affected.
    for i in range(2):
        await client.progress("inst", "AFTER", str(i), "message", {"i": i})
    await client.completion("inst", "AFTER", {"status_code": 200, "request_id": "AFTER"})
    assert labels_of(second.events("AFTER")) == ["0", "1", "done:200"]
    stats = client.stats()
    assert (stats["reattached"], stats["events_lost"], stats["completions_resent"]) == (1, 1, 1)
    assert stats["open_tasks"] == 0
    await client.aclose()


async def test_a_stream_written_before_the_death_ends_normally(actors: list[FakeActor]) -> None:
    """A stream whose completion was acknowledged before the actor died is left alone."""
    client = EventBusClient("app", "replica", call_timeout_s=1.0)
    await client.start("redis://x", "t:")
    await client.progress("inst", "DONE", "0", "message", {"i": 0})
    await client.completion("inst", "DONE", {"status_code": 200, "request_id": "DONE"})
    actors[0].dead = True
    # A blocking answer finds the publisher dead (it may have taken the batch as it died:
    # unknown, so it is sent again, once); a stream started afterwards is whole.
    await client.completion("inst", "BLOCK", {"status_code": 200, "request_id": "BLOCK"})
    await client.progress("inst", "NEXT", "0", "message", {"i": 0})
    await client.completion("inst", "NEXT", {"status_code": 200, "request_id": "NEXT"})
    assert labels_of(actors[0].events("DONE")) == ["0", "done:200"]
    assert labels_of(actors[1].events("BLOCK")) == ["done:200"]
    assert labels_of(actors[1].events("NEXT")) == ["0", "done:200"]
    assert actors[1].events("DONE") == []
    assert client.stats()["events_lost"] == 0
    await client.aclose()


async def test_every_confirmation_has_a_deadline(actors: list[FakeActor]) -> None:
    client = EventBusClient("app", "replica", call_timeout_s=1.0, confirm_timeout_s=0.3)
    await client.start("redis://x", "t:")
    actors[0].hold = True  # Redis never acknowledges, and the publisher never gives up
    with pytest.raises(EventBusUnavailableError, match="no acknowledgement"):
        await asyncio.wait_for(
            client.completion("inst", "T", {"status_code": 200, "request_id": "T"}), 10
        )
    assert client.stats()["confirm_timeouts"] == 1
    await client.aclose()


async def test_leases_carry_the_servers_clock_offset(actors: list[FakeActor]) -> None:
    clock = ServerClock()
    clock.offset_ms = 90_000
    client = EventBusClient("app", "replica", clock=clock)
    await client.start("redis://x", "t:")
    assert actors[0].leases[-1][2] == 90_000
    await client.aclose()


async def test_a_health_check_replaces_a_dead_publisher_instead_of_failing(
    actors: list[FakeActor],
) -> None:
    client = EventBusClient("app", "poller", call_timeout_s=1.0)
    await client.start("redis://x", "t:")
    await client.check_health()
    actors[0].dead = True
    await client.check_health()  # the replica stays healthy: a new publisher took over
    assert len(actors) == 2
    assert client.actor is actors[1]
    await client.aclose()


async def test_entries_go_tagged_to_a_current_publisher_and_bare_to_an_older_one(
    actors: list[FakeActor],
) -> None:
    """Tagged entries (task and event ids beside the fields) only go to an actor whose
    ``target()`` says it takes them; a detached actor of the previous version, still alive
    across a redeploy, gets the bare ``(key, fields)`` pairs it understands."""
    actors.append(FakeActor(tagged=False))
    client = EventBusClient("app", "replica", call_timeout_s=1.0)
    await client.start("redis://x", "t:")
    await client.progress("inst", "OLD", "0", "message", {"i": 0})
    await client.completion("inst", "OLD", {"status_code": 200, "request_id": "OLD"})
    assert [len(e) for e in actors[0].entries] == [2, 2]
    actors[0].dead = True
    await client.check_health()  # a current publisher replaces it
    await client.progress("inst", "NEW", "0", "message", {"i": 0})
    await client.completion("inst", "NEW", {"status_code": 200, "request_id": "NEW"})
    assert [e[2:] for e in actors[1].entries] == [("NEW", "0"), ("NEW", "")]
    assert labels_of(actors[1].events("NEW")) == ["0", "done:200"]
    await client.aclose()


@pytest.fixture
def marked(actors: list[FakeActor]) -> list[FakeActor]:
    """``actors`` whose replies carry written marks (today's ``RedisPublisher``)."""
    actors.append(FakeActor(marks=True))
    return actors


async def test_after_a_publishers_death_only_tasks_with_unwritten_events_lose_them(
    marked: list[FakeActor],
) -> None:
    client = EventBusClient("app", "replica", call_timeout_s=1.0, confirm_timeout_s=30)
    await client.start("redis://x", "t:")
    first = marked[0]
    # Written before the death: a stream's first events, and a blocking completion whose
    # acknowledgement the client has not heard of yet.
    first.silent.add("WRITTEN")
    for i in range(3):
        await client.progress("inst", "KEPT", str(i), "message", {"i": i})
    await client.flush()
    written = asyncio.create_task(
        client.completion("inst", "WRITTEN", {"status_code": 200, "request_id": "WRITTEN"})
    )
    await until(
        lambda: (
            bool(first.events("WRITTEN"))
            and first.written == first.accepted == client.stats()["sent_batches"]
        )
    )
    # Accepted but never written: another stream's events and a blocking completion.
    first.hold = True
    for i in range(2):
        await client.progress("inst", "CUT", str(i), "message", {"i": i})
    await client.flush()
    held = asyncio.create_task(
        client.completion("inst", "HELD", {"status_code": 200, "request_id": "HELD"})
    )
    await until(lambda: any(f["name"] == COMPLETION_EVENT for _, f, *_ in first.held[-1]))
    first.dead = True
    # The confirmations it still owes reveal the death (a batch in flight to a dying
    # publisher may or may not have been applied: its tasks count as lost).
    await until(lambda: client.stats()["reattached"] == 1)

    # Both streams go on.
    for task_id, n in (("KEPT", 3), ("CUT", 2)):
        await client.progress("inst", task_id, str(n), "message", {"i": n})
        await client.progress("inst", task_id, str(n + 1), "message", "[DONE]")
        await asyncio.wait_for(
            client.completion("inst", task_id, {"status_code": 200, "request_id": task_id}), 10
        )
    await asyncio.wait_for(asyncio.gather(written, held), 10)
    (_, second) = marked
    # Gapless: its events before the death are in Redis, the rest went to the new publisher.
    assert labels_of(first.events("KEPT")) == ["0", "1", "2"]
    assert labels_of(second.events("KEPT")) == ["3", "4", "done:200"]
    # Its events may be lost with the dead publisher: an error chunk and a 503, once.
    cut = second.events("CUT")
    assert labels_of(cut) == ["2", "done:503"]
    assert cut[0].event_data["error"]["code"] == "events_lost"
    # A completion at or below the mark was written: not sent again; one above it is.
    assert second.events("WRITTEN") == []
    assert labels_of(second.events("HELD")) == ["done:200"]
    stats = client.stats()
    assert stats["reattached"] == 1
    assert stats["events_lost"] == 1
    assert stats["streams_kept"] == 1
    assert (stats["completions_written"], stats["completions_resent"]) == (1, 1)
    assert stats["open_tasks"] == stats["unconfirmed"] == 0
    await client.aclose()


async def test_the_written_mark_comes_with_lease_renewals_while_a_stream_is_idle(
    marked: list[FakeActor],
) -> None:
    """A stream pausing (a long reasoning step) sends nothing: the renewals carry the mark."""
    client = EventBusClient("app", "replica", call_timeout_s=1.0, lease_ttl_s=0.06)
    await client.start("redis://x", "t:")
    first = marked[0]
    first.hold = True  # buffered when publish answers, written only later
    for i in range(3):
        await client.progress("inst", "IDLE", str(i), "message", {"i": i})
    await client.flush()
    first.write()
    renewals = len(first.leases)
    await until(lambda: len(first.leases) >= renewals + 2)
    first.dead = True
    await client.check_health()  # replaces the dead publisher
    await client.progress("inst", "IDLE", "3", "message", "[DONE]")
    await asyncio.wait_for(
        client.completion("inst", "IDLE", {"status_code": 200, "request_id": "IDLE"}), 10
    )
    assert labels_of(marked[1].events("IDLE")) == ["3", "done:200"]
    assert (client.stats()["events_lost"], client.stats()["streams_kept"]) == (0, 1)
    await client.aclose()


async def test_an_error_answer_lost_with_a_second_publisher_is_sent_again(
    marked: list[FakeActor],
) -> None:
    client = EventBusClient("app", "replica", call_timeout_s=1.0, confirm_timeout_s=30)
    await client.start("redis://x", "t:")
    marked[0].hold = True
    await client.progress("inst", "S", "0", "message", {"i": 0})
    await client.flush()
    marked[0].dead = True
    await client.check_health()  # re-attach: S ends in an error answer, sent to the second
    second = marked[1]
    second.hold = True
    await client.flush()
    assert labels_of(second.events("S")) == ["1", "done:503"]
    second.dead = True
    await client.progress("inst", "S", "1", "message", "[DONE]")  # dropped: S was ended
    await asyncio.wait_for(
        client.completion("inst", "S", {"status_code": 200, "request_id": "S"}), 10
    )
    assert labels_of(marked[2].events("S")) == ["1", "done:503"], "the same answer, once more"
    stats = client.stats()
    assert (stats["events_lost"], stats["lost_answers_resent"]) == (1, 1)
    await client.aclose()
