"""The whole worker under local Ray Serve with the simulated engine, against the real emulator.

Every response mode at both levels, bad input (the next task is still served), a deadline
passing mid-generation, a redelivered duplicate, and a Redis restart in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import BatchRequest, PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorConfig, EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.serve_run import deployed_worker, worker_running
from ray_worker.testing.waiting import wait_for
from ray_worker.testing.worker_args import sim_worker_args

MODEL = "sim-model"


def _app_args(queue_url: str, queue: str, **poller: Any) -> dict[str, Any]:
    return sim_worker_args(
        queue_url,
        queue,
        model=MODEL,
        sim={"max_num_seqs": 8, "ttft_s": 0.02, "tokens_per_s": 200, "max_model_len": 8192},
        poller={"process_timeout_s": 3, "process_max_retries": 1, **poller},
        dispatcher={"cancel_check_interval_s": 0.5},
    )


@pytest.fixture(scope="module")
def worker(ray_serve: Any, emulator: EmulatorServer, queue: str) -> Iterator[Any]:
    with deployed_worker(_app_args(emulator.url, queue), "worker-sim", EMULATOR_APIKEY) as handle:
        yield handle


async def _callback_answer(receiver: CallbackReceiver, task_id: str) -> dict[str, Any]:
    answers = await wait_for(lambda: receiver.answers(task_id), timeout=60, interval=0.05)
    return answers[0]


def _chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def _put(queue: str, mode: ResponseMode, data: dict[str, Any], **kw: Any) -> PutRequest:
    return PutRequest(
        endpoint="/v1/chat/completions", queue=queue, response_mode=mode, data=data, **kw
    )


async def _stream_events(client: QueueClient, request: PutRequest) -> list[Any]:
    return [event async for event in client.put_streaming(request)]


async def test_streaming_task_streams_chunks_then_done(
    worker: Any, client: QueueClient, queue: str
) -> None:
    await worker_running(worker)
    events = await _stream_events(
        client, _put(queue, ResponseMode.STREAMING, _chat(max_tokens=6), timeout=60)
    )
    assert [e.id for e in events] == [str(i) for i in range(len(events))]
    assert {e.event for e in events} == {"message"}
    assert events[-1].data == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e.data)) for e in events[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


async def test_blocking_task_gets_openai_response(
    worker: Any, client: QueueClient, queue: str
) -> None:
    await worker_running(worker)
    result = await client.put_blocking(
        _put(queue, ResponseMode.BLOCKING, _chat(max_tokens=5, stream=True), timeout=60)
    )
    assert result.status_code == 200
    completion = ChatCompletion.model_validate(result.body)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5


@pytest.mark.parametrize("level", [0, 1])
async def test_callback_task_is_completed_over_http(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver, level: int
) -> None:
    await worker_running(worker)
    task_id = await client.put(
        _put(
            queue,
            ResponseMode.CALLBACK,
            _chat(max_tokens=3),
            level=level,
            callback_url=receiver.url,
            timeout=60,
        )
    )
    payload = await _callback_answer(receiver, task_id)
    assert payload["status_code"] == 200
    assert payload["request_id"] == task_id
    ChatCompletion.model_validate(payload["body"])


async def test_batch_lines_are_answered(worker: Any, client: QueueClient, queue: str) -> None:
    await worker_running(worker)
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": _chat(f"line {i}", max_tokens=2),
        }
        for i in range(3)
    ]
    lines.append(
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": []},
        }
    )
    uploaded = await client.upload_file("\n".join(json.dumps(x) for x in lines).encode(), "b.jsonl")
    batch = await client.create_batch(
        BatchRequest(input_file_id=uploaded["id"], endpoint="/v1/chat/completions"), queue=queue
    )

    async def finished() -> Any:
        current = await client.get_batch(batch.id)
        return current if current.status == "completed" else None

    done = await wait_for(finished, timeout=60, interval=0.2)
    assert done.output_file_id
    output = [json.loads(x) for x in (await client.file_content(done.output_file_id)).splitlines()]
    by_id = {line["custom_id"]: line["response"] for line in output}
    assert set(by_id) == {"c0", "c1", "c2", "bad"}
    for custom_id in ("c0", "c1", "c2"):
        assert by_id[custom_id]["status_code"] == 200
        ChatCompletion.model_validate(by_id[custom_id]["body"])
    assert by_id["bad"]["status_code"] == 400
    assert by_id["bad"]["body"]["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        ({"model": MODEL, "messages": []}, 400, None),
        ({"model": MODEL, "messages": "not a list"}, 400, None),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
            400,
            None,
        ),
        (
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, None),
    ],
    ids=["no-messages", "wrong-type", "bad-max-tokens", "unknown-model", "oversized-prompt"],
)
async def test_bad_input_is_answered_and_next_task_served(
    worker: Any,
    client: QueueClient,
    queue: str,
    data: dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    await worker_running(worker)
    bad = await client.put_blocking(_put(queue, ResponseMode.BLOCKING, data, timeout=60))
    assert bad.status_code == status
    error = bad.body["error"]
    assert error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code
    good = await client.put_blocking(
        _put(queue, ResponseMode.BLOCKING, _chat(max_tokens=2), timeout=60)
    )
    assert good.status_code == 200


async def test_streaming_error_is_sent_as_chunk(
    worker: Any, client: QueueClient, queue: str
) -> None:
    await worker_running(worker)
    events = await _stream_events(
        client, _put(queue, ResponseMode.STREAMING, {"model": "nope", "messages": []}, timeout=60)
    )
    assert len(events) == 1
    assert json.loads(events[0].data)["error"]["code"] == "model_not_found"


async def _long_callback_generating(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver, *, lifetime_s: int
) -> str:
    """Put a 5000-token level-1 callback task; return its id once the engine runs it."""
    await worker_running(worker)
    task_id = await client.put(
        _put(
            queue,
            ResponseMode.CALLBACK,
            _chat(max_tokens=5000),
            level=1,
            callback_url=receiver.url,
            timeout=lifetime_s,
        )
    )

    async def generating() -> bool:
        status = await worker.status.remote()
        return bool(status["pools"][0]["capacity"]["engine_running"] >= 1)

    await wait_for(generating, timeout=30, interval=0.1)
    return task_id


async def test_deadline_mid_generation_aborts_and_answers(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver
) -> None:
    # 5000 tokens at 200 tokens/s outlive the 2 s lifetime: the worker must abort the
    # engine request at expire_time, free the slot and answer 408.
    task_id = await _long_callback_generating(worker, client, queue, receiver, lifetime_s=2)

    async def answered_408() -> bool:
        status = await worker.status.remote()
        return bool(status["answered"].get("4xx", 0) >= 1 and status["in_flight"] == 0)

    await wait_for(answered_408, timeout=30, interval=0.2)

    async def engine_idle() -> bool:
        status = await worker.status.remote()
        cap = status["pools"][0]["capacity"]
        return bool(cap["engine_running"] == 0 and cap["engine_waiting"] == 0)

    await wait_for(engine_idle, timeout=15, interval=0.2)
    assert receiver.answers(task_id) == []  # the server drops late completes of expired tasks


async def test_cancelled_task_mid_generation_is_aborted_unanswered(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver
) -> None:
    await worker_running(worker)
    before = (await worker.status.remote())["cancelled"]
    # 5000 tokens at 200 tokens/s: 25 s of generation, cancelled once it runs; the replica's
    # 0.5 s cancellation check must abort it in the engine and send no complete.
    task_id = await _long_callback_generating(worker, client, queue, receiver, lifetime_s=120)
    await client.cancel(task_id)

    async def aborted() -> bool:
        status = await worker.status.remote()
        cap = status["pools"][0]["capacity"]
        return bool(
            status["cancelled"] == before + 1
            and status["in_flight"] == 0
            and cap["engine_running"] == 0
        )

    await wait_for(aborted, timeout=20, interval=0.1)
    assert (await client.get_task(task_id)).status == "cancelled"
    # The slot is free: a following task runs and is answered; the cancelled one never is.
    next_id = await client.put(
        _put(
            queue,
            ResponseMode.CALLBACK,
            _chat(max_tokens=3),
            level=1,
            callback_url=receiver.url,
            timeout=60,
        )
    )
    assert (await _callback_answer(receiver, next_id))["status_code"] == 200
    assert receiver.answers(task_id) == []


async def test_redelivered_duplicate_runs_once(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver
) -> None:
    await worker_running(worker)
    before = (await worker.status.remote())["duplicates"]
    # ~4.5 s of generation against process_timeout 3 s: the emulator redelivers the task while
    # the worker still runs it, which must not run it twice, and answers it 408 itself at 6 s
    # (process_timeout x (retries + 1)) unless the worker answered first.
    task_id = await client.put(
        _put(
            queue,
            ResponseMode.CALLBACK,
            _chat(max_tokens=900),
            level=1,
            callback_url=receiver.url,
            timeout=120,
        )
    )
    payload = await _callback_answer(receiver, task_id)
    assert payload["status_code"] == 200
    status = await worker.status.remote()
    assert status["duplicates"] >= before + 1
    assert len(receiver.answers(task_id)) == 1


async def test_redis_restart_mid_stream_keeps_every_completion(ray_serve: Any) -> None:
    redis = RedisServer().start()
    emulator = EmulatorServer(
        EmulatorConfig(redis_url=redis.url, apikeys=(EMULATOR_APIKEY,), port=0, profile="restart")
    ).start()
    queue = f"rs-{uuid.uuid4().hex[:6]}"
    try:
        with deployed_worker(
            _app_args(emulator.url, queue), "worker-restart", EMULATOR_APIKEY
        ) as handle:
            await worker_running(handle)
            async with QueueClient(emulator.url, EMULATOR_APIKEY) as client:
                requests = [
                    _put(queue, ResponseMode.STREAMING, _chat(max_tokens=400), timeout=120)
                    for _ in range(3)
                ]
                streams = [asyncio.create_task(_stream_events(client, r)) for r in requests]

                async def streaming() -> bool:
                    status = await handle.status.remote()
                    return bool(status["pools"][0]["capacity"]["engine_running"] >= 3)

                await wait_for(streaming, timeout=30, interval=0.05)
                await asyncio.to_thread(redis.restart, 1.0)
                results = await asyncio.wait_for(asyncio.gather(*streams), 120)
        for events in results:
            assert events[-1].data == "[DONE]"
            ids = [int(e.id) for e in events]
            assert ids == list(range(len(ids)))
    finally:
        emulator.stop()
        redis.close()


# -- engine seats: online work never waits behind offline work ---------------------------------

OFFLINE_TOKENS = 300
"""1.5 s at the module's 200 tokens/s: the engine stays full of offline work while online
streams are put into it, and a preempted task's second run still ends well before the
server answers it 408 itself (6 s after the take: process_timeout x (retries + 1))."""


async def _fill_with_offline(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver
) -> list[str]:
    """Put a full width (8) of long offline tasks and wait until they all hold seats."""
    ids = [
        await client.put(
            _put(
                queue,
                ResponseMode.CALLBACK,
                _chat(f"offline {i}", max_tokens=OFFLINE_TOKENS),
                level=1,
                callback_url=receiver.url,
                timeout=60,
            )
        )
        for i in range(8)
    ]

    async def full() -> bool:
        capacity = (await worker.status.remote())["pools"][0]["capacity"]
        return bool(capacity["offline_seats_in_use"] == 8)

    await wait_for(full, timeout=30, interval=0.05)
    return ids


async def _first_event_then_rest(
    client: QueueClient, request: PutRequest, receiver: CallbackReceiver, offline: list[str]
) -> tuple[int, list[Any]]:
    """The stream's events, and how many offline tasks were answered at its first event."""
    answered_at_first = -1
    events: list[Any] = []
    async for event in client.put_streaming(request):
        if not events:
            answered_at_first = sum(bool(receiver.answers(i)) for i in offline)
        events.append(event)
    return answered_at_first, events


async def _each_answered_once_whole(receiver: CallbackReceiver, offline: list[str]) -> None:
    for task_id in offline:
        answer = await _callback_answer(receiver, task_id)
        assert answer["status_code"] == 200
        assert answer["body"]["usage"]["completion_tokens"] == OFFLINE_TOKENS
    await asyncio.sleep(0.5)  # a second answer would have come by now
    assert all(len(receiver.answers(i)) == 1 for i in offline)


async def test_online_stream_starts_at_once_on_an_engine_full_of_offline_work(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver
) -> None:
    await worker_running(worker)
    before = (await worker.status.remote())["pools"][0]["capacity"]
    assert before["offline_width"] == 8
    assert before["online_seats"] == 1  # ceil(8 * the default online_reserve_ratio 0.1)
    offline = await _fill_with_offline(worker, client, queue, receiver)
    answered, events = await _first_event_then_rest(
        client,
        _put(queue, ResponseMode.STREAMING, _chat("online", max_tokens=5), timeout=60),
        receiver,
        offline,
    )
    assert answered == 0  # it started while every offline task still ran
    assert events[-1].data == "[DONE]"
    await _each_answered_once_whole(receiver, offline)
    after = (await worker.status.remote())["pools"][0]["capacity"]
    assert after["preemptions"] == before["preemptions"]  # the online seat was free


async def test_online_burst_beyond_the_seats_preempts_offline_work_answered_once(
    worker: Any, client: QueueClient, queue: str, receiver: CallbackReceiver
) -> None:
    await worker_running(worker)
    before = (await worker.status.remote())["pools"][0]["capacity"]["preemptions"]
    offline = await _fill_with_offline(worker, client, queue, receiver)
    streams = [
        _first_event_then_rest(
            client,
            _put(queue, ResponseMode.STREAMING, _chat(f"online {i}", max_tokens=60), timeout=60),
            receiver,
            offline,
        )
        for i in range(2)
    ]
    results = await asyncio.gather(*streams)
    # Two online streams, one online seat: the second took a preempted offline task's seat.
    assert [answered for answered, _ in results] == [0, 0]
    assert all(events[-1].data == "[DONE]" for _, events in results)

    async def preempted() -> bool:
        capacity = (await worker.status.remote())["pools"][0]["capacity"]
        return bool(capacity["preemptions"] > before)

    await wait_for(preempted, timeout=10, interval=0.1)
    # The preempted task ran again from the start: one whole answer each, none lost or doubled.
    await _each_answered_once_whole(receiver, offline)
