"""Dispatcher (the poller's control plane): routing, the poller's own answers, retries before a
replica answered, the safety net when a replica dies after, redeliveries, drain and capacity.

``FakeReplicas`` runs a real ``TaskRunner`` on a ``FakeEngine`` per model unless a scripted
step makes the call fail (``fakes.py``); running and answering a task is ``test_runner.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ray_worker.bella.protocol import STREAM_DONE, Level, ResponseMode, Task
from ray_worker.config import CapacityConfig, DispatcherConfig, QueueSpec
from ray_worker.errors import EngineDeadError, EngineOverloadedError, ReplicaUnavailableError
from ray_worker.hop import ACCEPTED, ANSWERING, DONE
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher
from tests.unit.fakes import (
    DieAfterAnswering,
    FakeCompleter,
    FakeEventSink,
    FakeReplicas,
    Recorded,
    level_of,
    make_task,
    settle,
    until,
)

STREAMING = ResponseMode.STREAMING
BLOCKING = ResponseMode.BLOCKING
CALLBACK = ResponseMode.CALLBACK
BATCH = ResponseMode.BATCH

CHUNKS = [{"id": "c", "choices": [{"delta": {"content": t}}]} for t in ("Hel", "lo", "!")]
RESPONSE = {
    "id": "r",
    "object": "chat.completion",
    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
}


class Rig:
    """A dispatcher over fake replicas (real runners on a fake engine), with room to take."""

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("m",),
        queues: list[QueueSpec] | None = None,
        completer: FakeCompleter | None = None,
        lora_models: tuple[str, ...] = (),
        redelivers: bool = True,
        **config: Any,
    ) -> None:
        settings: dict[str, Any] = {
            "overload_retry_initial_s": 0.001,
            "overload_retry_max_s": 0.004,
            "max_replica_retries": 2,
            **config,
        }
        self.config = DispatcherConfig(**settings)
        self.events = FakeEventSink()
        self.completer = completer or FakeCompleter()
        self.replicas = FakeReplicas(models, self.events, self.completer, config=self.config)
        self.engine = self.replicas.engine
        self.engine.default = [RESPONSE]
        self.capacity = CapacityTracker(CapacityConfig(), list(models))
        for model in models:
            self.capacity.report(
                {"replica_id": f"r-{model}", "model_id": model, "max_num_seqs": 64}
            )
        self.releases: list[tuple[str, Level, str | None]] = []
        self.released_n: dict[str | None, list[int]] = {}
        release = self.capacity.release

        def recording_release(
            model_id: str, level: Level, n: int = 1, *, task_id: str | None = None
        ) -> None:
            self.releases.append((model_id, level, task_id))
            self.released_n.setdefault(task_id, []).append(n)
            release(model_id, level, n, task_id=task_id)

        self.capacity.release = recording_release  # type: ignore[method-assign]
        self.dispatcher = Dispatcher(
            replicas=self.replicas,
            events=self.events,
            completer=self.completer,
            capacity=self.capacity,
            queues=queues or [],
            served_models=list(models),
            lora_models=lora_models,
            config=self.config,
            redelivers=redelivers,
        )
        self.pool = models[0]

    def submit(self, task: Task, pool: str | None = None) -> bool:
        """Count the task against capacity (its fan-out), as the poller does, and submit it."""
        pool = pool or self.pool
        n = self.dispatcher.fan_out(task)
        self.capacity.acquire(pool, level_of(task), n, task_id=task.task_id)
        accepted = self.dispatcher.submit(task, pool, n)
        if not accepted:
            self.capacity.release(pool, level_of(task), n, task_id=task.task_id)
        return accepted

    async def run(self, task: Task, pool: str | None = None) -> None:
        """Submit and wait until the dispatcher is done with the task."""
        assert self.submit(task, pool)
        await until(lambda: not self.dispatcher.holds(task.task_id))

    async def idle(self) -> None:
        await until(lambda: self.dispatcher.in_flight == 0)
        await until(lambda: all(r.in_flight == 0 for r in self.replicas.runners.values()))

    def answers(self, task: Task) -> list[dict[str, Any]]:
        """Every answer the task got: completion events plus HTTP completes."""
        return self.events.completions_of(task.task_id) + self.completer.of(task.task_id)

    def only_answer(self, task: Task) -> dict[str, Any]:
        answers = self.answers(task)
        assert len(answers) == 1, answers
        return answers[0]

    def in_flight(self) -> int:
        return self.capacity.in_flight(self.pool)

    def released(self, task: Task) -> list[tuple[str, Level, str | None]]:
        return [r for r in self.releases if r[2] == task.task_id]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.dispatcher.drain(0)
    for runner in r.replicas.runners.values():
        await runner.drain(0)


def kinds_and_ids(rig: Rig, task: Task) -> list[tuple[str, str | None]]:
    return [(e.kind, e.event_id) for e in rig.events.for_task(task.task_id)]


def error_code(answer: dict[str, Any]) -> Any:
    return answer["body"]["error"]["code"]


# -- a whole run through a replica -----------------------------------------------------------


async def test_a_task_runs_in_its_replica_and_the_outcome_is_counted(rig: Rig) -> None:
    rig.engine.script(*CHUNKS)
    task = make_task(STREAMING, model="m")
    await rig.run(task)

    (call,) = rig.replicas.calls
    assert (call.model_id, call.task_id) == ("m", task.task_id)
    assert [m["phase"] for m in call.messages] == [ACCEPTED, ANSWERING, DONE]
    assert call.messages[-1]["outcome"]["status_code"] == 200
    assert [e.data for e in rig.events.progress_of(task.task_id)] == [*CHUNKS, STREAM_DONE]
    assert rig.only_answer(task) == {"status_code": 200, "request_id": task.task_id}
    assert rig.dispatcher.answered == {"2xx": 1, "4xx": 0, "5xx": 0}
    assert rig.released(task) == [("m", Level.ONLINE, task.task_id)]


async def test_answers_and_tokens_are_counted_from_outcomes(rig: Rig) -> None:
    await rig.run(make_task(BLOCKING))
    await rig.run(make_task(CALLBACK, level=1))
    await rig.run(make_task(CALLBACK, endpoint="/v1/images/generations"))  # the replica's 400
    await rig.run(make_task(CALLBACK, model="nope"))  # the poller's 404
    assert rig.dispatcher.answered == {"2xx": 2, "4xx": 2, "5xx": 0}
    assert rig.dispatcher.tokens == {"prompt": 14, "completion": 4}
    # The replica counts its own completions; the poller counts only its own answers.
    assert rig.dispatcher.metrics.total("tasks_completed") == 1
    assert rig.dispatcher.metrics.total("tasks_completed", status="4xx") == 1


async def test_tasks_run_concurrently(rig: Rig) -> None:
    gate = asyncio.Event()
    for _ in range(3):
        rig.engine.script(gate, RESPONSE)
    tasks = [make_task(CALLBACK) for _ in range(3)]
    for task in tasks:
        assert rig.submit(task)
    await until(lambda: rig.engine.active == 3)
    assert rig.dispatcher.in_flight == 3
    assert all(rig.dispatcher.holds(t.task_id) for t in tasks)
    gate.set()
    await rig.idle()
    assert all(len(rig.answers(t)) == 1 for t in tasks)


# -- model routing ---------------------------------------------------------------------------


async def test_served_model_is_routed_to_and_holds_that_models_capacity() -> None:
    rig = Rig(models=("a", "b"))
    gate = asyncio.Event()
    rig.engine.script(gate, RESPONSE)
    task = make_task(CALLBACK, model="b")
    assert rig.submit(task, pool="a")
    await until(lambda: rig.engine.active == 1)
    # Taken from a's queue, it runs on b: b's capacity counts it, a's no longer does.
    assert (rig.capacity.in_flight("a"), rig.capacity.in_flight("b")) == (0, 1)
    gate.set()
    await until(lambda: not rig.dispatcher.holds(task.task_id))
    assert [(c.model_id, c.task_id) for c in rig.replicas.calls] == [("b", task.task_id)]
    assert rig.only_answer(task)["status_code"] == 200
    assert rig.released(task) == [
        ("a", Level.OFFLINE, task.task_id),  # moved to the model it runs on
        ("b", Level.OFFLINE, task.task_id),  # its end
    ]
    assert (rig.capacity.in_flight("a"), rig.capacity.in_flight("b")) == (0, 0)


async def test_missing_model_uses_the_queue_default() -> None:
    rig = Rig(models=("a", "b"), queues=[QueueSpec(name="q:1", model="b")])
    task = make_task(CALLBACK, queue="q", level=1)
    await rig.run(task, pool="b")
    assert [c.model_id for c in rig.replicas.calls] == ["b"]


async def test_missing_model_uses_the_sole_served_model(rig: Rig) -> None:
    task = make_task(CALLBACK)
    assert "model" not in task.data
    await rig.run(task)
    assert [c.model_id for c in rig.replicas.calls] == ["m"]


async def test_missing_model_with_several_served_is_400() -> None:
    rig = Rig(models=("a", "b"))
    task = make_task(CALLBACK)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 400
    assert answer["body"]["error"]["param"] == "model"
    assert rig.replicas.calls == []


async def test_non_string_model_is_400(rig: Rig) -> None:
    task = make_task(CALLBACK, data={"model": 7})
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 400
    assert answer["body"]["error"]["param"] == "model"
    assert rig.replicas.calls == []


async def test_unknown_model_is_404_by_the_poller(rig: Rig) -> None:
    task = make_task(BLOCKING, model="gpt-9")
    await rig.run(task)
    assert rig.events.for_task(task.task_id) == [
        Recorded(
            "completion",
            task.task_id,
            task.instance_id,
            data={
                "status_code": 404,
                "request_id": task.task_id,
                "body": {
                    "error": {
                        "message": (
                            "The model 'gpt-9' does not exist or is not served by this worker"
                        ),
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": "model_not_found",
                    }
                },
            },
        )
    ]
    assert rig.completer.completes == []
    assert rig.replicas.calls == []
    assert rig.dispatcher.answered == {"2xx": 0, "4xx": 1, "5xx": 0}


async def test_unknown_model_of_a_streaming_task_is_an_error_chunk_then_completion(
    rig: Rig,
) -> None:
    task = make_task(STREAMING, model="gpt-9")
    await rig.run(task)
    events = rig.events.for_task(task.task_id)
    assert kinds_and_ids(rig, task) == [("progress", "0"), ("completion", None)]
    assert events[0].data["error"]["code"] == "model_not_found"
    assert events[1].data["status_code"] == 404


@pytest.mark.parametrize(("mode", "level"), [(CALLBACK, 0), (CALLBACK, 1), (BATCH, 1)])
async def test_unknown_model_of_an_offline_task_is_completed_over_http(
    rig: Rig, mode: ResponseMode, level: int
) -> None:
    task = make_task(mode, level=level, model="gpt-9")
    await rig.run(task)
    assert rig.events.events == []
    (answer,) = rig.completer.of(task.task_id)
    assert answer["status_code"] == 404
    assert error_code(answer) == "model_not_found"


# -- LoRA adapters ---------------------------------------------------------------------------


async def test_adapter_task_goes_to_its_base_model_multiplexed_and_counts_against_it() -> None:
    rig = Rig(models=("base", "other"), lora_models=("base",))
    task = make_task(BLOCKING, model="base:my-adapter")
    assert rig.submit(task, pool="base")
    assert rig.capacity.snapshot()["base"]["in_flight_online"] == 1
    await until(lambda: not rig.dispatcher.holds(task.task_id))
    (call,) = rig.replicas.calls
    assert (call.model_id, call.multiplexed_model_id) == ("base", "base:my-adapter")
    assert rig.releases == [("base", 0, task.task_id)]
    assert rig.only_answer(task)["status_code"] == 200


async def test_base_model_task_is_not_multiplexed() -> None:
    rig = Rig(models=("base",), lora_models=("base",))
    task = make_task(BLOCKING, model="base")
    await rig.run(task)
    (call,) = rig.replicas.calls
    assert (call.model_id, call.multiplexed_model_id) == ("base", None)


@pytest.mark.parametrize(
    ("lora_models", "model"),
    [
        ((), "base:my-adapter"),  # the base takes no adapters
        (("base",), "base:"),  # no adapter name
        (("base",), "base:../etc"),  # not a plain directory name
        (("base",), "base:.hidden"),
        (("base",), "other:my-adapter"),  # no such base
    ],
)
async def test_adapter_of_a_model_without_adapters_is_404_by_the_poller(
    lora_models: tuple[str, ...], model: str
) -> None:
    rig = Rig(models=("base",), lora_models=lora_models)
    task = make_task(BLOCKING, model=model)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 404
    assert error_code(answer) == "model_not_found"
    assert rig.replicas.calls == []


# -- deadlines -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [BLOCKING, STREAMING, CALLBACK, BATCH])
async def test_expired_task_is_408_by_the_poller(rig: Rig, mode: ResponseMode) -> None:
    task = make_task(mode, expire_in_ms=-1)
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 408
    assert error_code(answer) == "task_expired"
    assert rig.replicas.calls == []
    assert rig.engine.calls == []
    assert rig.dispatcher.answered["4xx"] == 1


# -- replica failures ------------------------------------------------------------------------


async def test_call_failing_before_answering_is_retried(rig: Rig) -> None:
    rig.replicas.script(ReplicaUnavailableError("no replica"), ReplicaUnavailableError("again"))
    rig.engine.script(*CHUNKS)
    task = make_task(STREAMING)
    await rig.run(task)
    assert len(rig.replicas.calls_for(task.task_id)) == 3
    assert len(rig.engine.calls) == 1  # only the third call reached the engine
    assert [(e.event_id, e.data) for e in rig.events.progress_of(task.task_id)] == [
        ("0", CHUNKS[0]),
        ("1", CHUNKS[1]),
        ("2", CHUNKS[2]),
        ("3", STREAM_DONE),
    ]
    assert rig.only_answer(task)["status_code"] == 200
    assert rig.dispatcher.answered == {"2xx": 1, "4xx": 0, "5xx": 0}


async def test_retries_exhausted_is_503(rig: Rig) -> None:
    rig.replicas.script(*(ReplicaUnavailableError("no replica") for _ in range(3)))
    task = make_task(CALLBACK)
    await rig.run(task)
    assert len(rig.replicas.calls) == 3  # first try + max_replica_retries
    assert rig.engine.calls == []
    answer = rig.only_answer(task)
    assert answer["status_code"] == 503
    assert error_code(answer) == "overloaded"
    assert "'m'" in answer["body"]["error"]["message"]
    assert rig.dispatcher.answered == {"2xx": 0, "4xx": 0, "5xx": 1}


async def test_replica_dying_after_answering_streaming_gets_one_503_chunk(rig: Rig) -> None:
    rig.replicas.script(DieAfterAnswering(chunks=2))
    task = make_task(STREAMING)
    await rig.run(task)
    assert len(rig.replicas.calls) == 1  # not retried: the producer already saw output
    events = rig.events.for_task(task.task_id)
    assert kinds_and_ids(rig, task) == [
        ("progress", "0"),
        ("progress", "1"),
        ("progress", "error"),
        ("completion", None),
    ]
    error = events[2].data["error"]
    assert error["code"] == "replica_failed"
    assert error["type"] == "server_error"
    assert events[3].data == {
        "status_code": 503,
        "request_id": task.task_id,
        "body": events[2].data,
    }
    assert rig.dispatcher.metrics.total("replica_failures") == 1
    assert rig.dispatcher.answered == {"2xx": 0, "4xx": 0, "5xx": 1}


@pytest.mark.parametrize(
    ("mode", "level", "redelivers"),
    [(BLOCKING, 0, True), (CALLBACK, 0, True), (CALLBACK, 1, False), (BATCH, 1, False)],
)
async def test_replica_dying_after_answering_gets_one_503(
    mode: ResponseMode, level: int, redelivers: bool
) -> None:
    rig = Rig(redelivers=redelivers)
    rig.replicas.script(DieAfterAnswering())
    task = make_task(mode, level=level)
    await rig.run(task)
    assert len(rig.replicas.calls) == 1
    answer = rig.only_answer(task)
    assert answer["status_code"] == 503
    assert error_code(answer) == "replica_failed"
    assert rig.events.progress_of(task.task_id) == []


@pytest.mark.parametrize("mode", [CALLBACK, BATCH])
async def test_replica_dying_mid_answer_leaves_a_level_1_task_for_redelivery(
    rig: Rig, mode: ResponseMode
) -> None:
    # Its answer may have left the replica already: a 503 now could be a second, final answer.
    rig.replicas.script(DieAfterAnswering())
    task = make_task(mode, level=1)
    await rig.run(task)
    assert len(rig.replicas.calls) == 1
    assert rig.answers(task) == []
    assert rig.dispatcher.metrics.total("left_for_redelivery") == 1
    assert rig.dispatcher.metrics.total("replica_failures") == 1


class _Blip:
    """A replica call that breaks after the replica accepted the task, while the replica
    (a real runner) goes on running it: a network blip, not a death."""

    def __init__(self, rig: Rig, after: str) -> None:
        self.rig = rig
        self.after = after

    async def run(
        self, model_id: str, task: Task, *, multiplexed_model_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        runner = self.rig.replicas.runners[model_id]
        answering = asyncio.Event()
        runner.start(task, on_answering=answering.set)
        yield {"phase": ACCEPTED, "replica_id": "r-m"}
        if self.after == ANSWERING:
            await answering.wait()
            yield {"phase": ANSWERING}
        raise ReplicaUnavailableError("ActorUnavailableError: the connection dropped")


def _report(rig: Rig, held: list[str]) -> None:
    rig.capacity.report(
        {"replica_id": "r-m", "model_id": "m", "max_num_seqs": 64, "held_ids": held}
    )


@pytest.mark.parametrize("after", [ACCEPTED, ANSWERING])
async def test_a_broken_call_to_a_live_replica_is_neither_rerun_nor_answered(
    rig: Rig, after: str
) -> None:
    gate = asyncio.Event()
    rig.engine.script(CHUNKS[0], gate, CHUNKS[1], CHUNKS[2])
    rig.dispatcher.replicas = _Blip(rig, after)
    task = make_task(STREAMING)
    assert rig.submit(task)
    await until(lambda: rig.engine.active == 1)
    await settle()
    # The replica's next load report still lists the task: the poller waits for it.
    _report(rig, [task.task_id])
    await settle()
    assert rig.dispatcher.holds(task.task_id)
    assert rig.answers(task) == []
    gate.set()
    await until(lambda: rig.replicas.runners["m"].in_flight == 0)
    _report(rig, [])  # ended there
    await until(lambda: not rig.dispatcher.holds(task.task_id))

    assert rig.only_answer(task) == {"status_code": 200, "request_id": task.task_id}
    assert [e.event_id for e in rig.events.progress_of(task.task_id)] == ["0", "1", "2", "3"]
    assert len(rig.engine.calls) == 1  # never run twice
    assert rig.dispatcher.metrics.total("replica_failures") == 0
    assert rig.released(task) == [("m", Level.ONLINE, task.task_id)]


async def test_a_broken_call_whose_replica_stops_reporting_gets_the_safety_net() -> None:
    rig = Rig()
    rig.capacity.config = CapacityConfig(load_stale_after_s=0.2)
    gate = asyncio.Event()
    rig.engine.script(CHUNKS[0], gate)
    rig.dispatcher.replicas = _Blip(rig, ANSWERING)
    task = make_task(STREAMING)
    assert rig.submit(task)
    # No report comes any more (the replica died): once its reports are stale, one 503.
    await until(lambda: not rig.dispatcher.holds(task.task_id))
    answers = rig.events.completions_of(task.task_id)
    assert [a["status_code"] for a in answers] == [503]
    assert rig.dispatcher.metrics.total("replica_failures") == 1
    gate.set()
    await rig.replicas.runners["m"].drain(0)


async def test_any_other_call_failure_is_retried_then_answered(rig: Rig) -> None:
    rig.replicas.script(RuntimeError("RaySystemError: something Ray-internal"))
    task = make_task(BLOCKING)
    await rig.run(task)
    assert len(rig.replicas.calls) == 2
    assert rig.only_answer(task)["status_code"] == 200


async def test_a_task_waiting_for_a_replica_when_the_drain_ends_is_refused() -> None:
    # Queued at a Serve handle (no replica took it): at the end of the drain the poller answers.
    rig = Rig()
    online, offline = make_task(BLOCKING), make_task(CALLBACK, level=1)
    rig.replicas.script(asyncio.Event(), asyncio.Event())
    for task in (online, offline):
        assert rig.submit(task)
    await until(lambda: len(rig.replicas.calls) == 2)
    assert await rig.dispatcher.drain(0.01) == 2
    assert rig.only_answer(online)["status_code"] == 503
    assert rig.answers(offline) == []
    assert rig.dispatcher.metrics.total("left_for_redelivery") == 1


async def test_without_redelivery_a_stop_answers_level_1_503() -> None:
    rig = Rig(redelivers=False)
    await rig.dispatcher.drain(0)
    task = make_task(CALLBACK, level=1)
    assert rig.submit(task)
    await rig.idle()
    assert rig.only_answer(task)["status_code"] == 503
    assert rig.dispatcher.metrics.total("left_for_redelivery") == 0


async def test_a_replica_refusing_while_the_poller_stops_is_not_an_overload_answer() -> None:
    rig = Rig()
    task = make_task(CALLBACK, level=1)
    rig.replicas.script(
        ReplicaUnavailableError("the replica died"),
        ReplicaUnavailableError("this replica is stopping"),
    )
    assert rig.submit(task)
    await until(lambda: len(rig.replicas.calls) == 1)
    # The poller stops while the task waits to be retried: the retry meets a stopping replica.
    assert await rig.dispatcher.drain(5) == 0
    assert len(rig.replicas.calls) == 2
    assert rig.answers(task) == []  # left for redelivery, not a final 503
    assert rig.dispatcher.metrics.total("left_for_redelivery") == 1


async def test_a_task_handed_back_by_a_dead_engine_runs_again_and_is_answered_once(
    rig: Rig,
) -> None:
    # The first replica's engine dies under the task; the next call runs it.
    rig.engine.script(EngineDeadError("the engine died"))
    task = make_task(BLOCKING)
    await rig.run(task)
    assert len(rig.replicas.calls) == 2
    assert len(rig.engine.calls) == 2
    assert rig.only_answer(task)["status_code"] == 200


async def test_a_replica_with_a_dead_engine_is_waited_out_not_answered_503(rig: Rig) -> None:
    # More refusals than max_replica_retries: the task waits for a live replica meanwhile.
    rig.replicas.script(*(EngineDeadError("the engine of this replica died") for _ in range(4)))
    task = make_task(CALLBACK, level=1)
    await rig.run(task)
    assert len(rig.replicas.calls) == 5
    assert rig.only_answer(task)["status_code"] == 200


async def test_overload_is_waited_out_then_runs(rig: Rig) -> None:
    rig.replicas.script(EngineOverloadedError("queue full"), EngineOverloadedError("still"))
    task = make_task(BLOCKING)
    await rig.run(task)
    assert len(rig.replicas.calls) == 3
    assert rig.only_answer(task)["status_code"] == 200


async def test_overload_that_outlives_the_deadline_is_503() -> None:
    rig = Rig()
    rig.replicas.script(*(EngineOverloadedError("queue full") for _ in range(10_000)))
    task = make_task(CALLBACK, expire_in_ms=200)
    await rig.run(task)
    assert len(rig.replicas.calls) >= 2
    assert rig.engine.calls == []
    answer = rig.only_answer(task)
    assert answer["status_code"] == 503
    assert error_code(answer) == "overloaded"


# -- redeliveries ----------------------------------------------------------------------------


async def test_redelivery_of_a_task_in_flight_is_ignored(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.engine.script(gate, RESPONSE)
    task = make_task(CALLBACK, level=1)
    assert rig.submit(task)
    await until(lambda: rig.engine.active == 1)
    assert rig.submit(task) is False
    assert rig.dispatcher.metrics.total("duplicates") == 1
    assert rig.in_flight() == 1
    gate.set()
    await rig.idle()
    assert len(rig.replicas.calls) == 1
    assert len(rig.answers(task)) == 1
    assert rig.in_flight() == 0


async def test_redelivery_of_a_recently_answered_online_task_is_ignored(rig: Rig) -> None:
    task = make_task(BLOCKING)
    await rig.run(task)
    assert rig.submit(task) is False
    await settle()
    assert len(rig.replicas.calls) == 1
    assert len(rig.answers(task)) == 1
    assert rig.in_flight() == 0


async def test_redelivery_of_an_offline_task_runs_it_again(rig: Rig) -> None:
    # The server redelivers an offline task only when it saw no complete: run it again.
    task = make_task(CALLBACK, level=1)
    await rig.run(task)
    assert rig.submit(task) is True
    await rig.idle()
    assert len(rig.replicas.calls) == 2
    assert [a["status_code"] for a in rig.answers(task)] == [200, 200]
    assert rig.in_flight() == 0


async def test_remembered_tasks_are_bounded() -> None:
    rig = Rig(remember_completed=2)
    tasks = [make_task(BLOCKING) for _ in range(3)]
    for task in tasks:
        await rig.run(task)
    assert rig.submit(tasks[0]) is True  # forgotten: run again
    assert rig.submit(tasks[2]) is False  # still remembered
    await rig.idle()
    assert len(rig.replicas.calls) == 4


# -- the poller's answers --------------------------------------------------------------------


async def test_poller_answer_delivery_failure_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(completer=FakeCompleter(fail_times=1))
    task = make_task(CALLBACK, model="nope")
    with caplog.at_level(logging.ERROR, logger="ray_worker.worker.dispatcher"):
        await rig.run(task)
    assert rig.completer.attempts == [task.task_id]
    assert rig.dispatcher.metrics.total("complete_failures") == 1
    assert "could not deliver the answer" in caplog.text
    assert "crashed" not in caplog.text
    assert "ak-secret" not in caplog.text
    assert rig.in_flight() == 0


# -- drain -----------------------------------------------------------------------------------


async def test_drain_with_nothing_in_flight(rig: Rig) -> None:
    assert await rig.dispatcher.drain(0.01) == 0


async def test_drain_waits_for_tasks_that_finish_in_time(rig: Rig) -> None:
    task = make_task(CALLBACK, level=1)
    assert rig.submit(task)
    assert await rig.dispatcher.drain(10) == 0
    assert rig.only_answer(task)["status_code"] == 200


@pytest.mark.parametrize(("mode", "level"), [(STREAMING, 0), (CALLBACK, 1)])
async def test_drain_leaves_a_task_in_a_replica_call_to_its_replica(
    rig: Rig, mode: ResponseMode, level: int
) -> None:
    gate = asyncio.Event()
    rig.engine.script(CHUNKS[0], gate, CHUNKS[1])
    task = make_task(mode, level=level)
    assert rig.submit(task)
    await until(lambda: rig.engine.active == 1)

    assert await rig.dispatcher.drain(0.01) == 1
    assert rig.answers(task) == []  # not answered by the poller
    assert rig.dispatcher.in_flight == 0
    assert rig.released(task) == [("m", level_of(task), task.task_id)]

    gate.set()  # the replica finishes the task and answers it, once
    await rig.idle()
    assert rig.only_answer(task)["status_code"] == 200
    assert rig.dispatcher.metrics.total("left_for_redelivery") == 0
    assert len(rig.released(task)) == 1


async def test_drain_answers_tasks_not_in_a_call_503_online_and_leaves_level_1() -> None:
    rig = Rig(overload_retry_initial_s=30, overload_retry_max_s=30)
    online = [make_task(STREAMING), make_task(BLOCKING), make_task(CALLBACK, level=0)]
    offline = [make_task(CALLBACK, level=1), make_task(BATCH, level=1)]
    rig.replicas.script(*(EngineOverloadedError("queue full") for _ in range(5)))
    for task in [*online, *offline]:
        assert rig.submit(task)
    await until(lambda: len(rig.replicas.calls) == 5)
    await settle()

    assert await rig.dispatcher.drain(0.01) == 5

    for task in online:
        answer = rig.only_answer(task)
        assert answer["status_code"] == 503
        assert error_code(answer) == "overloaded"
        assert "shutting down" in answer["body"]["error"]["message"]
    assert kinds_and_ids(rig, online[0]) == [("progress", "0"), ("completion", None)]
    for task in offline:
        assert rig.answers(task) == []  # the server redelivers it after process_timeout
    assert rig.dispatcher.metrics.total("left_for_redelivery") == 2
    assert rig.dispatcher.answered == {"2xx": 0, "4xx": 0, "5xx": 3}
    assert rig.engine.calls == []
    assert rig.in_flight() == 0
    assert sorted(r[2] or "" for r in rig.releases) == sorted(
        t.task_id for t in [*online, *offline]
    )


@pytest.mark.parametrize(("mode", "level", "status"), [(BLOCKING, 0, 503), (CALLBACK, 0, 503)])
async def test_submit_after_drain_is_answered_503_without_a_call(
    rig: Rig, mode: ResponseMode, level: int, status: int
) -> None:
    await rig.dispatcher.drain(0)
    task = make_task(mode, level=level)
    assert rig.submit(task)
    await rig.idle()
    assert rig.replicas.calls == []
    assert rig.only_answer(task)["status_code"] == status
    assert rig.in_flight() == 0


@pytest.mark.parametrize("mode", [CALLBACK, BATCH])
async def test_level_1_submit_after_drain_is_left_for_redelivery(
    rig: Rig, mode: ResponseMode
) -> None:
    await rig.dispatcher.drain(0)
    task = make_task(mode, level=1)
    assert rig.submit(task)
    await rig.idle()
    assert rig.replicas.calls == []
    assert rig.answers(task) == []
    assert rig.dispatcher.metrics.total("left_for_redelivery") == 1
    assert rig.in_flight() == 0


# -- capacity --------------------------------------------------------------------------------


async def test_capacity_is_released_exactly_once_per_task(rig: Rig) -> None:
    rig.engine.script(RESPONSE)
    rig.replicas.script(
        DieAfterAnswering(),
        *(ReplicaUnavailableError("gone") for _ in range(3)),
    )
    tasks = [
        make_task(STREAMING),  # dies after answering: the poller's 503
        make_task(BLOCKING),  # retries exhausted: the poller's 503
        make_task(CALLBACK, level=1),  # runs in a replica
        make_task(CALLBACK, expire_in_ms=-1),  # 408
        make_task(BLOCKING, model="unknown"),  # 404
    ]
    for task in tasks:
        assert rig.submit(task)
    assert rig.in_flight() == len(tasks)
    duplicate = tasks[2]
    assert rig.submit(duplicate) is False  # released at once by the caller, not by the dispatcher
    await rig.idle()
    assert rig.capacity.model("m").in_flight == {Level.ONLINE: 0, Level.OFFLINE: 0}
    assert rig.in_flight() == 0
    for task in tasks:
        expected = 2 if task is duplicate else 1
        assert rig.released(task) == [("m", level_of(task), task.task_id)] * expected
        assert len(rig.answers(task)) == 1
    # A replica's late report still listing them does not count them as held by others.
    rig.capacity.report(
        {
            "replica_id": "r-m",
            "model_id": "m",
            "max_num_seqs": 64,
            "held_ids": [t.task_id for t in tasks],
        }
    )
    assert rig.capacity.in_flight("m") == 0


# --------------------------------------------------------------------------------------
# reject: a taken entry the Task model could not read
# --------------------------------------------------------------------------------------


def _raw(mode: str, task_id: str, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "task_id": task_id,
        "ak": "sk-secret",
        "response_mode": mode,
        "data": ["not", "an", "object"],
    }
    if mode in ("blocking", "streaming"):
        raw["instance_id"] = "10.0.0.5:8080"
    return raw | extra


@pytest.mark.parametrize("mode", ["blocking", "streaming", "callback", "batch", "carrier"])
async def test_reject_answers_400_on_the_tasks_own_return_path(rig: Rig, mode: str) -> None:
    task_id = f"T-bad-{mode}"
    assert rig.dispatcher.reject(_raw(mode, task_id), "data: Input should be a valid dictionary")
    await rig.idle()
    online = mode in ("blocking", "streaming")
    answers = rig.events.completions_of(task_id) if online else rig.completer.of(task_id)
    assert len(answers) == 1
    assert answers == rig.events.completions_of(task_id) + rig.completer.of(task_id)
    (answer,) = answers
    assert answer["status_code"] == 400
    error = answer["body"]["error"]
    assert error["type"] == "invalid_request_error"
    assert "data: Input should be a valid dictionary" in error["message"]
    if mode == "streaming":
        (chunk,) = rig.events.progress_of(task_id)
        assert (chunk.event_id, chunk.data) == ("0", answer["body"])
    assert rig.dispatcher.answered["4xx"] == 1
    assert rig.replicas.calls == []
    assert rig.releases == []  # no capacity was held for it


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "junk",
        {"ak": "sk-secret"},
        {"task_id": 5, "ak": "sk-secret"},
        {"task_id": "T", "response_mode": "blocking", "ak": "sk-secret"},
    ],
)
async def test_reject_without_id_or_return_path_is_logged_and_counted(
    rig: Rig, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert rig.dispatcher.reject(raw, "task_id: Field required") is False
    await settle()
    assert rig.events.events == []
    assert rig.completer.completes == []
    assert rig.dispatcher.metrics.total("invalid_tasks_dropped") == 1
    assert any("dropping an unreadable task" in r.getMessage() for r in caplog.records)
    assert all("sk-secret" not in r.getMessage() for r in caplog.records)


async def test_reject_does_not_answer_a_task_in_flight_or_answered_online(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.replicas.script(gate)
    task = make_task(BLOCKING)
    assert rig.submit(task)
    await settle()
    raw = _raw("blocking", task.task_id)
    assert rig.dispatcher.reject(raw, "data: bad") is False
    gate.set()
    await rig.idle()
    assert rig.dispatcher.reject(raw, "data: bad") is False
    assert [a["status_code"] for a in rig.answers(task)] == [200]


async def test_drain_waits_for_rejections(rig: Rig) -> None:
    rig.events.completion_delay_s = 0.05
    assert rig.dispatcher.reject(_raw("blocking", "T-slow"), "data: bad")
    assert rig.dispatcher.in_flight == 1
    assert await rig.dispatcher.drain(5) == 0
    assert [a["status_code"] for a in rig.events.completions_of("T-slow")] == [400]


# --------------------------------------------------------------------------------------
# limits on one task: 400 by the poller, before a replica; fan-out held and released once
# --------------------------------------------------------------------------------------


OVER_LIMITS = [
    ({"n": 17}, "n"),
    ({"best_of": 17}, "best_of"),
    ({"max_tokens": 101}, "max_tokens"),
    ({"max_completion_tokens": 101}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 1001}]}, "messages"),
    ({"prompt": ["x" * 1000, "y"]}, "prompt"),
    ({"input": "x" * 1001}, "input"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"s": "x" * 500}}},
        "response_format",
    ),
    ({"guided_regex": "x" * 501}, "guided_regex"),
]
AT_LIMITS = [
    {"n": 16, "best_of": 16, "max_tokens": 100, "max_completion_tokens": 100},
    {"messages": [{"role": "user", "content": "x" * 1000}], "guided_regex": "x" * 500},
    {"prompt": ["x" * 999, "y"], "structured_outputs": {"regex": "x" * 488}},
]
LIMITS = {"max_output_tokens": 100, "max_prompt_chars": 1000, "max_grammar_chars": 500}


@pytest.mark.parametrize(("data", "param"), OVER_LIMITS)
@pytest.mark.parametrize("mode", [BLOCKING, CALLBACK])
async def test_a_task_over_a_limit_is_400_by_the_poller_and_never_reaches_a_replica(
    data: dict[str, Any], param: str, mode: ResponseMode
) -> None:
    rig = Rig(**LIMITS)
    task = make_task(mode, data={"messages": [{"role": "user", "content": "hi"}], **data})
    await rig.run(task)
    answer = rig.only_answer(task)
    assert answer["status_code"] == 400
    error = answer["body"]["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "(max_" in error["message"]
    assert rig.replicas.calls == []
    assert rig.dispatcher.answered == {"2xx": 0, "4xx": 1, "5xx": 0}
    assert rig.in_flight() == 0


async def test_a_streaming_task_over_a_limit_gets_an_error_chunk_then_its_completion() -> None:
    rig = Rig(**LIMITS)
    task = make_task(STREAMING, data={"messages": [], "max_tokens": 101})
    await rig.run(task)
    assert kinds_and_ids(rig, task) == [("progress", "0"), ("completion", None)]
    assert rig.only_answer(task)["status_code"] == 400
    assert rig.replicas.calls == []


@pytest.mark.parametrize("data", AT_LIMITS)
async def test_a_task_at_the_limits_runs(data: dict[str, Any]) -> None:
    rig = Rig(**LIMITS)
    task = make_task(CALLBACK, data=data)
    await rig.run(task)
    assert [c.task_id for c in rig.replicas.calls] == [task.task_id]
    assert rig.only_answer(task)["status_code"] == 200


async def test_each_queue_has_its_own_limits() -> None:
    rig = Rig(
        queues=[QueueSpec(name="tight:1", max_n=2), QueueSpec(name="open:1", max_n=None)],
        max_n=4,
    )
    data = {"messages": [{"role": "user", "content": "hi"}], "n": 3}
    tight = make_task(CALLBACK, queue="tight", level=1, data=data)
    wide = make_task(CALLBACK, queue="open", level=1, data={**data, "n": 100})
    other = make_task(CALLBACK, queue="other", level=1, data=data)  # worker-wide: 4
    for task in (tight, wide, other):
        await rig.run(task)
    assert rig.only_answer(tight)["status_code"] == 400
    assert "at most 2 (max_n)" in rig.only_answer(tight)["body"]["error"]["message"]
    assert sorted(c.task_id for c in rig.replicas.calls) == sorted([wide.task_id, other.task_id])


async def test_a_fanned_out_task_holds_n_and_releases_n_once(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.engine.script(gate, RESPONSE)
    task = make_task(CALLBACK, data={"messages": [{"role": "user", "content": "hi"}], "n": 4})
    assert rig.dispatcher.fan_out(task) == 4
    assert rig.submit(task)
    assert rig.in_flight() == 4
    assert rig.capacity.remaining("m", Level.ONLINE) == 80 - 4
    assert rig.submit(task) is False  # a redelivery: its caller's 4 come back at once
    assert rig.in_flight() == 4
    gate.set()
    await rig.idle()
    assert rig.in_flight() == 0
    assert rig.released_n[task.task_id] == [4, 4]  # the duplicate's and the task's own
    assert len(rig.answers(task)) == 1


async def test_a_task_over_max_n_holds_at_most_max_n_until_its_400() -> None:
    rig = Rig(max_n=8)
    task = make_task(BLOCKING, data={"messages": [], "n": 16384})
    assert rig.dispatcher.fan_out(task) == 8
    await rig.run(task)
    assert rig.only_answer(task)["status_code"] == 400
    assert rig.released_n[task.task_id] == [8]
    assert rig.in_flight() == 0


async def test_a_poller_answer_the_publisher_gave_up_is_not_counted_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ray_worker.errors import EventsGivenUpError

    rig = Rig()

    async def given_up(*_: Any) -> None:
        raise EventsGivenUpError("the publisher gave the task up")

    rig.dispatcher.events.completion = given_up  # type: ignore[method-assign]
    task = make_task(BLOCKING, model="nope")
    with caplog.at_level(logging.ERROR):
        await rig.run(task)
    # The publisher counted it (publish_failures, tasks_given_up) where it gave up.
    assert rig.dispatcher.metrics.total("publish_failures") == 0
    assert "could not deliver the answer" in caplog.text
    assert rig.in_flight() == 0
