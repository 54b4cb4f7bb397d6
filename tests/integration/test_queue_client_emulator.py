"""``QueueClient`` against the real emulator over loopback HTTP, with a real redis-server.

Online puts are answered the way a worker answers them: stream entries written with the
protocol encoders via redis-py ``XADD`` to ``emulator.topic + emulator.instance_id``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from ray_worker.bella.client import QueueClient, RetryPolicy
from ray_worker.bella.producer import BlockingResult, SSEEvent
from ray_worker.bella.protocol import (
    BATCH_ID_RE,
    STREAM_DONE,
    TASK_ID_RE,
    BatchRequest,
    PutRequest,
    ResponseMode,
    TakeRequest,
    TakeStrategy,
    Task,
    completion_fields,
    dumps,
    event_minid,
    openai_error,
    progress_fields,
    result_body,
    stream_key,
)
from ray_worker.errors import AuthenticationError, BadRequestError, QueueUnavailableError
from ray_worker.testing.redis_server import free_port
from ray_worker.testing.waiting import wait_for

if TYPE_CHECKING:
    from ray_worker.emulator.server import EmulatorServer
    from ray_worker.testing.redis_server import RedisServer

ENDPOINT = "/v1/chat/completions"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(
        emulator.url,
        emulator.apikey,
        complete_retry=RetryPolicy(attempts=2, base_delay_s=0.01),
    ) as queue_client:
        yield queue_client


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    connection = Redis.from_url(redis_server.url)
    try:
        yield connection
    finally:
        await connection.aclose()


@pytest.fixture
async def queue(client: QueueClient, unique_queue: str) -> str:
    assert await client.register(unique_queue, ENDPOINT) == unique_queue
    return unique_queue


async def take_one(client: QueueClient, full_queue: str) -> Task:
    """Poll ``take`` until it yields a task (offline loading may lag, §2.4)."""

    async def attempt() -> Task | None:
        tasks = (await client.take(TakeRequest(queues=[full_queue], size=1))).all_tasks()
        assert len(tasks) <= 1
        return tasks[0] if tasks else None

    return await wait_for(attempt, 10.0, message=f"a task on {full_queue}")


async def xadd(redis: Redis, emulator: EmulatorServer, task: Task, fields: dict[str, str]) -> None:
    assert task.instance_id is not None
    key = stream_key(emulator.topic, task.instance_id)
    await redis.xadd(key, fields, minid=event_minid(), approximate=False)


# --------------------------------------------------------------------------------------
# Setup endpoints
# --------------------------------------------------------------------------------------


async def test_register_metadata_and_duplicate(client: QueueClient, queue: str) -> None:
    assert await client.metadata(queue) == {"endpoint": ENDPOINT, "queue": queue}
    assert await client.metadata(queue + "-unknown") is None
    with pytest.raises(BadRequestError) as info:
        await client.register(queue, ENDPOINT)
    assert info.value.status_code == 400
    assert info.value.message == "非法的数据"


@pytest.mark.parametrize("name", ["bad:name", "bad.name", "x" * 65])
async def test_register_invalid_name_is_400(client: QueueClient, name: str) -> None:
    with pytest.raises(BadRequestError) as info:
        await client.register(name, ENDPOINT)
    assert info.value.status_code == 400


async def test_eventbus(
    client: QueueClient, emulator: EmulatorServer, redis_server: RedisServer
) -> None:
    config = await client.eventbus()
    assert config.topic == emulator.topic
    assert config.topic.startswith("redis-mesh:private-stream:")
    assert config.url == redis_server.url


# --------------------------------------------------------------------------------------
# Callback mode: put → take → complete → get_task
# --------------------------------------------------------------------------------------


async def test_offline_callback_round_trip(
    client: QueueClient, queue: str, emulator: EmulatorServer
) -> None:
    request = PutRequest(
        endpoint=ENDPOINT, data=CHAT, queue=queue, level=1, trace_id="trace-1", timeout=600
    )
    task_id = await client.put(request)
    match = TASK_ID_RE.match(task_id)
    assert match is not None
    assert (match["level"], match["mode"]) == ("1", "C")

    task = await take_one(client, f"{queue}:1")
    assert task.task_id == task_id
    assert task.data == CHAT
    assert task.response_mode is ResponseMode.CALLBACK
    assert task.status == "waiting"
    assert task.callback_url == ""
    assert task.batch_id == ""
    assert task.trace_id == "trace-1"
    assert task.instance_id is None
    assert task.ak is not None
    assert task.ak.get_secret_value() == emulator.apikey
    assert 0 < task.expire_time - task.start_time <= 600_000

    result = result_body(200, task_id, {"object": "chat.completion", "choices": []})
    await client.complete(task_id, result)
    stored = await client.get_task(task_id)
    assert stored.status == "succeeded"
    assert stored.result == result
    # Complete is idempotent: a duplicate is a 200 no-op, and the first result stays.
    await client.complete(task_id, result_body(500, task_id))
    assert (await client.get_task(task_id)).result == result
    assert client.counters.complete_retries == 0

    stats = await client.stats(f"{queue}:1")
    assert isinstance(stats, dict)
    assert stats


async def test_online_callback_task_carries_instance_id(
    client: QueueClient, queue: str, emulator: EmulatorServer
) -> None:
    task_id = await client.put(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue))
    task = await take_one(client, f"{queue}:0")
    assert task.task_id == task_id
    assert task.level == 0
    assert task.response_mode is ResponseMode.CALLBACK
    assert task.instance_id == emulator.instance_id
    await client.complete(task_id, result_body(200, task_id, {}))


async def test_cancel(client: QueueClient, queue: str) -> None:
    task_id = await client.put(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue, level=1))
    assert await client.cancel(task_id) == task_id
    assert (await client.take(TakeRequest(queues=[f"{queue}:1"], size=10))).all_tasks() == []
    assert (await client.get_task(task_id)).status == "cancelled"


async def test_take_strategies_and_explicit_fields(client: QueueClient, queue: str) -> None:
    ids = [
        await client.put(PutRequest(endpoint=ENDPOINT, data={**CHAT, "n": i}, queue=queue))
        for i in range(3)
    ]
    request = TakeRequest(
        queues=[f"{queue}:0", f"{queue}:1"],
        size=2,
        strategy=TakeStrategy.ACTIVE_PASSIVE,
        process_timeout=0,
        process_max_retries=0,
    )
    first = await client.take(request)
    assert list(first.tasks) == [f"{queue}:0"]
    rest = await client.take(request)
    assert [t.task_id for t in first.all_tasks() + rest.all_tasks()] == ids
    for task_id in ids:
        await client.complete(task_id, result_body(200, task_id, {}))


# --------------------------------------------------------------------------------------
# Online puts answered through the event bus
# --------------------------------------------------------------------------------------


async def test_blocking_put_answered_by_a_completion_event(
    client: QueueClient, queue: str, emulator: EmulatorServer, redis: Redis
) -> None:
    put = asyncio.create_task(
        client.put_blocking(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue, timeout=30))
    )
    task = await take_one(client, f"{queue}:0")
    assert task.response_mode is ResponseMode.BLOCKING
    assert task.instance_id == emulator.instance_id
    assert TASK_ID_RE.match(task.task_id)
    body = {"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}
    # Progress events are ignored for blocking puts (§4.4).
    await xadd(redis, emulator, task, progress_fields(task.task_id, "0", "message", {"x": 1}))
    await xadd(redis, emulator, task, completion_fields(task.task_id, result_body(200, "r", body)))
    assert await asyncio.wait_for(put, 20) == BlockingResult(200, body)


async def test_blocking_put_worker_error_is_returned(
    client: QueueClient, queue: str, emulator: EmulatorServer, redis: Redis
) -> None:
    put = asyncio.create_task(
        client.put_blocking(
            PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue, response_mode="blocking")
        )
    )
    task = await take_one(client, f"{queue}:0")
    error = openai_error("no such model", "invalid_request_error", "model_not_found")
    await xadd(redis, emulator, task, completion_fields(task.task_id, result_body(404, "r", error)))
    result = await asyncio.wait_for(put, 20)
    assert result == BlockingResult(404, error)
    assert not result.ok
    assert not result.timed_out


async def test_blocking_put_timeout_is_408(client: QueueClient, queue: str) -> None:
    request = PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue, timeout=1)
    result = await client.put_blocking(request)
    assert result.timed_out
    assert result == BlockingResult(408, None)
    # The server cancelled the task: nothing is left to take.
    assert (await client.take(TakeRequest(queues=[f"{queue}:0"], size=5))).all_tasks() == []


async def test_streaming_put_answered_by_progress_events(
    client: QueueClient, queue: str, emulator: EmulatorServer, redis: Redis
) -> None:
    events: list[SSEEvent] = []

    async def consume() -> None:
        request = PutRequest(endpoint=ENDPOINT, data={**CHAT, "stream": True}, queue=queue)
        async for event in client.put_streaming(request):
            events.append(event)

    consumer = asyncio.create_task(consume())
    task = await take_one(client, f"{queue}:0")
    assert task.response_mode is ResponseMode.STREAMING
    chunks: list[Any] = [
        {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "你好"}}]},
        {"object": "chat.completion.chunk", "choices": [{"delta": {"content": " a:b"}}]},
        'data: {"raw":"sse line"}',  # a forwarded upstream SSE line (§4.4)
        STREAM_DONE,
    ]
    for index, chunk in enumerate(chunks):
        fields = progress_fields(task.task_id, str(index), "message", chunk)
        await xadd(redis, emulator, task, fields)
    await wait_for(lambda: len(events) == len(chunks), 10.0, message="all SSE events")
    assert not consumer.done()  # the stream stays open until the completion event
    await xadd(redis, emulator, task, completion_fields(task.task_id, result_body(200, "r")))
    await asyncio.wait_for(consumer, 20)
    assert events == [
        SSEEvent("0", "message", dumps(chunks[0])),
        SSEEvent("1", "message", dumps(chunks[1])),
        SSEEvent("2", "message", '{"raw":"sse line"}'),
        SSEEvent("3", "message", "[DONE]"),
    ]
    assert json.loads(events[0].data) == chunks[0]


async def test_streaming_put_error_chunk(
    client: QueueClient, queue: str, emulator: EmulatorServer, redis: Redis
) -> None:
    request = PutRequest(endpoint=ENDPOINT, data={**CHAT, "stream": True}, queue=queue)
    stream = client.put_streaming(request)
    first = asyncio.ensure_future(anext(stream))
    task = await take_one(client, f"{queue}:0")
    error = openai_error("engine failed", "server_error", "engine_error")
    await xadd(redis, emulator, task, progress_fields(task.task_id, "0", "message", error))
    await xadd(redis, emulator, task, completion_fields(task.task_id, result_body(500, "r")))
    event = await asyncio.wait_for(first, 20)
    assert json.loads(event.data) == error
    assert [e async for e in stream] == []


# --------------------------------------------------------------------------------------
# Error paths through the client's exceptions
# --------------------------------------------------------------------------------------


async def test_wrong_key_is_401(emulator: EmulatorServer, queue: str) -> None:
    async with QueueClient(emulator.url, "not-the-key") as bad:
        for call in (
            bad.eventbus(),
            bad.take(TakeRequest(queues=[f"{queue}:0"], size=1)),
            bad.put(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue)),
            bad.put_blocking(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue)),
        ):
            with pytest.raises(AuthenticationError, match="BELLA_QUEUE_APIKEY") as info:
                await call
            assert "not-the-key" not in str(info.value)
        with pytest.raises(AuthenticationError):
            await anext(bad.put_streaming(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue)))
        with pytest.raises(AuthenticationError):
            await bad.complete("TASK-1-1-C-251111121955-0001-000001", {})
        assert bad.counters.complete_retries == 0


async def test_bad_requests_are_400(client: QueueClient, queue: str) -> None:
    with pytest.raises(BadRequestError) as level:
        await client.put(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=queue, level=2))
    assert level.value.status_code == 400
    assert "level" in level.value.message
    with pytest.raises(BadRequestError, match="model must not be empty"):
        await client.put(PutRequest(endpoint=ENDPOINT, data={"messages": []}))
    with pytest.raises(BadRequestError):  # a malformed name after the first one → 400
        await client.take(TakeRequest(queues=[f"{queue}:0", f"{queue}:2"], size=1))
    with pytest.raises(BadRequestError):  # level out of range in the task id
        await client.complete("TASK-1-7-C-251111121955-0001-000001", {"status_code": 200})
    assert client.counters.complete_retries == 0
    with pytest.raises(BadRequestError, match="非法的数据"):
        await client.register(queue, ENDPOINT)


async def test_server_errors_are_500(client: QueueClient, unique_queue: str) -> None:
    with pytest.raises(QueueUnavailableError) as take:
        await client.take(TakeRequest(queues=[f"{unique_queue}:0"], size=1))
    assert take.value.status_code == 500
    assert "not registered" in take.value.message
    with pytest.raises(QueueUnavailableError) as put:
        await client.put(PutRequest(endpoint=ENDPOINT, data=CHAT, queue=unique_queue))
    assert put.value.status_code == 500
    with pytest.raises(QueueUnavailableError) as online:
        await client.get_task("TASK-1-0-B-251111121955-0001-000001")
    assert online.value.status_code == 500


async def test_complete_retries_then_gives_up_when_nothing_listens() -> None:
    async with QueueClient(
        f"http://127.0.0.1:{free_port()}",
        "k",
        connect_timeout_s=1.0,
        complete_retry=RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02),
    ) as dead:
        with pytest.raises(QueueUnavailableError, match="cannot connect") as info:
            await dead.complete("TASK-1-1-C-251111121955-0001-000001", {"status_code": 200})
        assert info.value.status_code is None
        assert dead.counters.complete_retries == 2
        assert dead.counters.complete_failures == 1


# --------------------------------------------------------------------------------------
# Files and batches
# --------------------------------------------------------------------------------------


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


async def test_batch_round_trip(client: QueueClient, queue: str) -> None:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT, "body": {**CHAT, "n": i}}
        for i in range(2)
    ]
    content = jsonl(lines)
    uploaded = await client.upload_file(content, "input.jsonl")
    assert uploaded["id"]
    assert await client.file_content(uploaded["id"]) == content

    request = BatchRequest(
        input_file_id=uploaded["id"],
        endpoint=ENDPOINT,
        completion_window="1h",
        metadata={"description": "integration"},
    )
    batch = await client.create_batch(request, queue=queue)
    assert BATCH_ID_RE.match(batch.id)
    assert batch.request_counts.total == 2
    assert batch.metadata == {"description": "integration"}
    assert batch.created_at > 10**12  # epoch milliseconds

    seen: dict[str, str] = {}
    for _ in lines:
        task = await take_one(client, f"{queue}:1")
        assert task.response_mode is ResponseMode.BATCH
        assert task.batch_id == batch.id
        assert task.trace_id == batch.id
        result = result_body(200, task.task_id, {"echo": task.data["n"]})
        await client.complete(task.task_id, result)
        seen[task.task_id] = f"req-{task.data['n']}"

    async def finished() -> bool:
        return (await client.get_batch(batch.id)).status == "completed"

    await wait_for(finished, 10.0, message="batch completed")
    done = await client.get_batch(batch.id)
    assert done.request_counts.completed == 2
    assert done.completed_at is not None
    assert done.output_file_id is not None
    output = [
        json.loads(line) for line in (await client.file_content(done.output_file_id)).splitlines()
    ]
    assert {line["id"]: line["custom_id"] for line in output} == seen
    for line in output:
        assert line["response"] == result_body(
            200, line["id"], {"echo": int(line["custom_id"][4:])}
        )

    listed = await client.list_batches(limit=100)
    assert batch.id in [b.id for b in listed]


async def test_batch_cancel_and_list_paging(client: QueueClient, queue: str) -> None:
    uploaded = await client.upload_file(jsonl([{"custom_id": "a", "body": CHAT}]), "in.jsonl")
    request = BatchRequest(input_file_id=uploaded["id"], endpoint=ENDPOINT)
    first = await client.create_batch(request, queue=queue)
    second = await client.create_batch(request, queue=queue)
    cancelled = await client.cancel_batch(first.id)
    assert cancelled.id == first.id
    assert cancelled.status in ("cancelling", "cancelled")
    assert (await client.get_batch(first.id)).status == "cancelled"
    page = await client.list_batches(limit=1)
    assert [b.id for b in page] == [second.id]  # newest first
    after = await client.list_batches(limit=1, after=second.id)
    assert [b.id for b in after] == [first.id]
    with pytest.raises(BadRequestError) as missing:
        await client.get_batch("BATCH-1-1-251111121955-0001-999999")
    assert missing.value.status_code == 404
