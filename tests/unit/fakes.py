"""In-memory fakes of the dispatcher's and poller's outside world, for unit tests.

This module owns the fakes of the small protocols the worker's core logic talks through:
the task runner's ``Engine`` (``FakeEngine``), the dispatcher's ``Replicas`` (``FakeReplicas``,
which runs a real ``TaskRunner`` on a ``FakeEngine`` unless told to fail), ``EventSink``
(``FakeEventSink``), ``Completer`` (``FakeCompleter``) and ``Taker`` (``FakeTaker``), plus
``make_task`` and ``until`` (the shared ``wait_for`` with a polling interval fit for
in-memory fakes).
It must not touch the network, Ray or the wall clock beyond ``asyncio.sleep``: scripted
delays are given by the test and kept tiny.

Engine scripts are lists of steps, one list per engine call, consumed in order:

- a ``dict``: yielded as a chunk (streaming) or the response (non-streaming);
- a ``BaseException`` instance: raised at that point;
- ``Delay(seconds)``: ``asyncio.sleep``;
- an ``asyncio.Event``: waited for (a gate the test opens, or never opens).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_worker.bella.protocol import (
    Level,
    ResponseMode,
    TakeRequest,
    TakeResponse,
    Task,
    make_task_id,
    now_ms,
)
from ray_worker.errors import EventBusUnavailableError, QueueUnavailableError
from ray_worker.testing.waiting import wait_for

__all__ = [
    "Delay",
    "DieAfterAnswering",
    "EngineCall",
    "FakeCompleter",
    "FakeEngine",
    "FakeEventSink",
    "FakeReplicas",
    "FakeTaker",
    "Recorded",
    "ReplicaCall",
    "ReplicaStep",
    "by_queue",
    "level_of",
    "make_task",
    "settle",
    "until",
    "wait_for",
]


async def until(predicate: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """``wait_for`` with a fine polling interval (unit tests run on fakes, not servers)."""
    return await wait_for(predicate, timeout_s, interval=0.002)


async def settle(rounds: int = 20) -> None:
    """Let the event loop run ``rounds`` iterations (no wall-clock wait)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------

_serial = itertools.count(1)


def make_task(
    mode: ResponseMode | str = ResponseMode.CALLBACK,
    *,
    level: int | None = None,
    queue: str = "q",
    endpoint: str = "/v1/chat/completions",
    data: dict[str, Any] | None = None,
    model: str | None = None,
    expire_in_ms: int | None = 60_000,
    task_id: str | None = None,
    instance_id: str = "10.0.0.5:8080",
    start_time: int | None = None,
) -> Task:
    """A task as ``take`` would return it; online modes get level 0 and an ``instance_id``.

    ``expire_in_ms=None`` leaves ``expire_time`` unset (0); a negative value makes the task
    already expired.
    """
    mode = ResponseMode(mode)
    if level is None:
        level = 0 if mode.is_online else 1
    now = now_ms()
    body: dict[str, Any] = (
        dict(data) if data is not None else {"messages": [{"role": "user", "content": "hi"}]}
    )
    if model is not None:
        body["model"] = model
    wire: dict[str, Any] = {
        "task_id": task_id or make_task_id(7, level, mode, now, 1, next(_serial)),
        "ak": "ak-secret",
        "endpoint": endpoint,
        "queue": queue,
        "level": level,
        "data": body,
        "start_time": now if start_time is None else start_time,
        "expire_time": 0 if expire_in_ms is None else now + expire_in_ms,
        "response_mode": mode.value,
    }
    if mode.is_online or level == 0:
        wire["instance_id"] = instance_id
    if level == 1:
        wire.update(status="waiting", batch_id="", callback_url="", trace_id="")
    return Task.model_validate(wire)


# --------------------------------------------------------------------------------------
# Engine (inside a replica) and replicas (as the poller sees them)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delay:
    """A scripted pause inside an engine call."""

    seconds: float


Step = dict[str, Any] | BaseException | Delay | asyncio.Event


@dataclass
class EngineCall:
    """One call of ``Engine.stream`` as the task runner made it."""

    endpoint: str
    data: dict[str, Any]
    request_id: str
    priority: int
    yielded: int = 0
    finished: bool = False
    aborted: bool = False
    """The consumer closed or cancelled the stream (deadline, drain) before the script ended:
    what aborts the request in a real engine."""


class FakeEngine:
    """A scripted ``Engine``: each call plays the next script (or ``default``)."""

    def __init__(
        self,
        scripts: Iterable[list[Step]] = (),
        *,
        default: list[Step] | None = None,
    ) -> None:
        self.scripts: deque[list[Step]] = deque(scripts)
        self.default: list[Step] = (
            default if default is not None else [{"id": "resp", "object": "chat.completion"}]
        )
        self.calls: list[EngineCall] = []
        self.active = 0

    def script(self, *steps: Step) -> None:
        """Queue the script of the next call."""
        self.scripts.append(list(steps))

    @property
    def priorities(self) -> list[int]:
        """The priority of every call, in call order."""
        return [call.priority for call in self.calls]

    @property
    def aborted(self) -> list[str]:
        """Request ids of the calls that were aborted, in call order."""
        return [call.request_id for call in self.calls if call.aborted]

    def calls_for(self, request_id: str) -> list[EngineCall]:
        """The calls made for one task."""
        return [call for call in self.calls if call.request_id == request_id]

    async def _play(self, call: EngineCall, steps: list[Step]) -> AsyncIterator[dict[str, Any]]:
        self.active += 1
        try:
            for step in steps:
                if isinstance(step, Delay):
                    await asyncio.sleep(step.seconds)
                elif isinstance(step, asyncio.Event):
                    await step.wait()
                elif isinstance(step, BaseException):
                    raise step
                else:
                    call.yielded += 1
                    yield step
            call.finished = True
        except (asyncio.CancelledError, GeneratorExit):
            call.aborted = True
            raise
        finally:
            self.active -= 1

    def stream(
        self, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Record the call and play its script."""
        call = EngineCall(endpoint, dict(data), request_id, priority)
        self.calls.append(call)
        steps = self.scripts.popleft() if self.scripts else list(self.default)
        return self._play(call, steps)


@dataclass(frozen=True)
class DieAfterAnswering:
    """A replica step: report ``answering``, send ``chunks`` progress events of a streaming task
    (ids 0, 1, ...), then die (``ReplicaUnavailableError``) without answering."""

    chunks: int = 1


ReplicaStep = BaseException | DieAfterAnswering | asyncio.Event
"""One call of ``FakeReplicas.run``: an exception raised before anything (the call failed
before the replica answered), a death after answering, or a gate waited for before running."""


@dataclass
class ReplicaCall:
    """One call of ``Replicas.run`` as the dispatcher made it."""

    model_id: str
    task_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    multiplexed_model_id: str | None = None


class FakeReplicas:
    """``Replicas`` whose calls run a real ``TaskRunner`` per model over one ``FakeEngine``
    (as ``ray_worker.serve.task_host`` does), unless a scripted ``ReplicaStep`` says otherwise.
    """

    def __init__(
        self,
        models: Iterable[str],
        events: Any,
        completer: Any,
        *,
        engine: FakeEngine | None = None,
        config: Any = None,
    ) -> None:
        from ray_worker.task.runner import TaskRunner

        self.engine = engine or FakeEngine()
        self.events = events
        self.runners = {
            m: TaskRunner(engine=self.engine, events=events, completer=completer, config=config)
            for m in models
        }
        self.steps: deque[ReplicaStep] = deque()
        self.calls: list[ReplicaCall] = []

    @staticmethod
    def replica_id(model_id: str) -> str:
        """The id the fake replica of ``model_id`` reports in its ``accepted`` phase."""
        return f"{model_id}#fake"

    def script(self, *steps: ReplicaStep) -> None:
        """Queue what the next calls do (each call takes one step; then they run the task)."""
        self.steps.extend(steps)

    def calls_for(self, task_id: str) -> list[ReplicaCall]:
        """The calls made for one task."""
        return [call for call in self.calls if call.task_id == task_id]

    async def run(
        self, model_id: str, task: Task, *, multiplexed_model_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Play the next step, or run ``task`` on ``model_id``'s runner."""
        from ray_worker.errors import ReplicaUnavailableError
        from ray_worker.hop import ACCEPTED, ANSWERING, DONE

        accepted = {"phase": ACCEPTED, "replica_id": self.replica_id(model_id)}
        call = ReplicaCall(model_id, task.task_id, multiplexed_model_id=multiplexed_model_id)
        self.calls.append(call)
        step = self.steps.popleft() if self.steps else None
        if isinstance(step, asyncio.Event):
            await step.wait()
        elif isinstance(step, BaseException):
            raise step
        elif isinstance(step, DieAfterAnswering):
            call.messages.append(accepted)
            yield accepted
            call.messages.append({"phase": ANSWERING})
            yield {"phase": ANSWERING}
            if task.response_mode is ResponseMode.STREAMING:
                for i in range(step.chunks):
                    await self.events.progress(
                        task.instance_id or "", task.task_id, str(i), "message", {"n": i}
                    )
            raise ReplicaUnavailableError("fake replica died mid-task")
        runner = self.runners[model_id]
        answering = asyncio.Event()
        job = runner.start(task, on_answering=answering.set)
        if job is None:
            done = {"phase": DONE, "outcome": await runner.run(task)}
            call.messages.append(done)
            yield done
            return
        call.messages.append(accepted)
        yield accepted
        signal = asyncio.ensure_future(answering.wait())
        try:
            await asyncio.wait({signal, job}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signal.cancel()
        if answering.is_set():
            call.messages.append({"phase": ANSWERING})
            yield {"phase": ANSWERING}
        done = {"phase": DONE, "outcome": await asyncio.shield(job)}
        call.messages.append(done)
        yield done


# --------------------------------------------------------------------------------------
# Event sink and completer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One event or complete, in the order it was sent."""

    kind: str
    """``progress``, ``completion`` or ``complete`` (HTTP)."""
    task_id: str
    instance_id: str | None = None
    event_id: str | None = None
    event_name: str | None = None
    data: Any = None
    """The progress ``eventData`` or the completion/complete ``result``."""


class FakeEventSink:
    """Records progress and completion events in order; can be told to fail."""

    def __init__(
        self,
        *,
        fail_completions: int = 0,
        fail_progress: Callable[[Any], bool] | None = None,
        completion_delay_s: float = 0.0,
    ) -> None:
        self.events: list[Recorded] = []
        self.fail_completions = fail_completions
        self.fail_progress = fail_progress
        self.completion_delay_s = completion_delay_s
        self.completion_attempts = 0

    async def progress(
        self, instance_id: str, task_id: str, event_id: str, event_name: str, event_data: Any
    ) -> None:
        """Record a progress event (or raise if ``fail_progress(event_data)``)."""
        if self.fail_progress is not None and self.fail_progress(event_data):
            raise EventBusUnavailableError("fake event bus refused a progress event")
        self.events.append(
            Recorded("progress", task_id, instance_id, event_id, event_name, event_data)
        )

    async def completion(self, instance_id: str, task_id: str, result: Mapping[str, Any]) -> None:
        """Record a completion event (or raise, the first ``fail_completions`` times)."""
        self.completion_attempts += 1
        if self.completion_delay_s:
            await asyncio.sleep(self.completion_delay_s)
        if self.fail_completions > 0:
            self.fail_completions -= 1
            raise EventBusUnavailableError("fake event bus is down")
        self.events.append(Recorded("completion", task_id, instance_id, data=dict(result)))

    def for_task(self, task_id: str) -> list[Recorded]:
        """Every event of one task, in order."""
        return [e for e in self.events if e.task_id == task_id]

    def progress_of(self, task_id: str) -> list[Recorded]:
        """The progress events of one task."""
        return [e for e in self.for_task(task_id) if e.kind == "progress"]

    def completions_of(self, task_id: str) -> list[dict[str, Any]]:
        """The completion results of one task."""
        return [e.data for e in self.for_task(task_id) if e.kind == "completion"]


class FakeCompleter:
    """Records HTTP completes; the first ``fail_times`` calls raise ``error``."""

    def __init__(self, *, fail_times: int = 0, error: BaseException | None = None) -> None:
        self.completes: list[Recorded] = []
        self.attempts: list[str] = []
        self.fail_times = fail_times
        self.error = error or QueueUnavailableError("fake Bella-Queue is down", 503)

    async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
        """Record the complete, or raise."""
        self.attempts.append(task_id)
        if self.fail_times > 0:
            self.fail_times -= 1
            raise self.error
        self.completes.append(Recorded("complete", task_id, data=dict(result)))

    def of(self, task_id: str) -> list[dict[str, Any]]:
        """The results completed for one task."""
        return [c.data for c in self.completes if c.task_id == task_id]


# --------------------------------------------------------------------------------------
# Taker
# --------------------------------------------------------------------------------------


TakeStep = TakeResponse | Mapping[str, list[Task]] | BaseException | asyncio.Event


@dataclass
class FakeTaker:
    """Serves scripted take answers (``{}`` once the script is used up); records requests.

    A step is a ``TakeResponse``, a ``{"q:level": [Task, ...]}`` map, an exception to raise,
    or an ``asyncio.Event`` to wait for before serving the next step. ``on_take`` is called
    with each request before it is answered (to snapshot the poller's state).
    """

    script: deque[TakeStep] = field(default_factory=deque)
    requests: list[TakeRequest] = field(default_factory=list)
    on_take: Callable[[TakeRequest], None] | None = None
    served: list[str] = field(default_factory=list)
    """What each take returned: ``tasks:<n>``, ``empty`` or ``error:<Class>``."""

    def add(self, *steps: TakeStep) -> None:
        """Append steps to the script."""
        self.script.extend(steps)

    async def take(self, request: TakeRequest) -> TakeResponse:
        """Record the request and serve the next step."""
        self.requests.append(request)
        if self.on_take is not None:
            self.on_take(request)
        while self.script and isinstance(self.script[0], asyncio.Event):
            gate = self.script.popleft()
            assert isinstance(gate, asyncio.Event)
            await gate.wait()
        step: TakeStep = self.script.popleft() if self.script else TakeResponse()
        if isinstance(step, BaseException):
            self.served.append(f"error:{type(step).__name__}")
            raise step
        assert not isinstance(step, asyncio.Event)
        response = step if isinstance(step, TakeResponse) else TakeResponse(tasks=dict(step))
        count = len(response.all_tasks())
        self.served.append(f"tasks:{count}" if count else "empty")
        return response


def by_queue(*tasks: Task) -> dict[str, list[Task]]:
    """Group tasks as a take response does: ``{"q:level": [...]}``."""
    out: dict[str, list[Task]] = {}
    for task in tasks:
        out.setdefault(task.full_queue, []).append(task)
    return out


def level_of(task: Task) -> Level:
    """The task's level as the worker counts it: 0 is online, any other level offline."""
    return Level.ONLINE if task.level == 0 else Level.OFFLINE
