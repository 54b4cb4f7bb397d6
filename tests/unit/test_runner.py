"""TaskRunner: inside the replica, every task runs once and is answered exactly once, on the path
its mode demands (or, cut short by a stop at level 1, is left for the server's redelivery).

Fakes stand in for the engine, the event bus and Bella-Queue's HTTP complete (``fakes.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ray_worker.bella.protocol import STREAM_DONE, ResponseMode, Task
from ray_worker.config import DispatcherConfig
from ray_worker.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidTaskError,
    ReplicaUnavailableError,
)
from ray_worker.hop import PRIORITY_OFFLINE, PRIORITY_ONLINE, Outcome
from ray_worker.task.runner import TaskRunner
from tests.unit.fakes import (
    Delay,
    FakeCompleter,
    FakeEngine,
    FakeEventSink,
    Recorded,
    make_task,
    settle,
    until,
)

STREAMING = ResponseMode.STREAMING
BLOCKING = ResponseMode.BLOCKING
CALLBACK = ResponseMode.CALLBACK
BATCH = ResponseMode.BATCH

CHUNKS = [{"id": "c", "choices": [{"delta": {"content": t}}]} for t in ("Hel", "lo", "!")]
USAGE_CHUNK = {"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
RESPONSE = {
    "id": "r",
    "object": "chat.completion",
    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
}


class Rig:
    """A task runner wired to fakes."""

    def __init__(
        self,
        *,
        events: FakeEventSink | None = None,
        completer: FakeCompleter | None = None,
        redelivers: bool = True,
        **config: Any,
    ) -> None:
        settings: dict[str, Any] = {
            "overload_retry_initial_s": 0.001,
            "overload_retry_max_s": 0.004,
            **config,
        }
        self.engine = FakeEngine(default=[RESPONSE])
        self.events = events or FakeEventSink()
        self.completer = completer or FakeCompleter()
        self.runner = TaskRunner(
            engine=self.engine,
            events=self.events,
            completer=self.completer,
            config=DispatcherConfig(**settings),
            redelivers=redelivers,
        )

    async def run(self, task: Task) -> Outcome:
        return await self.runner.run(task)

    def answers(self, task: Task) -> list[dict[str, Any]]:
        """Every answer the task got: completion events plus HTTP completes."""
        return self.events.completions_of(task.task_id) + self.completer.of(task.task_id)

    def only_answer(self, task: Task) -> dict[str, Any]:
        answers = self.answers(task)
        assert len(answers) == 1, answers
        return answers[0]

    def completed(self, **tags: str) -> float:
        return self.runner.metrics.total("tasks_completed", **tags)

    async def idle(self) -> None:
        await until(lambda: self.runner.in_flight == 0)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.runner.drain(0)


def progress_data(events: list[Recorded]) -> list[Any]:
    return [e.data for e in events if e.kind == "progress"]


def kinds_and_ids(rig: Rig, task: Task) -> list[tuple[str, str | None]]:
    return [(e.kind, e.event_id) for e in rig.events.for_task(task.task_id)]


def error_code(answer: dict[str, Any]) -> Any:
    return answer["body"]["error"]["code"]


def expect_outcome(outcome: Outcome, task: Task, **fields: Any) -> None:
    """``outcome``'s fields equal ``fields`` (the timings only need to be sane)."""
    assert outcome["task_id"] == task.task_id
    assert outcome["duration_s"] >= 0
    for key, value in fields.items():
        assert outcome[key] == value, (key, outcome)


# -- response modes --------------------------------------------------------------------------


async def test_streaming_sends_chunks_done_then_completion(rig: Rig) -> None:
    rig.engine.script(*CHUNKS, USAGE_CHUNK)
    task = make_task(STREAMING, model="m", data={"messages": [], "stream": False})
    outcome = await rig.run(task)

    events = rig.events.for_task(task.task_id)
    assert [(e.kind, e.event_id, e.event_name) for e in events] == [
        ("progress", "0", "message"),
        ("progress", "1", "message"),
        ("progress", "2", "message"),
        ("progress", "3", "message"),
        ("progress", "4", "message"),
        ("completion", None, None),
    ]
    assert progress_data(events) == [*CHUNKS, USAGE_CHUNK, STREAM_DONE]
    assert all(e.instance_id == task.instance_id for e in events)
    assert events[-1].data == {"status_code": 200, "request_id": task.task_id}
    assert rig.completer.completes == []

    (call,) = rig.engine.calls
    assert call.data["stream"] is True  # forced on for streaming mode
    assert call.data["stream_options"] == {"include_usage": True}
    assert call.data["model"] == "m"
    assert call.request_id == task.task_id
    assert call.finished
    assert not call.aborted
    expect_outcome(
        outcome,
        task,
        status_code=200,
        answered=True,
        delivered=True,
        duplicate=False,
        events=5,
        prompt_tokens=5,
        completion_tokens=3,
    )
    assert outcome["ttft_s"] is not None
    assert 0 <= outcome["ttft_s"] <= outcome["duration_s"]


async def test_streaming_always_asks_for_usage(rig: Rig) -> None:
    rig.engine.script(*CHUNKS)
    task = make_task(STREAMING, data={"stream_options": {"include_usage": False}})
    await rig.run(task)
    assert rig.engine.calls[0].data["stream_options"] == {"include_usage": True}


async def test_blocking_sends_one_completion_with_the_body(rig: Rig) -> None:
    task = make_task(
        BLOCKING, data={"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    )
    outcome = await rig.run(task)

    assert rig.events.for_task(task.task_id) == [
        Recorded(
            "completion",
            task.task_id,
            task.instance_id,
            data={"status_code": 200, "request_id": task.task_id, "body": RESPONSE},
        )
    ]
    assert rig.completer.completes == []
    data = rig.engine.calls[0].data
    assert data["stream"] is False  # forced off: blocking needs one whole response
    assert "stream_options" not in data
    expect_outcome(
        outcome,
        task,
        status_code=200,
        answered=True,
        delivered=True,
        events=0,
        prompt_tokens=7,
        completion_tokens=2,
    )


@pytest.mark.parametrize(
    ("mode", "level"), [(CALLBACK, 0), (CALLBACK, 1), (BATCH, 1)], ids=["cb-0", "cb-1", "batch"]
)
async def test_callback_and_batch_complete_over_http(
    rig: Rig, mode: ResponseMode, level: int
) -> None:
    task = make_task(mode, level=level, data={"messages": [], "stream": True})
    outcome = await rig.run(task)

    assert rig.completer.completes == [
        Recorded(
            "complete",
            task.task_id,
            data={"status_code": 200, "request_id": task.task_id, "body": RESPONSE},
        )
    ]
    assert rig.events.events == []  # never events, even with an instance_id (level 0)
    assert rig.engine.calls[0].data["stream"] is False
    expect_outcome(outcome, task, status_code=200, answered=True, delivered=True, events=0)


@pytest.mark.parametrize("mode", [CALLBACK, BLOCKING])
async def test_streaming_flag_is_forced_off_in_non_streaming_modes(
    rig: Rig, mode: ResponseMode
) -> None:
    await rig.run(make_task(mode, data={"prompt": "x", "stream": True}, endpoint="/v1/completions"))
    assert rig.engine.calls[0].data["stream"] is False
    assert rig.engine.calls[0].endpoint == "/v1/completions"


async def test_embeddings_are_not_given_a_stream_flag(rig: Rig) -> None:
    rig.engine.script({"object": "list", "data": []})
    task = make_task(CALLBACK, endpoint="/v1/embeddings", data={"input": "x"})
    await rig.run(task)
    assert "stream" not in rig.engine.calls[0].data
    assert rig.only_answer(task)["body"] == {"object": "list", "data": []}


async def test_streaming_embeddings_send_the_response_as_the_one_chunk(rig: Rig) -> None:
    response = {"object": "list", "data": [{"embedding": [0.1]}]}
    rig.engine.script(response)
    task = make_task(STREAMING, endpoint="/v1/embeddings", data={"input": "x", "stream": True})
    outcome = await rig.run(task)
    assert "stream" in rig.engine.calls[0].data  # the caller's flag is passed through untouched
    assert "stream_options" not in rig.engine.calls[0].data
    events = rig.events.for_task(task.task_id)
    assert [(e.kind, e.event_id, e.data) for e in events] == [
        ("progress", "0", response),
        ("progress", "1", STREAM_DONE),
        ("completion", None, {"status_code": 200, "request_id": task.task_id}),
    ]
    expect_outcome(outcome, task, status_code=200, events=2)


async def test_missing_endpoint_means_chat(rig: Rig) -> None:
    task = make_task(CALLBACK, endpoint="")
    await rig.run(task)
    assert rig.engine.calls[0].endpoint == "/v1/chat/completions"
    assert rig.only_answer(task)["status_code"] == 200


async def test_priority_follows_the_level(rig: Rig) -> None:
    await rig.run(make_task(BLOCKING))
    await rig.run(make_task(STREAMING))
    await rig.run(make_task(CALLBACK, level=0))
    await rig.run(make_task(CALLBACK, level=1))
    await rig.run(make_task(BATCH, level=1))
    assert rig.engine.priorities == [PRIORITY_ONLINE] * 3 + [PRIORITY_OFFLINE] * 2
    assert PRIORITY_ONLINE < PRIORITY_OFFLINE  # vLLM schedules lower values first


async def test_tasks_run_concurrently_and_are_reported_held(rig: Rig) -> None:
    gate = asyncio.Event()
    for _ in range(3):
        rig.engine.script(gate, RESPONSE)
    tasks = [make_task(BLOCKING), make_task(CALLBACK, level=1), make_task(BATCH, level=1)]
    jobs = [rig.runner.start(task) for task in tasks]
    assert all(job is not None for job in jobs)
    await until(lambda: rig.engine.active == 3)
    assert rig.runner.in_flight == 3
    assert all(rig.runner.holds(t.task_id) for t in tasks)
    assert rig.runner.held() == {
        "held_ids": [t.task_id for t in tasks],
        "held_online": 1,
        "held_offline": 2,
    }
    gate.set()
    await rig.idle()
    assert rig.runner.held() == {"held_ids": [], "held_online": 0, "held_offline": 0}
    assert all(len(rig.answers(t)) == 1 for t in tasks)


async def test_on_answering_is_called_once_right_before_the_first_event(rig: Rig) -> None:
    seen: list[int] = []
    rig.engine.script(*CHUNKS)
    task = make_task(STREAMING)
    job = rig.runner.start(task, on_answering=lambda: seen.append(len(rig.events.events)))
    assert job is not None
    await job
    assert seen == [0]  # called once, before anything left


async def test_on_answering_of_an_error_answer(rig: Rig) -> None:
    seen: list[int] = []
    task = make_task(CALLBACK, expire_in_ms=-1)
    job = rig.runner.start(task, on_answering=lambda: seen.append(len(rig.completer.attempts)))
    assert job is not None
    outcome = await job
    assert seen == [0]
    assert outcome["status_code"] == 408


# -- bad tasks and engine errors -------------------------------------------------------------


async def test_unsupported_endpoint_is_400_without_an_engine_call(rig: Rig) -> None:
    task = make_task(BLOCKING, endpoint="/v1/images/generations")
    outcome = await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 400
    assert answer["body"]["error"]["param"] == "endpoint"
    assert "/v1/images/generations" in answer["body"]["error"]["message"]
    assert rig.engine.calls == []
    expect_outcome(outcome, task, status_code=400, answered=True, delivered=True)


async def test_invalid_task_from_the_engine_is_an_openai_400(rig: Rig) -> None:
    rig.engine.script(InvalidTaskError("max_tokens is too large", "max_tokens"))
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
    rig.engine.script(EngineError("context too long", status_code=413, code="too_long"))
    task = make_task(BLOCKING)
    outcome = await rig.run(task)
    answer = rig.only_answer(task)
    assert (answer["status_code"], error_code(answer)) == (413, "too_long")
    assert outcome["status_code"] == 413


async def test_stream_error_is_a_chunk_then_the_completion(rig: Rig) -> None:
    rig.engine.script(CHUNKS[0], InvalidTaskError("bad logprobs", "logprobs"))
    task = make_task(STREAMING)
    outcome = await rig.run(task)
    events = rig.events.for_task(task.task_id)
    assert kinds_and_ids(rig, task) == [
        ("progress", "0"),
        ("progress", "1"),
        ("completion", None),
    ]
    assert events[0].data == CHUNKS[0]
    assert events[1].data["error"]["message"] == "bad logprobs"
    assert events[1].data["error"]["param"] == "logprobs"
    assert events[2].data["status_code"] == 400
    assert events[2].data["body"] == events[1].data
    assert STREAM_DONE not in progress_data(events)
    expect_outcome(outcome, task, status_code=400, answered=True, events=2)


async def test_stream_error_before_any_chunk_is_event_zero(rig: Rig) -> None:
    rig.engine.script(InvalidTaskError("bad", "messages"))
    task = make_task(STREAMING)
    await rig.run(task)
    events = rig.events.for_task(task.task_id)
    assert kinds_and_ids(rig, task) == [("progress", "0"), ("completion", None)]
    assert events[0].data["error"]["code"] == "invalid_request"


async def test_unexpected_engine_exception_is_500(rig: Rig) -> None:
    rig.engine.script(RuntimeError("boom"))
    task = make_task(CALLBACK)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 500
    assert error_code(answer) == "engine_error"
    assert "boom" in answer["body"]["error"]["message"]


async def test_worker_error_from_the_engine_is_500(rig: Rig) -> None:
    # Inside the replica nothing is retried on a replica fault: the poller retries the call.
    rig.engine.script(CHUNKS[0], ReplicaUnavailableError("engine dead"))
    task = make_task(STREAMING)
    await rig.run(task)
    assert len(rig.engine.calls) == 1
    events = rig.events.for_task(task.task_id)
    assert kinds_and_ids(rig, task) == [("progress", "0"), ("progress", "1"), ("completion", None)]
    assert events[1].data["error"]["code"] == "engine_error"
    assert events[2].data["status_code"] == 500


async def test_no_response_from_the_engine_is_500(rig: Rig) -> None:
    rig.engine.script()  # ends without yielding
    task = make_task(BLOCKING)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 500


# -- deadlines -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [BLOCKING, STREAMING, CALLBACK])
async def test_expired_task_is_408_without_an_engine_call(rig: Rig, mode: ResponseMode) -> None:
    task = make_task(mode, expire_in_ms=-1)
    outcome = await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 408
    assert error_code(answer) == "task_expired"
    assert rig.engine.calls == []
    expect_outcome(outcome, task, status_code=408, answered=True)


async def test_deadline_mid_generation_aborts_and_answers_408(rig: Rig) -> None:
    never = asyncio.Event()
    rig.engine.script(CHUNKS[0], never)
    task = make_task(STREAMING, expire_in_ms=300)
    outcome = await rig.run(task)

    (call,) = rig.engine.calls
    assert call.yielded == 1
    assert call.aborted  # the stream was closed: the engine frees the slot
    assert rig.engine.active == 0
    events = rig.events.for_task(task.task_id)
    assert kinds_and_ids(rig, task) == [("progress", "0"), ("progress", "1"), ("completion", None)]
    assert events[1].data["error"]["code"] == "task_expired"
    assert events[2].data["status_code"] == 408
    expect_outcome(outcome, task, status_code=408, events=2)


async def test_deadline_of_a_blocking_task(rig: Rig) -> None:
    rig.engine.script(Delay(30))
    task = make_task(BLOCKING, expire_in_ms=200)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 408
    assert rig.engine.aborted == [task.task_id]
    assert rig.engine.active == 0


async def test_task_without_expire_time_gets_max_task_time() -> None:
    rig = Rig(max_task_time_s=0.2)
    rig.engine.script(Delay(30))
    task = make_task(CALLBACK, expire_in_ms=None)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 408


async def test_online_task_without_expire_time_gets_max_task_time() -> None:
    rig = Rig(max_task_time_s=0.2)
    rig.engine.script(Delay(30))
    task = make_task(BLOCKING, expire_in_ms=None)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 408


async def test_a_timeout_raised_by_the_engine_is_not_the_deadline(rig: Rig) -> None:
    rig.engine.script(TimeoutError("upstream read timed out"))
    task = make_task(CALLBACK)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 500
    assert error_code(answer) == "engine_error"
    assert rig.engine.aborted == []


# -- overload --------------------------------------------------------------------------------


async def test_overload_is_retried_with_backoff(rig: Rig) -> None:
    for _ in range(3):
        rig.engine.script(EngineOverloadedError("503"))
    task = make_task(BLOCKING)
    outcome = await rig.run(task)
    assert len(rig.engine.calls) == 4
    assert all(call.request_id == task.task_id for call in rig.engine.calls)
    assert rig.only_answer(task)["status_code"] == 200
    assert outcome["status_code"] == 200


async def test_overload_that_outlives_the_deadline_is_503() -> None:
    rig = Rig()
    rig.engine.default = [EngineOverloadedError("503")]
    task = make_task(CALLBACK, expire_in_ms=300)
    outcome = await rig.run(task)
    assert len(rig.engine.calls) >= 2
    answer = rig.only_answer(task)
    assert answer["status_code"] == 503
    assert error_code(answer) == "overloaded"
    assert outcome["status_code"] == 503
    assert rig.engine.active == 0


async def test_overload_after_output_is_503_without_a_retry(rig: Rig) -> None:
    rig.engine.script(CHUNKS[0], EngineOverloadedError("preempted"))
    task = make_task(STREAMING)
    await rig.run(task)
    assert len(rig.engine.calls) == 1
    assert rig.only_answer(task)["status_code"] == 503
    assert kinds_and_ids(rig, task) == [("progress", "0"), ("progress", "1"), ("completion", None)]


# -- duplicates ------------------------------------------------------------------------------


async def test_duplicate_start_returns_none_and_run_says_duplicate(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.engine.script(gate, RESPONSE)
    task = make_task(CALLBACK)
    job = rig.runner.start(task)
    assert job is not None
    await until(lambda: rig.engine.active == 1)
    assert rig.runner.start(task) is None
    duplicate = await rig.run(task)
    expect_outcome(
        duplicate,
        task,
        status_code=0,
        answered=False,
        delivered=False,
        duplicate=True,
        events=0,
        prompt_tokens=0,
        completion_tokens=0,
        ttft_s=None,
    )
    assert rig.runner.metrics.total("duplicates") == 2
    gate.set()
    outcome = await job
    assert outcome["duplicate"] is False
    assert outcome["status_code"] == 200
    assert len(rig.engine.calls) == 1
    assert len(rig.answers(task)) == 1


async def test_a_finished_task_may_run_again(rig: Rig) -> None:
    # Redeliveries are the poller's to recognise; a replica runs what it is given.
    task = make_task(CALLBACK, level=1)
    await rig.run(task)
    assert (await rig.run(task))["status_code"] == 200
    assert len(rig.engine.calls) == 2


# -- delivery failures -----------------------------------------------------------------------


async def test_complete_failure_is_logged_and_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(completer=FakeCompleter(fail_times=1))
    task = make_task(CALLBACK)
    with caplog.at_level(logging.ERROR, logger="ray_worker.task.runner"):
        outcome = await rig.run(task)
    assert rig.completer.attempts == [task.task_id]
    assert rig.runner.metrics.total("complete_failures") == 1
    assert "could not deliver the answer" in caplog.text
    assert "crashed" not in caplog.text
    assert "ak-secret" not in caplog.text
    expect_outcome(outcome, task, status_code=200, answered=True, delivered=False)
    assert rig.completed() == 1


async def test_completion_event_failure_is_logged_and_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(events=FakeEventSink(fail_completions=1))
    task = make_task(BLOCKING)
    with caplog.at_level(logging.ERROR, logger="ray_worker.task.runner"):
        outcome = await rig.run(task)
    assert rig.events.completion_attempts == 1
    assert rig.runner.metrics.total("publish_failures", kind="completion") == 1
    assert "crashed" not in caplog.text
    expect_outcome(outcome, task, status_code=200, answered=True, delivered=False)


async def test_error_answer_delivery_failure_is_not_raised() -> None:
    rig = Rig(completer=FakeCompleter(fail_times=1))
    task = make_task(CALLBACK, expire_in_ms=-1)
    outcome = await rig.run(task)
    expect_outcome(outcome, task, status_code=408, answered=True, delivered=False)
    assert rig.runner.metrics.total("complete_failures") == 1


async def test_event_bus_failure_at_done_still_answers_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(events=FakeEventSink(fail_progress=lambda data: data == STREAM_DONE))
    rig.engine.script(*CHUNKS)
    task = make_task(STREAMING)
    with caplog.at_level(logging.ERROR, logger="ray_worker.task.runner"):
        outcome = await rig.run(task)
    (completion,) = rig.events.completions_of(task.task_id)
    assert completion["status_code"] == 500
    assert "crashed" not in caplog.text
    assert rig.completed() == 1
    assert outcome["status_code"] == 500


async def test_event_bus_failure_mid_stream_stops_generation_and_answers_once(rig: Rig) -> None:
    chunk = CHUNKS[1]
    rig.events.fail_progress = lambda data: data is chunk
    rig.engine.script(*CHUNKS)
    task = make_task(STREAMING)
    await rig.run(task)
    (call,) = rig.engine.calls
    assert call.yielded == 2
    assert call.aborted
    (completion,) = rig.events.completions_of(task.task_id)
    assert completion["status_code"] == 500


# -- metrics ---------------------------------------------------------------------------------


async def test_completion_metrics_by_mode_and_status(rig: Rig) -> None:
    await rig.run(make_task(BLOCKING))
    await rig.run(make_task(CALLBACK, expire_in_ms=-1))
    rig.engine.script(RuntimeError("boom"))
    await rig.run(make_task(BATCH, level=1))
    assert rig.completed() == 3
    assert rig.completed(mode="blocking", status="2xx") == 1
    assert rig.completed(mode="callback", status="4xx") == 1
    assert rig.completed(mode="batch", status="5xx") == 1


# -- drain -----------------------------------------------------------------------------------


async def test_drain_with_nothing_in_flight(rig: Rig) -> None:
    assert await rig.runner.drain(0.01) == 0


async def test_drain_waits_for_tasks_that_finish_in_time(rig: Rig) -> None:
    rig.engine.script(Delay(0.01), RESPONSE)
    task = make_task(CALLBACK, level=1)
    job = rig.runner.start(task)
    assert job is not None
    assert await rig.runner.drain(10) == 0
    assert rig.only_answer(task)["status_code"] == 200
    assert (await job)["status_code"] == 200


async def test_drain_answers_online_and_level_0_503_and_leaves_level_1(rig: Rig) -> None:
    never = asyncio.Event()
    rig.engine.script(CHUNKS[0], never)
    for _ in range(4):
        rig.engine.script(never)
    rig.engine.script(RESPONSE)
    answered = [make_task(STREAMING), make_task(BLOCKING), make_task(CALLBACK, level=0)]
    left = [make_task(CALLBACK, level=1), make_task(BATCH, level=1)]
    quick = make_task(CALLBACK, level=1)
    jobs = {t.task_id: rig.runner.start(t) for t in [*answered, *left, quick]}
    await until(lambda: rig.engine.active == 5 and not rig.runner.holds(quick.task_id))

    assert await rig.runner.drain(0.01) == 5

    assert rig.only_answer(quick)["status_code"] == 200
    for task in answered:
        answer = rig.only_answer(task)
        assert answer["status_code"] == 503
        assert error_code(answer) == "overloaded"
        assert "shutting down" in answer["body"]["error"]["message"]
        outcome = jobs[task.task_id].result()  # type: ignore[union-attr]
        expect_outcome(outcome, task, status_code=503, answered=True, delivered=True)
    assert kinds_and_ids(rig, answered[0]) == [
        ("progress", "0"),
        ("progress", "1"),
        ("completion", None),
    ]
    for task in left:
        assert rig.answers(task) == []  # the server redelivers it after process_timeout
        outcome = jobs[task.task_id].result()  # type: ignore[union-attr]
        expect_outcome(outcome, task, status_code=0, answered=False, delivered=False, events=0)
    assert rig.runner.metrics.total("left_for_redelivery") == 2
    assert all(call.aborted for call in rig.engine.calls if not call.finished)
    assert rig.engine.active == 0
    assert rig.runner.in_flight == 0
    assert rig.completed() == 4  # quick + the three 503s


async def test_start_after_drain_is_answered_503_without_running(rig: Rig) -> None:
    await rig.runner.drain(0)
    task = make_task(BLOCKING)
    outcome = await rig.run(task)
    assert rig.engine.calls == []
    assert rig.only_answer(task)["status_code"] == 503
    expect_outcome(outcome, task, status_code=503, answered=True)
    assert rig.runner.in_flight == 0


async def test_without_redelivery_a_stop_answers_level_1_503() -> None:
    # process_timeout 0: nothing would redeliver a level-1 task left unanswered.
    rig = Rig(redelivers=False)
    gate = asyncio.Event()
    rig.engine.script(gate)
    running = make_task(CALLBACK, level=1)
    job = rig.runner.start(running)
    assert job is not None
    await until(lambda: rig.engine.active == 1)
    assert await rig.runner.drain(0.01) == 1
    assert rig.only_answer(running)["status_code"] == 503
    late = make_task(BATCH, level=1)
    assert (await rig.run(late))["status_code"] == 503
    assert rig.runner.metrics.total("left_for_redelivery") == 0


async def test_level_1_start_after_drain_is_left_for_redelivery(rig: Rig) -> None:
    await rig.runner.drain(0)
    task = make_task(BATCH, level=1)
    outcome = await rig.run(task)
    assert rig.engine.calls == []
    assert rig.answers(task) == []
    assert outcome["status_code"] == 0


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
    assert rig.runner.start(task) is not None
    await until(lambda: rig.engine.calls and rig.engine.active == 0)
    await settle()
    draining = asyncio.create_task(rig.runner.drain(0))
    await settle()
    gate.set()
    assert await draining == 1
    assert sent == [task.task_id]  # the task's one answer went out, not a second 503
    assert rig.runner.in_flight == 0


async def test_answered_task_logs_one_usage_line_and_counts_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    rig = Rig()
    rig.runner.model_id = "m"
    rig.engine.default = [{**RESPONSE, "usage": usage}]
    task = make_task(CALLBACK, level=1)
    with caplog.at_level(logging.INFO, logger="ray_worker.task.runner"):
        outcome = await rig.run(task)
    lines = [r for r in caplog.records if getattr(r, "prompt_tokens", None) is not None]
    assert len(lines) == 1
    line = lines[0]
    assert (line.task_id, line.model, line.status) == (task.task_id, "m", 200)
    assert (line.prompt_tokens, line.completion_tokens) == (7, 3)
    assert line.queue_wait_s is not None
    assert line.generation_s >= 0
    assert "ak-secret" not in caplog.text
    assert outcome["prompt_tokens"] == 7
    metrics = rig.runner.metrics
    assert metrics.total("prompt_tokens", queue=task.queue, model="m") == 7
    assert metrics.total("completion_tokens", queue=task.queue, model="m") == 3


# -- abort (Bella-Queue cancelled the task) ----------------------------------------------------


@pytest.mark.parametrize("mode", [CALLBACK, BATCH])
async def test_abort_ends_a_running_offline_task_unanswered_and_frees_the_engine(
    rig: Rig, mode: ResponseMode, caplog: pytest.LogCaptureFixture
) -> None:
    rig.engine.script(Delay(30))
    task = make_task(mode)
    job = rig.runner.start(task)
    assert job is not None
    await until(lambda: rig.engine.active == 1)
    assert [t.task_id for t, _ in rig.runner.offline_running()] == [task.task_id]
    with caplog.at_level(logging.INFO, logger="ray_worker.task.runner"):
        assert rig.runner.abort(task.task_id, "the task was cancelled")
        outcome = await job
    expect_outcome(outcome, task, status_code=0, answered=False, delivered=False, cancelled=True)
    assert rig.answers(task) == []
    assert rig.engine.aborted == [task.task_id]
    assert rig.engine.active == 0
    assert rig.runner.in_flight == 0
    assert rig.runner.metrics.total("tasks_cancelled", mode=mode.value) == 1
    assert rig.completed() == 0
    (line,) = [r for r in caplog.records if "cancelled after" in r.getMessage()]
    assert line.__dict__["status"] == "cancelled"
    assert line.__dict__["reason"] == "the task was cancelled"


async def test_abort_of_a_task_not_running_here_is_refused(rig: Rig) -> None:
    assert not rig.runner.abort("TASK-nope", "cancelled")


async def test_abort_is_refused_once_the_answer_is_leaving(rig: Rig) -> None:
    gate = asyncio.Event()

    async def slow_complete(task_id: str, result: Any) -> None:
        await gate.wait()
        rig.completer.completes.append(Recorded("complete", task_id, data=dict(result)))

    rig.completer.complete = slow_complete  # type: ignore[method-assign]
    task = make_task(CALLBACK)
    job = rig.runner.start(task)
    assert job is not None
    await until(lambda: rig.engine.calls and rig.engine.active == 0)
    await settle()
    assert rig.runner.offline_running() == []  # answering: no longer abortable
    assert not rig.runner.abort(task.task_id, "cancelled")
    gate.set()
    outcome = await job
    assert outcome["answered"]
    assert not outcome["cancelled"]
    assert rig.only_answer(task)["status_code"] == 200


async def test_offline_running_lists_only_level_1_offline_tasks(rig: Rig) -> None:
    for _ in range(3):
        rig.engine.script(Delay(30))
    online = make_task(BLOCKING)
    level0_callback = make_task(CALLBACK, level=0)
    offline = make_task(CALLBACK)
    for task in (online, level0_callback, offline):
        assert rig.runner.start(task) is not None
    await until(lambda: rig.engine.active == 3)
    running = rig.runner.offline_running()
    assert [t.task_id for t, _ in running] == [offline.task_id]
    assert running[0][1] >= 0


class SwallowingEngine:
    """Like vLLM's non-streaming chat: a cancellation becomes an error response (here the
    ``EngineError`` the replica maps it to), not a ``CancelledError``."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def _play(self) -> AsyncIterator[dict[str, Any]]:
        self.started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        raise EngineError("Client disconnected", status_code=400)
        yield {}  # pragma: no cover - makes this an async generator

    def stream(
        self, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        return self._play()


def _swallowing_rig(**config: Any) -> tuple[Rig, SwallowingEngine]:
    rig = Rig(**config)
    engine = SwallowingEngine()
    rig.runner.engine = engine
    return rig, engine


async def _generating_on_swallowing_engine(
    mode: ResponseMode,
) -> tuple[Rig, Task, asyncio.Task[Outcome]]:
    """A task of ``mode`` started on a ``SwallowingEngine``, once the engine runs it."""
    rig, engine = _swallowing_rig()
    task = make_task(mode)
    job = rig.runner.start(task)
    assert job is not None
    await engine.started.wait()
    return rig, task, job


async def test_abort_is_cancelled_even_when_the_engine_turns_it_into_an_error() -> None:
    rig, task, job = await _generating_on_swallowing_engine(CALLBACK)
    assert rig.runner.abort(task.task_id, "the task was cancelled")
    outcome = await job
    assert outcome["cancelled"]
    assert rig.answers(task) == []


async def test_drain_leaves_level_1_even_when_the_engine_turns_the_cut_into_an_error() -> None:
    rig, task, job = await _generating_on_swallowing_engine(BATCH)
    assert await rig.runner.drain(0) == 1
    outcome = await job
    assert outcome["answered"] is False
    assert rig.answers(task) == []
    assert rig.runner.metrics.total("left_for_redelivery") == 1


async def test_deadline_is_408_even_when_the_engine_turns_it_into_an_error() -> None:
    rig, _ = _swallowing_rig()
    task = make_task(CALLBACK, expire_in_ms=200)
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 408


# -- a dead engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [BLOCKING, CALLBACK, STREAMING])
async def test_an_engine_dying_before_the_task_answers_hands_it_back(
    rig: Rig, mode: ResponseMode
) -> None:
    rig.engine.script(EngineDeadError("the engine died: EngineCore encountered an issue"))
    task = make_task(mode, level=1 if mode is CALLBACK else 0)
    outcome = await rig.run(task)
    assert outcome["retry"] is True
    assert outcome["answered"] is False
    assert rig.answers(task) == []  # another replica runs it from the start
    assert rig.events.progress_of(task.task_id) == []


async def test_an_engine_dying_mid_stream_ends_the_stream_with_one_503(rig: Rig) -> None:
    rig.engine.script(CHUNKS[0], CHUNKS[1], EngineDeadError("the engine died"))
    task = make_task(STREAMING)
    outcome = await rig.run(task)
    assert outcome["retry"] is False
    answer = rig.only_answer(task)
    assert answer["status_code"] == 503
    progress = rig.events.progress_of(task.task_id)
    assert [e.event_id for e in progress] == ["0", "1", "2"]
    assert progress[-1].data["error"]["code"] == "engine_failed"
