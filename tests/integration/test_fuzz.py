"""Property-based fuzz of the take path: arbitrary take answers and task JSON never stop the
worker, and every identifiable task gets exactly one 2xx or 4xx answer.

Each example is one take answer, built by hypothesis as JSON text and then bytes (valid and
invalid UTF-8, lone surrogates escaped or raw, huge strings, wrong types, out-of-range numbers,
broken JSON). It is served over a mock transport to the real ``QueueClient`` (parsing), taken
by the real ``Poller`` and answered by the real ``Dispatcher`` (400 for unreadable tasks) and
real ``TaskRunner`` on a fake engine; online answers go through the real ``EventBatcher``
batcher and ``StreamWriter`` writer into the session's real ``redis-server``, offline ones
through the client's HTTP complete (whose bytes must be valid UTF-8 JSON). After the examples
a normal task of each mode is still served.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import unquote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import (
    STREAM_DONE,
    CompletionEvent,
    Task,
    decode_event,
    now_ms,
    stream_key,
    task_return_path,
)
from ray_worker.config import CapacityConfig, DispatcherConfig, PollerConfig, QueueSpec
from ray_worker.errors import InvalidTaskError
from ray_worker.eventbus.batching import EventBatcher
from ray_worker.eventbus.redis_writer import StreamWriter
from ray_worker.hop import ANSWERING, DONE
from ray_worker.task.runner import TaskRunner
from ray_worker.testing.redis_server import RedisServer
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher
from ray_worker.worker.poller import Poller, make_pools

MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
MODEL = "m"
INSTANCES = ["10.0.0.5:8080", "i-\u4f60\u597d", "i-b"]
BAD_BYTES = "\x00BAD\x00"
"""Marker replaced by invalid UTF-8 bytes in the serialized answer."""


# --------------------------------------------------------------------------------------
# The fake engine and the replicas: a real TaskRunner, as ray_worker.serve.task_host does
# --------------------------------------------------------------------------------------


class EchoEngine:
    """Validates ``messages`` like an OpenAI server would (400), echoes the last content."""

    async def _run(self, data: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidTaskError("'messages' must be a non-empty list", "messages")
        last = messages[-1]
        if not isinstance(last, dict) or not isinstance(last.get("content"), str):
            raise InvalidTaskError("each message needs a string 'content'", "messages")
        text = last["content"][:2000]
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        if data.get("stream"):
            for piece in (text[:5], text[5:]):
                yield {
                    "object": "chat.completion.chunk",
                    "choices": [{"delta": {"content": piece}}],
                }
            yield {"object": "chat.completion.chunk", "choices": [], "usage": usage}
        else:
            yield {
                "object": "chat.completion",
                "choices": [{"message": {"role": "assistant", "content": text}}],
                "usage": usage,
            }

    def stream(
        self, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        return self._run(data)


class RunnerReplicas:
    """``Replicas`` whose calls run the task on one real ``TaskRunner``."""

    def __init__(self, runner: TaskRunner) -> None:
        self.runner = runner

    async def run(
        self, model_id: str, task: Task, *, multiplexed_model_id: str | None = None
    ) -> AsyncIterator[Mapping[str, Any]]:
        yield {"phase": ANSWERING}
        yield {"phase": DONE, "outcome": await self.runner.run(task)}


# --------------------------------------------------------------------------------------
# A mock Bella-Queue: serves scripted take answers, records completes as bytes
# --------------------------------------------------------------------------------------


class MockQueue:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.served = 0
        self.completes: list[tuple[str, Any]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/queue/take":
            if self.bodies:
                self.served += 1
                return httpx.Response(
                    200, content=self.bodies.pop(0), headers={"Content-Type": "application/json"}
                )
            return httpx.Response(200, json={})
        if path.endswith("/complete"):
            task_id = unquote(path[len("/v1/queue/") : -len("/complete")])
            # Strict: what the worker sends must be UTF-8 JSON the Java side can read.
            body = json.loads(request.content.decode("utf-8"))
            self.completes.append((task_id, body))
            return httpx.Response(200, json=True)
        return httpx.Response(404, json={"code": 404, "message": "no", "timestamp": 0})


class Rig:
    """The worker's control and data plane on one event loop, over the mock queue and Redis."""

    def __init__(self, redis_url: str) -> None:
        self.topic = f"fuzz-{time.time_ns()}:"
        self.queue = MockQueue()
        self.client = QueueClient(
            "http://bella.test", "key", transport=httpx.MockTransport(self.queue.handler)
        )
        self.publisher = StreamWriter(redis_url)
        self.events = EventBatcher(send_seq=self._send, topic=self.topic)
        self.redis = Redis.from_url(redis_url)
        config = DispatcherConfig(overload_retry_initial_s=0.001, overload_retry_max_s=0.004)
        self.runner = TaskRunner(
            engine=EchoEngine(), events=self.events, completer=self.client, config=config
        )
        specs = [QueueSpec(name="fz:0"), QueueSpec(name="fz:1")]
        self.capacity = CapacityTracker(CapacityConfig(target_ratio=1.0), [MODEL])
        self.capacity.report({"replica_id": "r", "model_id": MODEL, "max_num_seqs": 256})
        self.dispatcher = Dispatcher(
            replicas=RunnerReplicas(self.runner),
            events=self.events,
            completer=self.client,
            capacity=self.capacity,
            queues=specs,
            served_models=[MODEL],
            config=config,
        )
        self.poller = Poller(
            taker=self.client,
            dispatcher=self.dispatcher,
            capacity=self.capacity,
            pools=make_pools(specs, {q.name: MODEL for q in specs}),
            config=PollerConfig(
                idle_backoff_initial_s=0.0005,
                idle_backoff_max_s=0.002,
                error_backoff_initial_s=0.0005,
                error_backoff_max_s=0.002,
            ),
        )
        self.stream_ids: dict[str, bytes] = {}
        self.instances: set[str] = set(INSTANCES)
        """Every instance id answered on (invalid UTF-8 makes new ones: U+FFFD)."""

    async def _send(self, seq: int, batch: list[tuple[str, dict[str, str]]]) -> None:
        await self.publisher.publish(batch)

    async def settle(self, served: int, timeout_s: float = 10.0) -> None:
        """Wait until ``served`` answers were taken and everything they started is answered."""
        # Keep the replica's load report fresh (reports go stale), as a live replica does.
        self.capacity.report({"replica_id": "r", "model_id": MODEL, "max_num_seqs": 256})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (
                self.queue.served >= served
                and not self.queue.bodies
                and self.dispatcher.in_flight == 0
                and self.runner.in_flight == 0
            ):
                break
            await asyncio.sleep(0.001)
        else:
            raise AssertionError("the worker did not settle")
        await self.events.flush()
        assert await self.publisher.flush(10)

    async def completions(self) -> list[CompletionEvent]:
        """Completion events written since the last call, on every instance's stream."""
        out: list[CompletionEvent] = []
        for instance in self.instances:
            key = stream_key(self.topic, instance)
            start = self.stream_ids.get(key, b"-")
            entries = await self.redis.xrange(key, min=start)
            for entry_id, fields in entries:
                if entry_id == start:
                    continue
                event = decode_event(fields)
                if isinstance(event, CompletionEvent):
                    out.append(event)
            if entries:
                self.stream_ids[key] = entries[-1][0]
        return out

    async def aclose(self) -> None:
        await self.poller.stop()
        await self.dispatcher.drain(5)
        await self.runner.drain(5)
        await self.events.aclose()
        await self.publisher.aclose()
        await self.client.aclose()
        await self.redis.aclose()


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["m", "\udc80", "a\ud800b", BAD_BYTES, "\\", '"', "\u4f60\u597d", ""]),
    st.integers(0, 3000).map(lambda n: "x" * n),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

_serial = iter(range(10**9))


def _unique(prefix: str = "F") -> str:
    return f"{prefix}-{next(_serial)}"


task_ids = st.one_of(
    st.builds(_unique),
    st.builds(_unique),
    st.builds(_unique),
    st.builds(_unique),
    st.builds(lambda: _unique("F\udc80")),
    st.builds(lambda: _unique("F\u4f60")),
    st.builds(lambda: _unique("x" * 300)),
    st.sampled_from([None, 5, "", [1]]),
)
messages = st.one_of(
    st.just([{"role": "user", "content": "hello there"}]),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": texts}), max_size=3),
    json_values,
)
datas = st.one_of(
    st.fixed_dictionaries(
        {"messages": messages},
        optional={
            "model": st.one_of(st.just(MODEL), texts, st.integers()),
            "max_tokens": scalars,
            "stream": scalars,
        },
    ),
    json_values,
)


def mostly(
    valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``valid`` three times in four."""
    return st.one_of(valid, valid, valid, invalid)


@st.composite
def tasks(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not a task at all
    fields: dict[str, Any] = {
        "task_id": draw(task_ids),
        "ak": draw(mostly(st.just("sk-secret"), st.sampled_from([None, 5]))),
        "endpoint": draw(
            mostly(st.just("/v1/chat/completions"), st.sampled_from(["", "/v1/nope", 7]))
        ),
        "queue": draw(mostly(st.just("fz"), st.sampled_from(["fz\udc80", 3, ""]))),
        "level": draw(mostly(st.sampled_from([0, 1]), st.sampled_from([2, -1, "1", 2**40, 0.5]))),
        "data": draw(mostly(st.fixed_dictionaries({"messages": messages}), datas)),
        "instance_id": draw(
            mostly(st.sampled_from(INSTANCES), st.sampled_from([None, 5, "", "i\udc80"]))
        ),
        "response_mode": draw(
            mostly(
                st.sampled_from(["blocking", "streaming", "callback", "batch"]),
                st.sampled_from(["carrier", None, 1]),
            )
        ),
        "start_time": draw(mostly(st.just(now_ms()), st.sampled_from([0, -5, 2**64, "x"]))),
        "expire_time": draw(
            mostly(
                st.just(now_ms() + 60_000),
                st.sampled_from([0, now_ms() - 1_000, 2**63 - 1, 10**30, -1]),
            )
        ),
        "extra_field": draw(json_values),
    }
    drop = draw(st.sets(st.sampled_from(list(fields)), max_size=2))
    return {k: v for k, v in fields.items() if k not in drop}


@st.composite
def take_answers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A take answer as bytes, and how many task entries it holds."""
    kind = draw(st.integers(0, 19))
    if kind == 1:
        # A huge body: one 2 MB string (the rest of the answer as usual).
        huge = {"task_id": _unique(), "response_mode": "callback", "data": {"x": "y" * 2**21}}
        return json.dumps({"fz:1": [huge]}).encode(), 1
    if kind == 0:
        garbage = draw(
            st.sampled_from(
                [b"", b"not json", b"[", b'{"q:0": [', b"[" * 5000, b"null", b'"x"', b"\xff\xfe"]
            )
        )
        return garbage, 0
    entries_by_queue: dict[str, Any] = {}
    all_entries: list[Any] = []  # the entries drawn (ids repeat only by chance)
    for _ in range(draw(st.integers(1, 2))):
        queue = draw(st.sampled_from(["fz:0", "fz:1", "other:0", "\udc80:1"]))
        entries = draw(st.lists(tasks(), max_size=6))
        entries_by_queue.setdefault(queue, []).extend(entries)
        all_entries.extend(entries)
    ascii_only = draw(st.booleans())
    text = json.dumps(entries_by_queue, ensure_ascii=ascii_only)
    # Raw surrogates (ensure_ascii=False) become invalid UTF-8, and so does the marker.
    raw = text.encode("utf-8", "surrogatepass")
    raw = raw.replace(json.dumps(BAD_BYTES)[1:-1].encode(), b"\xc3\x28\xff")
    raw = raw.replace(BAD_BYTES.encode(), b"\xc3\x28\xff")
    return raw, len(all_entries)


def expected_ids(raw: bytes) -> dict[str, Task]:
    """Task ids that must be answered: readable by the worker, with a return path.

    The oracle re-reads the bytes as the client does (invalid UTF-8 replaced), so an id that
    held invalid bytes is compared in the form the worker saw.
    """
    try:
        body = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return {}
    if not isinstance(body, dict) or not all(isinstance(v, list) for v in body.values()):
        return {}
    ids = {}
    for value in body.values():
        for entry in value:
            stub = task_return_path(entry)
            if stub is not None:
                ids[stub.task_id] = stub
    return ids


# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------


def test_fuzz_take_path(redis_server: RedisServer) -> None:
    loop = asyncio.new_event_loop()
    rig = loop.run_until_complete(_start(redis_server.url))
    ran = Counter[str]()
    try:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(answer=take_answers())
        def one(answer: tuple[bytes, int]) -> None:
            raw, entries = answer
            ran["examples"] += 1
            ran["entries"] += entries
            loop.run_until_complete(_check_example(rig, raw, entries, ran))

        one()
        loop.run_until_complete(_normal_tasks_are_served(rig))
        assert rig.poller.alive
        assert rig.publisher.healthy()
    finally:
        loop.run_until_complete(rig.aclose())
        loop.close()
    print(
        f"\nfuzz: {ran['examples']} examples, {ran['entries']} task entries, "
        f"{ran['answered']} answered ({ran['2xx']} 2xx, {ran['4xx']} 4xx), "
        f"{ran['unanswerable']} without id or return path"
    )
    assert ran["examples"] >= MAX_EXAMPLES
    assert ran["2xx"] > 0
    assert ran["4xx"] > 0


async def _start(url: str) -> Rig:
    rig = Rig(url)
    rig.poller.start()
    return rig


async def _check_example(rig: Rig, raw: bytes, entries: int, ran: Counter[str]) -> None:
    expected = expected_ids(raw)
    rig.instances.update(t.instance_id for t in expected.values() if t.instance_id)
    rig.queue.completes.clear()
    rig.queue.bodies.append(raw)
    await rig.settle(rig.queue.served + 1)
    answers: Counter[str] = Counter()
    statuses: dict[str, int] = {}
    for event in await rig.completions():
        answers[event.task_id] += 1
        statuses[event.task_id] = int(event.result["status_code"])
    for task_id, body in rig.queue.completes:
        answers[task_id] += 1
        statuses[task_id] = int(body["status_code"])
    assert rig.poller.alive, rig.poller.failure()
    assert rig.publisher.healthy(), rig.publisher.stats()
    for task_id in expected:
        assert answers[task_id] == 1, (task_id, answers[task_id])
        status = statuses[task_id]
        assert 200 <= status < 300 or 400 <= status < 500, (task_id, status)
        ran[f"{status // 100}xx"] += 1
    # Nothing else was answered (no answer to an id the worker could not read).
    assert set(answers) <= set(expected), set(answers) - set(expected)
    ran["answered"] += len(expected)
    ran["unanswerable"] += entries - len(expected)


async def _normal_tasks_are_served(rig: Rig) -> None:
    now = now_ms()
    normal = []
    for mode in ("blocking", "streaming", "callback"):
        entry = {
            "task_id": _unique("NORMAL"),
            "ak": "sk-secret",
            "endpoint": "/v1/chat/completions",
            "queue": "fz",
            "level": 0 if mode != "callback" else 1,
            "data": {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]},
            "instance_id": INSTANCES[0],
            "response_mode": mode,
            "start_time": now,
            "expire_time": now + 60_000,
        }
        normal.append(entry)
    raw = json.dumps({"fz:0": normal[:2], "fz:1": normal[2:]}).encode()
    rig.queue.completes.clear()
    rig.queue.bodies.append(raw)
    await rig.settle(rig.queue.served + 1)
    completions = {e.task_id: e for e in await rig.completions()}
    for entry in normal[:2]:
        assert completions[entry["task_id"]].result["status_code"] == 200
    ((task_id, body),) = rig.queue.completes
    assert task_id == normal[2]["task_id"]
    assert body["status_code"] == 200
    assert body["body"]["choices"][0]["message"]["content"] == "hi there"
    # The streaming task's chunks and [DONE] came through Redis in order.
    entries = await rig.redis.xrange(stream_key(rig.topic, INSTANCES[0]))
    progress = [
        decode_event(f) for _, f in entries if b"task-progress-event" in f.get(b"name", b"")
    ]
    mine = [p for p in progress if p is not None and p.task_id == normal[1]["task_id"]]
    assert [p.event_id for p in mine] == [str(i) for i in range(len(mine))]
    assert mine[-1].event_data == STREAM_DONE
