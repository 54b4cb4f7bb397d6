"""Dispatcher: every task runs once and is answered exactly once, on the path its mode demands.

Fakes stand in for the engines, the event bus and Bella-Queue's HTTP complete (``fakes.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes import (
    Delay,
    FakeCompleter,
    FakeEngines,
    FakeEventSink,
    Recorded,
    level_of,
    make_task,
    settle,
    until,
)

from ray_worker.bella.protocol import STREAM_DONE, Level, ResponseMode, Task
from ray_worker.config import CapacityConfig, DispatcherConfig, QueueSpec
from ray_worker.errors import (
    EngineError,
    EngineOverloadedError,
    InvalidTaskError,
    QueueUnavailableError,
    ReplicaUnavailableError,
)
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher

STREAMING = ResponseMode.STREAMING
BLOCKING = ResponseMode.BLOCKING
CALLBACK = ResponseMode.CALLBACK
BATCH = ResponseMode.BATCH

CHUNKS = [{"id": "c", "choices": [{"delta": {"content": t}}]} for t in ("Hel", "lo", "!")]
RESPONSE = {"id": "r", "object": "chat.completion", "usage": {"total_tokens": 3}}


class Rig:
    """A dispatcher wired to fakes, with a capacity tracker that has room."""

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("m",),
        queues: list[QueueSpec] | None = None,
        events: FakeEventSink | None = None,
        completer: FakeCompleter | None = None,
        **config: Any,
    ) -> None:
        settings: dict[str, Any] = {
            "overload_retry_initial_s": 0.001,
            "overload_retry_max_s": 0.004,
            "max_replica_retries": 2,
            **config,
        }
        self.engines = FakeEngines(default=[RESPONSE])
        self.events = events or FakeEventSink()
        self.completer = completer or FakeCompleter()
        self.capacity = CapacityTracker(CapacityConfig(), list(models))
        for model in models:
            self.capacity.report(
                {"replica_id": f"r-{model}", "model_id": model, "max_num_seqs": 64}
            )
        self.dispatcher = Dispatcher(
            engines=self.engines,
            events=self.events,
            completer=self.completer,
            capacity=self.capacity,
            queues=queues or [],
            served_models=list(models),
            config=DispatcherConfig(**settings),
        )
        self.pool = models[0]

    def submit(self, task: Task, pool: str | None = None) -> bool:
        """Count the task against capacity, as the poller does, and submit it."""
        pool = pool or self.pool
        self.capacity.acquire(pool, level_of(task))
        accepted = self.dispatcher.submit(task, pool)
        if not accepted:
            self.capacity.release(pool, level_of(task))
        return accepted

    async def run(self, task: Task, pool: str | None = None) -> None:
        """Submit and wait until the task is answered."""
        assert self.submit(task, pool)
        await until(lambda: not self.dispatcher.holds(task.task_id))

    async def idle(self) -> None:
        await until(lambda: self.dispatcher.in_flight == 0)

    def answers(self, task: Task) -> list[dict[str, Any]]:
        """Every answer the task got: completion events plus HTTP completes."""
        return self.events.completions_of(task.task_id) + self.completer.of(task.task_id)

    def only_answer(self, task: Task) -> dict[str, Any]:
        answers = self.answers(task)
        assert len(answers) == 1, answers
        return answers[0]

    def in_flight(self) -> int:
        return self.capacity.model(self.pool).total_in_flight

    def completed(self, **tags: str) -> float:
        return self.dispatcher.metrics.total("tasks_completed", **tags)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.dispatcher.drain(0)


def progress_data(events: list[Recorded]) -> list[Any]:
    return [e.data for e in events if e.kind == "progress"]


def error_code(answer: dict[str, Any]) -> Any:
    return answer["body"]["error"]["code"]


# -- response modes --------------------------------------------------------------------------


async def test_streaming_sends_chunks_done_then_completion(rig: Rig) -> None:
    rig.engines.script(*CHUNKS)
    task = make_task(STREAMING, model="m", data={"messages": [], "stream": False})
    await rig.run(task)

    events = rig.events.for_task(task.task_id)
    assert [(e.kind, e.event_id, e.event_name) for e in events] == [
        ("progress", "0", "message"),
        ("progress", "1", "message"),
        ("progress", "2", "message"),
        ("progress", "3", "message"),
        ("completion", None, None),
    ]
    assert progress_data(events) == [*CHUNKS, STREAM_DONE]
    assert all(e.instance_id == task.instance_id for e in events)
    assert events[-1].data == {"status_code": 200, "request_id": task.task_id}
    assert rig.completer.completes == []

    (call,) = rig.engines.calls
    assert call.data["stream"] is True  # forced on for streaming mode
    assert call.data["stream_options"] == {"include_usage": True}
    assert call.data["model"] == "m"
    assert call.request_id == task.task_id


async def test_streaming_keeps_the_callers_stream_options(rig: Rig) -> None:
    rig.engines.script(*CHUNKS)
    task = make_task(STREAMING, data={"stream_options": {"include_usage": False}})
    await rig.run(task)
    assert rig.engines.calls[0].data["stream_options"] == {"include_usage": False}


async def test_blocking_sends_one_completion_with_the_body(rig: Rig) -> None:
    task = make_task(
        BLOCKING, data={"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    )
    await rig.run(task)

    assert rig.events.for_task(task.task_id) == [
        Recorded(
            "completion",
            task.task_id,
            task.instance_id,
            data={"status_code": 200, "request_id": task.task_id, "body": RESPONSE},
        )
    ]
    assert rig.completer.completes == []
    data = rig.engines.calls[0].data
    assert data["stream"] is False  # forced off: blocking needs one whole response
    assert "stream_options" not in data


@pytest.mark.parametrize(
    ("mode", "level"), [(CALLBACK, 0), (CALLBACK, 1), (BATCH, 1)], ids=["cb-0", "cb-1", "batch"]
)
async def test_callback_and_batch_complete_over_http(
    rig: Rig, mode: ResponseMode, level: int
) -> None:
    task = make_task(mode, level=level, data={"messages": [], "stream": True})
    await rig.run(task)

    assert rig.completer.completes == [
        Recorded(
            "complete",
            task.task_id,
            data={"status_code": 200, "request_id": task.task_id, "body": RESPONSE},
        )
    ]
    assert rig.events.events == []  # never events, even with an instance_id (level 0)
    assert rig.engines.calls[0].data["stream"] is False


@pytest.mark.parametrize("mode", [CALLBACK, BLOCKING])
async def test_streaming_flag_is_forced_off_in_non_streaming_modes(
    rig: Rig, mode: ResponseMode
) -> None:
    await rig.run(make_task(mode, data={"prompt": "x", "stream": True}, endpoint="/v1/completions"))
    assert rig.engines.calls[0].data["stream"] is False
    assert rig.engines.calls[0].endpoint == "/v1/completions"


async def test_embeddings_are_not_given_a_stream_flag(rig: Rig) -> None:
    rig.engines.script({"object": "list", "data": []})
    task = make_task(CALLBACK, endpoint="/v1/embeddings", data={"input": "x"})
    await rig.run(task)
    assert "stream" not in rig.engines.calls[0].data
    assert rig.only_answer(task)["body"] == {"object": "list", "data": []}


async def test_missing_endpoint_means_chat(rig: Rig) -> None:
    task = make_task(CALLBACK, endpoint="")
    await rig.run(task)
    assert rig.engines.calls[0].endpoint == "/v1/chat/completions"
    assert rig.only_answer(task)["status_code"] == 200


async def test_priority_follows_the_level(rig: Rig) -> None:
    await rig.run(make_task(BLOCKING))
    await rig.run(make_task(CALLBACK, level=0))
    await rig.run(make_task(CALLBACK, level=1))
    await rig.run(make_task(BATCH, level=1))
    assert rig.engines.priorities == [0, 0, 1, 1]


async def test_tasks_run_concurrently(rig: Rig) -> None:
    gate = asyncio.Event()
    for _ in range(3):
        rig.engines.script(gate, RESPONSE)
    tasks = [make_task(CALLBACK) for _ in range(3)]
    for task in tasks:
        assert rig.submit(task)
    await until(lambda: rig.engines.active == 3)
    assert rig.dispatcher.in_flight == 3
    assert all(rig.dispatcher.holds(t.task_id) for t in tasks)
    gate.set()
    await rig.idle()
    assert len(rig.completer.completes) == 3


# -- model routing ---------------------------------------------------------------------------


async def test_served_model_is_routed_to() -> None:
    rig = Rig(models=("a", "b"))
    task = make_task(CALLBACK, model="b")
    await rig.run(task, pool="a")
    assert rig.engines.calls[0].model_id == "b"
    assert rig.engines.calls[0].data["model"] == "b"
    assert rig.only_answer(task)["status_code"] == 200


async def test_unknown_model_is_404_without_an_engine_call(rig: Rig) -> None:
    task = make_task(BLOCKING, model="gpt-9")
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 404
    assert answer["body"]["error"]["code"] == "model_not_found"
    assert answer["body"]["error"]["param"] == "model"
    assert answer["body"]["error"]["type"] == "invalid_request_error"
    assert "gpt-9" in answer["body"]["error"]["message"]
    assert rig.engines.calls == []


async def test_missing_model_uses_the_queue_default() -> None:
    rig = Rig(models=("a", "b"), queues=[QueueSpec(name="q:1", model="b")])
    task = make_task(CALLBACK, queue="q", level=1)
    await rig.run(task, pool="b")
    assert rig.engines.calls[0].model_id == "b"
    assert rig.engines.calls[0].data["model"] == "b"


async def test_missing_model_uses_the_sole_served_model(rig: Rig) -> None:
    task = make_task(CALLBACK)
    assert "model" not in task.data
    await rig.run(task)
    assert rig.engines.calls[0].model_id == "m"


async def test_missing_model_with_several_served_is_400() -> None:
    rig = Rig(models=("a", "b"))
    task = make_task(CALLBACK)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 400
    assert answer["body"]["error"]["param"] == "model"
    assert rig.engines.calls == []


async def test_non_string_model_is_400(rig: Rig) -> None:
    task = make_task(CALLBACK, data={"model": 7})
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 400


async def test_unsupported_endpoint_is_400(rig: Rig) -> None:
    task = make_task(BLOCKING, endpoint="/v1/images/generations")
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 400
    assert answer["body"]["error"]["param"] == "endpoint"
    assert "/v1/images/generations" in answer["body"]["error"]["message"]
    assert rig.engines.calls == []


# -- errors ----------------------------------------------------------------------------------


async def test_invalid_task_from_the_engine_is_an_openai_400(rig: Rig) -> None:
    rig.engines.script(InvalidTaskError("max_tokens is too large", "max_tokens"))
    task = make_task(CALLBACK)
    await rig.run(task)
    assert rig.only_answer(task) == {
        "status_code": 400,
        "request_id": task.task_id,
        "body": {
            "error": {
                "message": "max_tokens is too large",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "invalid_request",
            }
        },
    }


async def test_engine_status_is_kept(rig: Rig) -> None:
    rig.engines.script(EngineError("context too long", status_code=413, code="too_long"))
    task = make_task(BLOCKING)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert (answer["status_code"], error_code(answer)) == (413, "too_long")


async def test_stream_error_is_a_chunk_then_the_completion(rig: Rig) -> None:
    rig.engines.script(CHUNKS[0], InvalidTaskError("bad logprobs", "logprobs"))
    task = make_task(STREAMING)
    await rig.run(task)
    events = rig.events.for_task(task.task_id)
    assert [(e.kind, e.event_id) for e in events] == [
        ("progress", "0"),
        ("progress", "1"),
        ("completion", None),
    ]
    assert events[0].data == CHUNKS[0]
    assert events[1].data["error"]["message"] == "bad logprobs"
    assert events[1].data["error"]["param"] == "logprobs"
    assert events[2].data["status_code"] == 400
    assert STREAM_DONE not in progress_data(events)


async def test_stream_error_before_any_chunk_is_event_zero(rig: Rig) -> None:
    task = make_task(STREAMING, model="unknown")
    await rig.run(task)
    events = rig.events.for_task(task.task_id)
    assert [(e.kind, e.event_id) for e in events] == [("progress", "0"), ("completion", None)]
    assert events[0].data["error"]["code"] == "model_not_found"


async def test_unexpected_engine_exception_is_500(rig: Rig) -> None:
    rig.engines.script(RuntimeError("boom"))
    task = make_task(CALLBACK)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 500
    assert error_code(answer) == "engine_error"
    assert "boom" in answer["body"]["error"]["message"]


async def test_no_response_from_the_engine_is_500(rig: Rig) -> None:
    rig.engines.script()  # ends without yielding
    task = make_task(BLOCKING)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 500


# -- deadlines -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [BLOCKING, STREAMING, CALLBACK])
async def test_expired_task_is_408_without_an_engine_call(rig: Rig, mode: ResponseMode) -> None:
    task = make_task(mode, expire_in_ms=-1)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 408
    assert error_code(answer) == "task_expired"
    assert rig.engines.calls == []


async def test_deadline_mid_generation_aborts_and_answers_408(rig: Rig) -> None:
    never = asyncio.Event()
    rig.engines.script(CHUNKS[0], never)
    task = make_task(STREAMING, expire_in_ms=300)
    await rig.run(task)

    (call,) = rig.engines.calls
    assert call.yielded == 1
    assert call.cancelled
    assert rig.engines.aborts == [("m", task.task_id)]
    events = rig.events.for_task(task.task_id)
    assert [(e.kind, e.event_id) for e in events] == [
        ("progress", "0"),
        ("progress", "1"),
        ("completion", None),
    ]
    assert events[1].data["error"]["code"] == "task_expired"
    assert events[2].data["status_code"] == 408


async def test_deadline_of_a_blocking_task(rig: Rig) -> None:
    rig.engines.script(Delay(30))
    task = make_task(BLOCKING, expire_in_ms=200)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 408
    assert rig.engines.aborts == [("m", task.task_id)]
    assert rig.engines.active == 0


async def test_task_without_expire_time_gets_max_task_time() -> None:
    rig = Rig(max_task_time_s=0.2)
    rig.engines.script(Delay(30))
    task = make_task(CALLBACK, expire_in_ms=None)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 408


async def test_online_task_without_expire_time_gets_max_task_time() -> None:
    rig = Rig(max_task_time_s=0.2)
    rig.engines.script(Delay(30))
    task = make_task(BLOCKING, expire_in_ms=None)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 408


async def test_a_timeout_raised_by_the_engine_is_not_the_deadline(rig: Rig) -> None:
    rig.engines.script(TimeoutError("upstream read timed out"))
    task = make_task(CALLBACK)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 500
    assert error_code(answer) == "engine_error"
    assert rig.engines.aborts == []


# -- retries ---------------------------------------------------------------------------------


async def test_replica_failure_before_output_is_retried(rig: Rig) -> None:
    rig.engines.script(ReplicaUnavailableError("replica died"))
    rig.engines.script(Delay(0.001), ReplicaUnavailableError("again"))
    rig.engines.script(*CHUNKS)
    task = make_task(STREAMING)
    await rig.run(task)
    assert len(rig.engines.calls) == 3
    events = rig.events.for_task(task.task_id)
    assert progress_data(events) == [*CHUNKS, STREAM_DONE]
    assert [e.event_id for e in events if e.kind == "progress"] == ["0", "1", "2", "3"]
    assert rig.only_answer(task)["status_code"] == 200


async def test_replica_failures_beyond_the_limit_are_500(rig: Rig) -> None:
    for _ in range(3):
        rig.engines.script(ReplicaUnavailableError("replica died"))
    task = make_task(CALLBACK)
    await rig.run(task)
    assert len(rig.engines.calls) == 3  # first try + max_replica_retries
    answer = rig.only_answer(task)
    assert answer["status_code"] == 500
    assert error_code(answer) == "engine_error"


async def test_replica_failure_after_output_is_not_retried(rig: Rig) -> None:
    rig.engines.script(CHUNKS[0], ReplicaUnavailableError("replica died"))
    task = make_task(STREAMING)
    await rig.run(task)
    assert len(rig.engines.calls) == 1
    events = rig.events.for_task(task.task_id)
    assert [(e.kind, e.event_id) for e in events] == [
        ("progress", "0"),
        ("progress", "1"),
        ("completion", None),
    ]
    assert events[1].data["error"]["code"] == "engine_error"
    assert events[2].data["status_code"] == 500


async def test_overload_is_retried_with_backoff(rig: Rig) -> None:
    for _ in range(3):
        rig.engines.script(EngineOverloadedError("503"))
    task = make_task(BLOCKING)
    await rig.run(task)
    assert len(rig.engines.calls) == 4
    assert rig.only_answer(task)["status_code"] == 200


async def test_overload_that_outlives_the_deadline_is_503() -> None:
    rig = Rig()
    rig.engines.default = [EngineOverloadedError("503")]
    task = make_task(CALLBACK, expire_in_ms=300)
    await rig.run(task)
    assert len(rig.engines.calls) >= 2
    answer = rig.only_answer(task)
    assert answer["status_code"] == 503
    assert error_code(answer) == "overloaded"
    assert rig.engines.aborts == [("m", task.task_id)]


async def test_overload_after_output_is_503(rig: Rig) -> None:
    rig.engines.script(CHUNKS[0], EngineOverloadedError("preempted"))
    task = make_task(STREAMING)
    await rig.run(task)
    assert len(rig.engines.calls) == 1
    assert rig.only_answer(task)["status_code"] == 503


# -- duplicates and redeliveries -------------------------------------------------------------


async def test_duplicate_submit_of_an_in_flight_task_is_refused(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.engines.script(gate, RESPONSE)
    task = make_task(CALLBACK)
    assert rig.submit(task)
    await until(lambda: rig.engines.active == 1)
    assert rig.dispatcher.submit(task, "m") is False
    assert rig.dispatcher.metrics.total("duplicates") == 1
    gate.set()
    await rig.idle()
    assert len(rig.engines.calls) == 1
    assert len(rig.answers(task)) == 1


async def test_redelivered_completed_offline_task_gets_its_answer_again(rig: Rig) -> None:
    task = make_task(CALLBACK, level=1)
    await rig.run(task)
    first = rig.completer.of(task.task_id)
    assert rig.submit(task) is True
    await rig.idle()
    assert len(rig.engines.calls) == 1  # not run again
    assert rig.completer.of(task.task_id) == first * 2
    assert rig.in_flight() == 0


async def test_redelivered_completed_online_task_is_dropped(rig: Rig) -> None:
    task = make_task(BLOCKING)
    await rig.run(task)
    assert rig.submit(task) is False
    await settle()
    assert len(rig.engines.calls) == 1
    assert len(rig.answers(task)) == 1
    assert rig.in_flight() == 0


async def test_remembered_answers_are_bounded() -> None:
    rig = Rig(remember_completed=2)
    tasks = [make_task(CALLBACK) for _ in range(3)]
    for task in tasks:
        await rig.run(task)
    assert rig.submit(tasks[0]) is True  # forgotten: run again
    await rig.idle()
    assert len(rig.engines.calls) == 4


# -- delivery failures -----------------------------------------------------------------------


async def test_complete_failure_is_logged_and_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(completer=FakeCompleter(fail_times=1))
    task = make_task(CALLBACK)
    with caplog.at_level(logging.ERROR, logger="ray_worker.worker.dispatcher"):
        await rig.run(task)
    assert rig.completer.attempts == [task.task_id]
    assert rig.dispatcher.metrics.total("complete_failures") == 1
    assert "could not deliver the answer" in caplog.text
    assert "crashed" not in caplog.text
    assert "ak-secret" not in caplog.text
    assert rig.in_flight() == 0
    assert rig.completed() == 1


async def test_completion_event_failure_is_logged_and_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(events=FakeEventSink(fail_completions=1))
    task = make_task(BLOCKING)
    with caplog.at_level(logging.ERROR, logger="ray_worker.worker.dispatcher"):
        await rig.run(task)
    assert rig.events.completion_attempts == 1
    assert rig.dispatcher.metrics.total("publish_failures", kind="completion") == 1
    assert "crashed" not in caplog.text
    assert rig.in_flight() == 0


async def test_failed_resend_of_a_redelivered_answer_is_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    task = make_task(CALLBACK, level=1)
    await rig.run(task)
    rig.completer.fail_times = 1
    rig.completer.error = QueueUnavailableError("down", 503)
    with caplog.at_level(logging.ERROR, logger="ray_worker.worker.dispatcher"):
        assert rig.submit(task)
        await rig.idle()
    assert "crashed" not in caplog.text
    assert rig.in_flight() == 0


async def test_event_bus_failure_at_done_still_answers_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(events=FakeEventSink(fail_progress=lambda data: data == STREAM_DONE))
    rig.engines.script(*CHUNKS)
    task = make_task(STREAMING)
    with caplog.at_level(logging.ERROR, logger="ray_worker.worker.dispatcher"):
        await rig.run(task)
    assert len(rig.events.completions_of(task.task_id)) == 1
    assert "crashed" not in caplog.text
    assert rig.completed() == 1


async def test_event_bus_failure_mid_stream_stops_generation_and_answers_once(rig: Rig) -> None:
    chunk = CHUNKS[1]
    rig.events.fail_progress = lambda data: data is chunk
    rig.engines.script(*CHUNKS)
    task = make_task(STREAMING)
    await rig.run(task)
    assert rig.engines.calls[0].yielded == 2
    assert len(rig.events.completions_of(task.task_id)) == 1
    assert rig.events.completions_of(task.task_id)[0]["status_code"] == 500


# -- capacity and metrics --------------------------------------------------------------------


async def test_capacity_is_released_after_every_task(rig: Rig) -> None:
    rig.engines.script(RESPONSE)
    rig.engines.script(InvalidTaskError("bad"))
    rig.engines.script(CHUNKS[0], ReplicaUnavailableError("gone"))
    tasks = [
        make_task(CALLBACK, level=1),
        make_task(BLOCKING),
        make_task(STREAMING),
        make_task(CALLBACK, expire_in_ms=-1),
        make_task(BLOCKING, model="unknown"),
    ]
    for task in tasks:
        assert rig.submit(task)
    assert rig.in_flight() == len(tasks)
    await rig.idle()
    assert rig.capacity.model("m").in_flight == {Level.ONLINE: 0, Level.OFFLINE: 0}
    assert rig.completed() == len(tasks)
    assert all(len(rig.answers(t)) == 1 for t in tasks)


async def test_completion_metrics_by_mode_and_status(rig: Rig) -> None:
    await rig.run(make_task(BLOCKING))
    await rig.run(make_task(CALLBACK, expire_in_ms=-1))
    assert rig.completed(mode="blocking", status="2xx") == 1
    assert rig.completed(mode="callback", status="4xx") == 1


# -- drain -----------------------------------------------------------------------------------


async def test_drain_with_nothing_in_flight(rig: Rig) -> None:
    assert await rig.dispatcher.drain(0.01) == 0


async def test_drain_waits_for_tasks_that_finish_in_time(rig: Rig) -> None:
    rig.engines.script(Delay(0.01), RESPONSE)
    task = make_task(CALLBACK)
    assert rig.submit(task)
    assert await rig.dispatcher.drain(10) == 0
    assert rig.only_answer(task)["status_code"] == 200


async def test_drain_answers_cut_short_tasks_503_once_each(rig: Rig) -> None:
    never = asyncio.Event()
    rig.engines.script(CHUNKS[0], never)
    rig.engines.script(never)
    rig.engines.script(never)
    rig.engines.script(RESPONSE)
    held = [make_task(STREAMING), make_task(BLOCKING), make_task(CALLBACK, level=1)]
    quick = make_task(CALLBACK)
    for task in [*held, quick]:
        assert rig.submit(task)
    await until(lambda: rig.engines.active == 3 and not rig.dispatcher.holds(quick.task_id))

    assert await rig.dispatcher.drain(0.01) == 3

    assert rig.only_answer(quick)["status_code"] == 200
    for task in held:
        answer = rig.only_answer(task)
        assert answer["status_code"] == 503
        assert error_code(answer) == "overloaded"
    stream_events = rig.events.for_task(held[0].task_id)
    assert [(e.kind, e.event_id) for e in stream_events] == [
        ("progress", "0"),
        ("progress", "1"),
        ("completion", None),
    ]
    assert all(call.cancelled for call in rig.engines.calls if not call.finished)
    assert rig.dispatcher.in_flight == 0
    assert rig.in_flight() == 0
    assert rig.completed() == 4


async def test_submit_after_drain_is_answered_503_without_running(rig: Rig) -> None:
    await rig.dispatcher.drain(0)
    task = make_task(CALLBACK)
    rig.submit(task)
    await rig.idle()
    assert rig.engines.calls == []
    assert rig.only_answer(task)["status_code"] == 503
    assert rig.in_flight() == 0


@pytest.mark.parametrize("mode", [BLOCKING, CALLBACK])
async def test_drain_lets_an_answer_being_sent_finish(mode: ResponseMode) -> None:
    rig = Rig()
    gate = asyncio.Event()
    sent: list[str] = []

    async def slow_completion(instance_id: str, task_id: str, result: Any) -> None:
        await gate.wait()
        sent.append(task_id)

    async def slow_complete(task_id: str, result: Any) -> None:
        await gate.wait()
        sent.append(task_id)

    rig.events.completion = slow_completion  # type: ignore[method-assign]
    rig.completer.complete = slow_complete  # type: ignore[method-assign]
    task = make_task(mode)
    assert rig.submit(task)
    await until(lambda: rig.engines.calls and rig.engines.active == 0)
    await settle()
    draining = asyncio.create_task(rig.dispatcher.drain(0))
    await settle()
    gate.set()
    assert await draining == 1
    assert sent == [task.task_id]  # the task's one answer went out, not a second 503
    assert rig.in_flight() == 0


async def test_streaming_embeddings_send_the_response_as_the_one_chunk(rig: Rig) -> None:
    response = {"object": "list", "data": [{"embedding": [0.1]}]}
    rig.engines.script(response)
    task = make_task(STREAMING, endpoint="/v1/embeddings", data={"input": "x"})
    await rig.run(task)
    progress = [e for e in rig.events.events if e.kind == "progress"]
    assert [(e.event_id, e.data) for e in progress] == [("0", response), ("1", "[DONE]")]
    completions = [e for e in rig.events.events if e.kind == "completion"]
    assert [c.data for c in completions] == [{"status_code": 200, "request_id": task.task_id}]
