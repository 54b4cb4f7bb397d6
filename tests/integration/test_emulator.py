"""The Bella-Queue emulator over real Redis and real HTTP: every endpoint and strategy (spec §1-§3).

Events are written the way a worker writes them (``protocol.progress_fields`` /
``completion_fields`` through redis-py XADD); callbacks land on a loopback receiver.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from ray_worker.bella.protocol import (
    TASK_ID_RE,
    Task,
    completion_fields,
    now_ms,
    progress_fields,
    stream_key,
)
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.waiting import wait_for

CHAT = "/v1/chat/completions"


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=emulator.url,
        headers={"Authorization": f"Bearer {emulator.apikey}"},
        timeout=30.0,
    ) as http:
        yield http


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def queue(client: httpx.AsyncClient, unique_queue: str) -> str:
    """``unique_queue``, registered."""
    resp = await client.post("/v1/queue/register", json={"queue": unique_queue, "endpoint": CHAT})
    assert resp.status_code == 200
    return unique_queue


async def register(client: httpx.AsyncClient, name: str) -> str:
    resp = await client.post("/v1/queue/register", json={"queue": name, "endpoint": CHAT})
    assert resp.status_code == 200, resp.text
    return name


async def put(
    client: httpx.AsyncClient, queue: str | None, level: int | None = 1, **extra: Any
) -> str:
    """A callback-mode put; returns the task id."""
    body: dict[str, Any] = {"endpoint": CHAT, "data": {"model": "m", "n": extra.pop("n", 0)}}
    if queue is not None:
        body["queue"] = queue
    if level is not None:
        body["level"] = level
    body.update(extra)
    resp = await client.post("/v1/queue/put", json=body)
    assert resp.status_code == 200, resp.text
    task_id: str = resp.json()["data"]
    return task_id


async def take(
    client: httpx.AsyncClient, queues: list[str], size: int = 10, strategy: str = "fifo", **kw: Any
) -> dict[str, list[dict[str, Any]]]:
    resp = await client.post(
        "/v1/queue/take", json={"queues": queues, "size": size, "strategy": strategy, **kw}
    )
    assert resp.status_code == 200, resp.text
    result: dict[str, list[dict[str, Any]]] = resp.json()
    return result


def ids(taken: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [t["task_id"] for tasks in taken.values() for t in tasks]


async def take_one(client: httpx.AsyncClient, full_queue: str) -> dict[str, Any]:
    """Poll until one task comes out of ``full_queue``."""

    async def attempt() -> dict[str, Any] | None:
        taken = await take(client, [full_queue], 1, "active_passive")
        tasks = taken.get(full_queue) or []
        return tasks[0] if tasks else None

    return await wait_for(attempt, timeout=10)


async def complete(client: httpx.AsyncClient, task_id: str, payload: Any) -> httpx.Response:
    return await client.post(f"/v1/queue/{task_id}/complete", json=payload)


def assert_error(resp: httpx.Response, status: int, message: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == status
    assert isinstance(body["timestamp"], int)
    if status == 500:
        assert "stacktrace" in body
    else:
        assert "stacktrace" not in body
    if message is not None:
        assert message in body["message"]


async def still_serving(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/queue/eventbus")
    assert resp.status_code == 200


# -------------------------------------------------------------- auth, envelope


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/queue/take"),
        ("GET", "/v1/queue/eventbus"),
        ("POST", "/v1/queue/register"),
        ("GET", "/v1/batches"),
        ("GET", "/v1/files"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", EMULATOR_APIKEY, "Basic dGVzdA=="])
async def test_bad_or_missing_key_is_401_with_empty_body(
    emulator: EmulatorServer, method: str, path: str, auth: str | None
) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        resp = await http.request(method, path, headers=headers, json={})
    assert resp.status_code == 401
    assert resp.content == b""
    assert resp.headers["cache-control"] == "no-cache"


async def test_authorization_query_parameter_is_accepted(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        resp = await http.get(
            "/v1/queue/eventbus", params={"Authorization": f"Bearer {emulator.apikey}"}
        )
    assert resp.status_code == 200


async def test_eventbus_returns_redis_url_and_topic(
    client: httpx.AsyncClient, emulator: EmulatorServer, redis_server: RedisServer
) -> None:
    resp = await client.get("/v1/queue/eventbus")
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.json() == {"url": redis_server.url, "topic": "redis-mesh:private-stream:test:"}
    assert emulator.topic == "redis-mesh:private-stream:test:"
    assert emulator.instance_id == f"127.0.0.1:{emulator.config.port}"


# ---------------------------------------------------------- register, metadata


async def test_register_returns_the_name_as_a_json_string(
    client: httpx.AsyncClient, unique_queue: str
) -> None:
    resp = await client.post("/v1/queue/register", json={"queue": unique_queue, "endpoint": CHAT})
    assert resp.status_code == 200
    assert resp.text == f'"{unique_queue}"'
    assert resp.headers["cache-control"] == "no-cache"
    meta = await client.get(f"/v1/queue/{unique_queue}/metadata")
    assert meta.json() == {"endpoint": CHAT, "queue": unique_queue}


async def test_register_duplicate_is_illegal_data(client: httpx.AsyncClient, queue: str) -> None:
    resp = await client.post("/v1/queue/register", json={"queue": queue, "endpoint": CHAT})
    assert_error(resp, 400, "非法的数据")


@pytest.mark.parametrize(
    "body",
    [
        {"queue": "has:colon", "endpoint": CHAT},
        {"queue": "has.dot", "endpoint": CHAT},
        {"queue": "x" * 65, "endpoint": CHAT},
        {"queue": "", "endpoint": CHAT},
        {"endpoint": CHAT},
        {"queue": "fine-name", "endpoint": ""},
        {"queue": "fine-name"},
    ],
)
async def test_register_validation_is_400(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert_error(await client.post("/v1/queue/register", json=body), 400)


async def test_register_malformed_json_is_500(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/queue/register", content=b"{not json")
    assert_error(resp, 500)
    await still_serving(client)


async def test_metadata_of_unknown_queue_is_empty_200(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/queue/no-such-queue-anywhere/metadata")
    assert resp.status_code == 200
    assert resp.content == b""


# -------------------------------------------------------------- put, task JSON


async def test_offline_callback_put_and_task_json(client: httpx.AsyncClient, queue: str) -> None:
    resp = await client.post(
        "/v1/queue/put",
        json={"queue": queue, "level": 1, "endpoint": CHAT, "data": {"model": "m"}, "timeout": 60},
    )
    assert resp.status_code == 200
    wrapper = resp.json()
    assert set(wrapper) == {"code", "timestamp", "data"}
    assert wrapper["code"] == 200
    task_id = wrapper["data"]
    match = TASK_ID_RE.match(task_id)
    assert match is not None
    assert (match["level"], match["mode"]) == ("1", "C")

    task = (await take(client, [f"{queue}:1"]))[f"{queue}:1"][0]
    assert task == {
        "task_id": task_id,
        "ak": EMULATOR_APIKEY,
        "endpoint": CHAT,
        "queue": queue,
        "level": 1,
        "data": {"model": "m"},
        "status": "waiting",
        "batch_id": "",
        "trace_id": "",
        "start_time": task["start_time"],
        "running_time": 0,
        "expire_time": task["start_time"] + 60_000,
        "completed_time": 0,
        "callback_url": "",
        "response_mode": "callback",
    }
    assert task["start_time"] % 1000 == 0  # a DB datetime: second granularity
    Task.model_validate(task)


async def test_callback_put_without_level_is_online(
    client: httpx.AsyncClient, queue: str, emulator: EmulatorServer
) -> None:
    task_id = await put(client, queue, level=None, trace_id="trace-1", timeout=1000)
    assert TASK_ID_RE.match(task_id)["level"] == "0"  # type: ignore[index]
    task = (await take(client, [f"{queue}:0"]))[f"{queue}:0"][0]
    assert task["instance_id"] == emulator.instance_id
    assert task["trace_id"] == "trace-1"
    assert "status" not in task
    assert "batch_id" not in task
    assert "callback_url" not in task
    assert task["expire_time"] - task["start_time"] == 300_000  # online lifetime capped


async def test_negative_level_callback_is_offline(client: httpx.AsyncClient, queue: str) -> None:
    task_id = await put(client, queue, level=-1)
    assert ids(await take(client, [f"{queue}:1"])) == [task_id]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"level": 2}, 400, "Unknown queue level"),
        ({"endpoint": None}, 400, "endpoint"),
        ({"data": None}, 400, "data"),
        ({"response_mode": "telepathy"}, 400, None),
        ({"queue": "never-registered-queue"}, 500, None),
        ({"queue": None, "data": {"prompt": "no model"}}, 400, "model must not be empty"),
        ({"queue": None, "data": {"model": "unrouted-model"}}, 400, "Queue config cannot be found"),
    ],
)
async def test_put_errors(
    client: httpx.AsyncClient,
    queue: str,
    body: dict[str, Any],
    status: int,
    message: str | None,
) -> None:
    full = {"queue": queue, "level": 1, "endpoint": CHAT, "data": {"model": "m"}}
    full.update(body)
    assert_error(await client.post("/v1/queue/put", json=full), status, message)


async def test_put_malformed_json_is_500(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/v1/queue/put", content=b"[1,2"), 500)
    assert_error(await client.post("/v1/queue/put", content=b""), 500)
    await still_serving(client)


async def test_put_without_queue_routes_by_model_to_a_queue_of_that_name(
    client: httpx.AsyncClient, queue: str
) -> None:
    resp = await client.post(
        "/v1/queue/put", json={"level": 1, "endpoint": CHAT, "data": {"model": queue}}
    )
    assert resp.status_code == 200
    assert ids(await take(client, [f"{queue}:1"])) == [resp.json()["data"]]


# ------------------------------------------------------------- take strategies


async def test_fifo_is_globally_oldest_first(client: httpx.AsyncClient, unique_queue: str) -> None:
    a, b = await register(client, unique_queue + "a"), await register(client, unique_queue + "b")
    order = [
        await put(client, a, level=0),
        await put(client, b, level=0),
        await put(client, a, level=0),
    ]
    got = []
    for _ in order:
        got += ids(await take(client, [f"{a}:0", f"{b}:0"], size=1))
    assert got == order
    assert await take(client, [f"{a}:0", f"{b}:0"]) == {}


async def test_fifo_is_capped_at_ten(client: httpx.AsyncClient, queue: str) -> None:
    for n in range(15):
        await put(client, queue, level=0, n=n)
    assert len(ids(await take(client, [f"{queue}:0"], size=100))) == 10
    assert len(ids(await take(client, [f"{queue}:0"], size=100))) == 5


@pytest.mark.parametrize("size", [0, -3])
async def test_fifo_size_not_positive_takes_nothing(
    client: httpx.AsyncClient, queue: str, size: int
) -> None:
    await put(client, queue, level=0)
    assert await take(client, [f"{queue}:0"], size=size) == {}
    assert len(ids(await take(client, [f"{queue}:0"], size=1))) == 1


async def test_active_passive_drains_the_primary_first(
    client: httpx.AsyncClient, unique_queue: str
) -> None:
    a, b = await register(client, unique_queue + "a"), await register(client, unique_queue + "b")
    a_ids = [await put(client, a) for _ in range(2)]
    b_ids = [await put(client, b) for _ in range(3)]
    taken = await take(client, [f"{a}:1", f"{b}:1"], size=4, strategy="active_passive")
    assert ids({f"{a}:1": taken[f"{a}:1"]}) == a_ids
    assert ids({f"{b}:1": taken[f"{b}:1"]}) == b_ids[:2]


async def test_round_robin_takes_one_per_queue_per_pass(
    client: httpx.AsyncClient, unique_queue: str
) -> None:
    a, b = await register(client, unique_queue + "a"), await register(client, unique_queue + "b")
    for _ in range(3):
        await put(client, a)
        await put(client, b)
    taken = await take(client, [f"{a}:1", f"{b}:1"], size=4, strategy="round_robin")
    assert (len(taken[f"{a}:1"]), len(taken[f"{b}:1"])) == (2, 2)
    taken = await take(client, [f"{a}:1", f"{b}:1"], size=10, strategy="round_robin")
    assert (len(taken[f"{a}:1"]), len(taken[f"{b}:1"])) == (1, 1)


@pytest.mark.parametrize("strategy", ["active_passive", "round_robin"])
async def test_negative_size_is_400(client: httpx.AsyncClient, queue: str, strategy: str) -> None:
    resp = await client.post(
        "/v1/queue/take", json={"queues": [f"{queue}:1"], "size": -1, "strategy": strategy}
    )
    assert_error(resp, 400)


async def test_sequential_one_per_queue_locked_until_first_successful_complete(
    client: httpx.AsyncClient, unique_queue: str, redis: Redis
) -> None:
    a, b = await register(client, unique_queue + "a"), await register(client, unique_queue + "b")
    a_ids = [await put(client, a) for _ in range(3)]
    b_id = await put(client, b)
    queues = [f"{a}:1", f"{b}:1"]

    taken = await take(client, queues, size=10, strategy="sequential")
    assert ids(taken) == [a_ids[0], b_id]
    assert await redis.get(f"sequential:running:{a}:1") == a_ids[0]
    assert 0 < await redis.ttl(f"sequential:running:{a}:1") <= 600
    assert await take(client, queues, size=10, strategy="sequential") == {}

    # Completing some other task does not release the lock; the holder's complete does.
    await complete(client, a_ids[2], {"status_code": 200})
    assert await take(client, queues, strategy="sequential") == {}
    await complete(client, a_ids[0], {"status_code": 200})
    assert ids(await take(client, queues, strategy="sequential")) == [a_ids[1]]

    # A no-op (duplicate) complete does not release the new holder's lock.
    await complete(client, a_ids[0], {"status_code": 200})
    assert await redis.get(f"sequential:running:{a}:1") == a_ids[1]


async def test_min_age_seconds_takes_only_old_enough_tasks(
    client: httpx.AsyncClient, queue: str, redis: Redis
) -> None:
    full = f"{queue}:0"
    task_id = await put(client, queue, level=0)
    assert await take(client, [full], min_age_seconds=5) == {}
    assert await take(client, [full], strategy="active_passive", min_age_seconds=5) == {}
    # Age the task in place: its score is its start_time.
    score = await redis.zscore(full, task_id)
    assert score is not None
    await redis.zadd(full, {task_id: score - 6000}, xx=True)
    assert ids(await take(client, [full], min_age_seconds=5)) == [task_id]


async def test_expired_tasks_are_dropped_at_take(client: httpx.AsyncClient, queue: str) -> None:
    task_id = await put(client, queue, level=1, timeout=1)
    task = await client.get(f"/v1/queue/{task_id}")
    expire_time = task.json()["expire_time"]
    await wait_for(lambda: now_ms() > expire_time, timeout=5)
    assert await take(client, [f"{queue}:1"]) == {}
    # The row keeps its status; a late complete is a silent no-op.
    assert (await complete(client, task_id, {"status_code": 200})).status_code == 200
    assert (await client.get(f"/v1/queue/{task_id}")).json()["status"] == "queued"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"strategy": "fifo"}, 500),  # size missing
        ({"size": None}, 500),
        ({"size": 1, "strategy": "lifo"}, 400),
        ({"size": 1, "strategy": None}, 500),
        ({"size": 1, "queues": []}, 400),
        ({"size": 1, "queues": None}, 400),
        ({"size": 1, "queues": ["no-level"]}, 500),
        ({"size": 1, "queues": ["QUEUE:1", "no-level"]}, 400),
        ({"size": 1, "queues": ["QUEUE:1", "QUEUE:2"]}, 400),
        ({"size": 1, "queues": ["QUEUE:2"]}, 500),
        ({"size": 1, "queues": ["never-registered-q:1"]}, 500),
        ({"size": "lots"}, 500),
    ],
)
async def test_take_validation(
    client: httpx.AsyncClient, queue: str, body: dict[str, Any], status: int
) -> None:
    request: dict[str, Any] = {"queues": [f"{queue}:1"], "strategy": "fifo"}
    request.update(body)
    if isinstance(request["queues"], list):
        request["queues"] = [q.replace("QUEUE", queue) for q in request["queues"]]
    assert_error(await client.post("/v1/queue/take", json=request), status)
    await still_serving(client)


async def test_take_ignores_unknown_fields_and_defaults_to_fifo(
    client: httpx.AsyncClient, queue: str
) -> None:
    task_id = await put(client, queue)
    resp = await client.post(
        "/v1/queue/take",
        json={
            "queues": [f"{queue}:1"],
            "size": 5,
            "endpoint": CHAT,
            "worker": {"id": "w", "capacities": {f"{queue}:1": 3}},
        },
    )
    assert ids(resp.json()) == [task_id]


# ------------------------------------------------------- complete, get, cancel


async def test_complete_then_get_task_shows_result(client: httpx.AsyncClient, queue: str) -> None:
    task_id = await put(client, queue)
    await take(client, [f"{queue}:1"])
    payload = {"status_code": 200, "request_id": task_id, "body": {"ok": True}}
    resp = await complete(client, task_id, payload)
    assert resp.status_code == 200
    assert resp.text == f'"{task_id}"'
    again = await complete(client, task_id, {"status_code": 500, "request_id": task_id})
    assert again.status_code == 200

    task = (await client.get(f"/v1/queue/{task_id}")).json()
    assert task["status"] == "succeeded"
    assert task["result"] == payload
    assert task["completed_time"] >= task["running_time"] > 0


@pytest.mark.parametrize(
    ("task_id", "status"),
    [
        ("TASK-x-1-C-260101000000-0001-000001", 400),
        ("TASK-1-7-C-260101000000-0001-000001", 400),
        ("garbage", 500),
        ("a-b", 500),
    ],
)
async def test_complete_malformed_id(client: httpx.AsyncClient, task_id: str, status: int) -> None:
    assert_error(await complete(client, task_id, {"status_code": 200}), status)


async def test_complete_unknown_well_formed_id_is_200(client: httpx.AsyncClient) -> None:
    task_id = "TASK-999999-1-C-260101000000-0001-000001"
    resp = await complete(client, task_id, {"status_code": 200})
    assert (resp.status_code, resp.json()) == (200, task_id)


@pytest.mark.parametrize("content", [b"", b"{bad", b"[1, 2]", b'"text"'])
async def test_complete_without_an_object_body_is_500(
    client: httpx.AsyncClient, queue: str, content: bytes
) -> None:
    task_id = await put(client, queue)
    resp = await client.post(f"/v1/queue/{task_id}/complete", content=content)
    assert_error(resp, 500)
    await still_serving(client)


async def test_get_task_online_or_unknown_is_500(client: httpx.AsyncClient, queue: str) -> None:
    online = await put(client, queue, level=0)
    assert_error(await client.get(f"/v1/queue/{online}"), 500)
    assert_error(await client.get("/v1/queue/TASK-999999-1-C-260101000000-0001-000001"), 500)


async def test_cancel_removes_the_task(client: httpx.AsyncClient, queue: str) -> None:
    offline, online = await put(client, queue, level=1), await put(client, queue, level=0)
    for task_id in (offline, online):
        resp = await client.post(f"/v1/queue/{task_id}/cancel")
        assert (resp.status_code, resp.json()) == (202, task_id)
    assert await take(client, [f"{queue}:0", f"{queue}:1"]) == {}
    assert (await client.get(f"/v1/queue/{offline}")).json()["status"] == "cancelled"
    # Completing a cancelled task is a no-op.
    await complete(client, offline, {"status_code": 200})
    assert (await client.get(f"/v1/queue/{offline}")).json()["status"] == "cancelled"


async def test_cancel_malformed_id_is_400(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/v1/queue/TASK-a-b-C/cancel"), 400)


async def test_stats_counts_and_pending(client: httpx.AsyncClient, queue: str) -> None:
    first = await put(client, queue)
    await put(client, queue)
    stats = (await client.get(f"/v1/queue/{queue}:1/stats")).json()
    assert stats == {
        "queue": f"{queue}:1",
        "put_count": 2,
        "loaded_count": 2,
        "completed_count": 0,
        "pending": 2,
    }
    await take(client, [f"{queue}:1"], size=1)
    await complete(client, first, {"status_code": 200})
    stats = (await client.get(f"/v1/queue/{queue}:1/stats")).json()
    assert (stats["completed_count"], stats["pending"]) == (1, 1)
    unknown = await client.get("/v1/queue/never-registered-q:1/stats")
    assert (unknown.status_code, unknown.content) == (200, b"")
    assert_error(await client.get(f"/v1/queue/{queue}:9/stats"), 400)


# ----------------------------------------------------------- redelivery (§2.5)


async def test_redelivery_then_408_completion_fires_the_callback(
    client: httpx.AsyncClient, queue: str, receiver: CallbackReceiver
) -> None:
    full = f"{queue}:1"
    task_id = await put(client, queue, callback_url=f"{receiver.url}/cb")
    redelivery: dict[str, Any] = {"process_timeout": 1, "process_max_retries": 1}
    first = await take(client, [full], **redelivery)
    assert first[full][0]["status"] == "waiting"

    async def retaken() -> list[dict[str, Any]]:
        return (await take(client, [full], **redelivery)).get(full, [])

    second = await wait_for(retaken, timeout=10)
    assert [t["task_id"] for t in second] == [task_id]
    assert second[0]["status"] == "queued"

    # Retries exhausted: the server completes the task itself with a string "408".
    timeout_result = {"status_code": "408", "request_id": task_id}
    await wait_for(lambda: receiver.bodies("/cb"), timeout=10)
    assert receiver.bodies("/cb") == [timeout_result]
    task = (await client.get(f"/v1/queue/{task_id}")).json()
    assert (task["status"], task["result"]) == ("succeeded", timeout_result)
    assert await take(client, [full]) == {}


async def test_complete_in_time_disarms_redelivery(
    client: httpx.AsyncClient, queue: str, redis: Redis
) -> None:
    task_id = await put(client, queue)
    await take(client, [f"{queue}:1"], process_timeout=30, process_max_retries=2)
    assert await redis.zscore("bella-emu:redelivery", task_id) is not None
    await complete(client, task_id, {"status_code": 200})
    assert await redis.zscore("bella-emu:redelivery", task_id) is None


# ----------------------------------------------------------------- online puts


async def xadd(redis: Redis, emulator: EmulatorServer, fields: dict[str, str]) -> None:
    await redis.xadd(stream_key(emulator.topic, emulator.instance_id), fields)  # type: ignore[arg-type]


async def test_blocking_put_answered_by_completion_event(
    client: httpx.AsyncClient, queue: str, redis: Redis, emulator: EmulatorServer
) -> None:
    body = {"queue": queue, "endpoint": CHAT, "data": {"model": "m"}, "response_mode": "blocking"}
    pending = asyncio.create_task(client.post("/v1/queue/put", json=body))
    task = await take_one(client, f"{queue}:0")
    assert task["response_mode"] == "blocking"
    assert task["instance_id"] == emulator.instance_id
    assert TASK_ID_RE.match(task["task_id"])["mode"] == "B"  # type: ignore[index]
    tid = task["task_id"]
    await xadd(redis, emulator, progress_fields(tid, "0", "message", {"ignored": True}))
    answer = {"status_code": 201, "request_id": tid, "body": {"id": "x", "object": "chat"}}
    await xadd(redis, emulator, completion_fields(tid, answer))
    resp = await pending
    assert resp.status_code == 201
    assert resp.json() == {"id": "x", "object": "chat"}
    assert resp.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    ("result", "status", "body"),
    [({}, 200, {}), ({"status_code": "429", "body": {"error": {"message": "slow"}}}, 429, None)],
)
async def test_blocking_status_and_body_defaults(
    client: httpx.AsyncClient,
    queue: str,
    redis: Redis,
    emulator: EmulatorServer,
    result: dict[str, Any],
    status: int,
    body: Any,
) -> None:
    put_body = {"queue": queue, "endpoint": CHAT, "data": {}, "response_mode": "blocking"}
    pending = asyncio.create_task(client.post("/v1/queue/put", json=put_body))
    tid = (await take_one(client, f"{queue}:0"))["task_id"]
    await xadd(redis, emulator, completion_fields(tid, result))
    resp = await pending
    assert resp.status_code == status
    assert resp.json() == (result.get("body") if body is None else body)


async def test_blocking_timeout_is_408_and_cancels(
    client: httpx.AsyncClient, queue: str, redis: Redis
) -> None:
    body = {
        "queue": queue,
        "endpoint": CHAT,
        "data": {},
        "response_mode": "blocking",
        "timeout": 1,
    }
    resp = await client.post("/v1/queue/put", json=body)
    assert resp.status_code == 408
    assert resp.content == b""
    assert await redis.zcard(f"{queue}:0") == 0


async def test_undecodable_events_are_skipped(
    client: httpx.AsyncClient, queue: str, redis: Redis, emulator: EmulatorServer
) -> None:
    put_body = {"queue": queue, "endpoint": CHAT, "data": {}, "response_mode": "blocking"}
    pending = asyncio.create_task(client.post("/v1/queue/put", json=put_body))
    tid = (await take_one(client, f"{queue}:0"))["task_id"]
    for fields in (
        {"name": "task-completion-event", "payload": "{not json"},
        {"name": "task-completion-event", "payload": "[1]"},
        {"name": "task-completion-event", "payload": '{"result": {}}'},
        {"name": "task-completion-event", "payload": json.dumps({"taskId": tid, "result": 5})},
        {"name": "something-else", "payload": "{}"},
        {"nothing": "here"},
    ):
        await xadd(redis, emulator, fields)
    await xadd(redis, emulator, completion_fields(tid, {"status_code": 202, "body": {"k": 1}}))
    resp = await pending
    assert (resp.status_code, resp.json()) == (202, {"k": 1})


async def test_streaming_put_relays_progress_as_sse(
    client: httpx.AsyncClient, queue: str, redis: Redis, emulator: EmulatorServer
) -> None:
    body = {"queue": queue, "endpoint": CHAT, "data": {}, "response_mode": "streaming"}
    chunks: list[str] = []

    async def consume() -> httpx.Response:
        async with client.stream("POST", "/v1/queue/put", json=body) as resp:
            async for text in resp.aiter_text():
                chunks.append(text)
            return resp

    pending = asyncio.create_task(consume())
    task = await take_one(client, f"{queue}:0")
    tid = task["task_id"]
    assert TASK_ID_RE.match(tid)["mode"] == "S"  # type: ignore[index]
    await xadd(redis, emulator, progress_fields(tid, "0", "message", {"choices": [{"i": 0}]}))
    await xadd(redis, emulator, progress_fields(tid, "1", "message", 'data: {"raw":true}'))
    await xadd(redis, emulator, progress_fields(tid, "2", "message", "[DONE]"))
    await xadd(redis, emulator, completion_fields(tid, {"status_code": 200, "request_id": tid}))
    await xadd(redis, emulator, progress_fields(tid, "3", "message", "after completion"))
    resp = await pending
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert "".join(chunks) == (
        'id:0\nevent:message\ndata:{"choices":[{"i":0}]}\n\n'
        'id:1\nevent:message\ndata:{"raw":true}\n\n'
        "id:2\nevent:message\ndata:[DONE]\n\n"
    )


async def test_streaming_timeout_ends_the_stream_and_cancels(
    client: httpx.AsyncClient, queue: str, redis: Redis
) -> None:
    body = {
        "queue": queue,
        "endpoint": CHAT,
        "data": {},
        "response_mode": "streaming",
        "timeout": 1,
    }
    resp = await client.post("/v1/queue/put", json=body)
    assert resp.status_code == 200
    assert resp.content == b""
    assert await redis.zcard(f"{queue}:0") == 0


# ------------------------------------------------------------------- callbacks


async def test_offline_callback_gets_exact_payload(
    client: httpx.AsyncClient, queue: str, receiver: CallbackReceiver
) -> None:
    task_id = await put(client, queue, callback_url=f"{receiver.url}/hook?x=1")
    await take(client, [f"{queue}:1"])
    payload = {"status_code": 200, "request_id": task_id, "body": {"usage": {"total_tokens": 3}}}
    await complete(client, task_id, payload)
    await wait_for(lambda: receiver.bodies(), timeout=10)
    assert receiver.received == [("/hook?x=1", payload)]


async def test_online_callback_task_taken_by_active_passive_gets_its_callback(
    client: httpx.AsyncClient, queue: str, receiver: CallbackReceiver
) -> None:
    task_id = await put(client, queue, level=0, callback_url=receiver.url)
    await take(client, [f"{queue}:0"], strategy="active_passive")
    await complete(client, task_id, {"status_code": 200, "request_id": task_id})
    await wait_for(lambda: receiver.bodies(), timeout=10)
    assert receiver.bodies() == [{"status_code": 200, "request_id": task_id}]


async def test_callback_retries_on_io_errors(client: httpx.AsyncClient, queue: str) -> None:
    with CallbackReceiver(drop_first=2) as flaky:
        task_id = await put(client, queue, callback_url=flaky.url)
        await take(client, [f"{queue}:1"])
        await complete(client, task_id, {"status_code": 200, "request_id": task_id})
        await wait_for(lambda: flaky.bodies(), timeout=10)
        assert flaky.attempts == 3
        assert flaky.bodies() == [{"status_code": 200, "request_id": task_id}]


# -------------------------------------------------------------- files, batches


async def upload(client: httpx.AsyncClient, content: bytes, purpose: str = "batch") -> str:
    resp = await client.post(
        "/v1/files",
        files={"file": ("input.jsonl", content, "application/jsonl")},
        data={"purpose": purpose},
    )
    assert resp.status_code == 200, resp.text
    file_id: str = resp.json()["id"]
    return file_id


def batch_input(lines: list[Any]) -> bytes:
    return "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines).encode()


async def test_files_upload_get_and_content(client: httpx.AsyncClient) -> None:
    content = b'{"a": 1}\r\n{"b": 2}\n'
    file_id = await upload(client, content)
    meta = (await client.get(f"/v1/files/{file_id}")).json()
    assert meta["id"] == file_id
    assert (meta["object"], meta["bytes"], meta["purpose"]) == ("file", len(content), "batch")
    assert meta["filename"] == "input.jsonl"
    assert (await client.get(f"/v1/files/{file_id}/content")).content == content
    listed = (await client.get("/v1/files")).json()
    assert file_id in [f["id"] for f in listed["data"]]
    assert (await client.get("/v1/files/file-000000000000000000000000")).status_code == 404
    assert (await client.get("/v1/files/../../etc/passwd/content")).status_code == 404
    assert_error(await client.post("/v1/files", content=b"plain"), 400)


async def test_batch_lifecycle(client: httpx.AsyncClient, queue: str) -> None:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": CHAT, "body": {"model": "m", "i": i}}
        for i in range(3)
    ]
    file_id = await upload(client, batch_input([lines[0], "{broken", lines[1], lines[2]]))
    resp = await client.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"},
        headers={"X-BELLA-QUEUE-NAME": queue},
    )
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    batch_id = batch["id"]
    assert re.fullmatch(r"BATCH-\d+-1-\d{12}-\d{4}-\d{6}", batch_id)
    assert batch["object"] == "batch"
    assert batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 4, "completed": 0, "failed": 1}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600 * 1000

    tasks = (await take(client, [f"{queue}:1"]))[f"{queue}:1"]
    assert [t["data"] for t in tasks] == [line["body"] for line in lines]
    for task in tasks:
        assert TASK_ID_RE.match(task["task_id"])["mode"] == "P"  # type: ignore[index]
        assert task["response_mode"] == "batch"
        assert task["batch_id"] == task["trace_id"] == batch_id
        assert task["expire_time"] == batch["expires_at"]
        assert task["callback_url"] == ""
        assert "custom_id" not in task

    outputs = {}
    for task in tasks:
        payload = {"status_code": 200, "request_id": task["task_id"], "body": {"n": task["data"]}}
        outputs[task["task_id"]] = payload
        await complete(client, task["task_id"], payload)

    async def finished() -> dict[str, Any] | None:
        current: dict[str, Any] = (await client.get(f"/v1/batches/{batch_id}")).json()
        return current if current["status"] == "completed" else None

    done = await wait_for(finished, timeout=10)
    assert done["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert done["completed_at"] >= done["created_at"]
    output = (await client.get(f"/v1/files/{done['output_file_id']}/content")).text
    got = [json.loads(line) for line in output.splitlines()]
    assert got == [
        {"id": t["task_id"], "custom_id": f"req-{i}", "response": outputs[t["task_id"]]}
        for i, t in enumerate(tasks)
    ]
    errors = (await client.get(f"/v1/files/{done['error_file_id']}/content")).text
    assert [json.loads(line) for line in errors.splitlines()] == [
        {
            "id": "",
            "customId": "2",
            "error": {"code": "parse_error", "message": "Failed to parse request data."},
        }
    ]
    listed = (await client.get("/v1/batches", params={"limit": 100})).json()
    assert listed["object"] == "list"
    assert batch_id in [b["id"] for b in listed["data"]]


async def test_batch_routes_by_first_line_model(client: httpx.AsyncClient, queue: str) -> None:
    file_id = await upload(client, batch_input([{"custom_id": "a", "body": {"model": queue}}]))
    resp = await client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "1h"}
    )
    assert resp.status_code == 200, resp.text
    assert len(ids(await take(client, [f"{queue}:1"]))) == 1

    unrouted = await upload(client, batch_input([{"custom_id": "a", "body": {"model": "nope"}}]))
    resp = await client.post(
        "/v1/batches", json={"input_file_id": unrouted, "endpoint": CHAT, "completion_window": "1h"}
    )
    assert_error(resp, 400, "Queue config cannot be found")


@pytest.mark.parametrize(
    "body",
    [
        {"endpoint": CHAT, "completion_window": "24h"},
        {"input_file_id": "file-000000000000000000000000", "endpoint": CHAT},
        {"input_file_id": "file-000000000000000000000000", "completion_window": "24h"},
        {
            "input_file_id": "file-000000000000000000000000",
            "endpoint": CHAT,
            "completion_window": "1h",
        },
    ],
)
async def test_batch_create_validation(
    client: httpx.AsyncClient, queue: str, body: dict[str, Any]
) -> None:
    resp = await client.post("/v1/batches", json=body, headers={"X-BELLA-QUEUE-NAME": queue})
    assert_error(resp, 400)


async def test_batch_cancel_drops_tasks_and_output(client: httpx.AsyncClient, queue: str) -> None:
    lines = [{"custom_id": str(i), "body": {"model": "m"}} for i in range(2)]
    file_id = await upload(client, batch_input(lines))
    batch = (
        await client.post(
            "/v1/batches",
            json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "bogus"},
            headers={"X-BELLA-QUEUE-NAME": queue},
        )
    ).json()
    assert batch["completion_window"] == "24h"
    taken = ids(await take(client, [f"{queue}:1"], size=1))
    resp = await client.post(f"/v1/batches/{batch['id']}/cancel")
    assert resp.status_code == 202
    assert resp.json()["status"] == "cancelled"
    assert await take(client, [f"{queue}:1"]) == {}
    await complete(client, taken[0], {"status_code": 200})
    assert (await client.get(f"/v1/queue/{taken[0]}")).json()["status"] == "succeeded"
    final = (await client.get(f"/v1/batches/{batch['id']}")).json()
    assert final["request_counts"]["completed"] == 0
    content = await client.get(f"/v1/files/{final['output_file_id']}/content")
    assert content.content == b""
    assert (await client.post("/v1/batches/BATCH-0-1-x/cancel")).status_code == 404
    assert (await client.get("/v1/batches/BATCH-0-1-x")).status_code == 404


async def test_batch_expiry_finalizes_with_partial_output(
    client: httpx.AsyncClient, queue: str, redis: Redis
) -> None:
    lines = [{"custom_id": str(i), "body": {"model": "m"}} for i in range(2)]
    file_id = await upload(client, batch_input(lines))
    batch = (
        await client.post(
            "/v1/batches",
            json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "1h"},
            headers={"X-BELLA-QUEUE-NAME": queue},
        )
    ).json()
    task_id = ids(await take(client, [f"{queue}:1"], size=1))[0]
    await complete(client, task_id, {"status_code": 200, "request_id": task_id})
    # Pretend the completion window has passed; the emulator's timer finalizes the batch.
    await redis.zadd("bella-emu:batch-expiry", {batch["id"]: 0})

    async def expired() -> dict[str, Any] | None:
        current: dict[str, Any] = (await client.get(f"/v1/batches/{batch['id']}")).json()
        return current if current["status"] == "expired" else None

    final = await wait_for(expired, timeout=10)
    assert final["expired_at"] >= final["created_at"]
    output = (await client.get(f"/v1/files/{final['output_file_id']}/content")).text
    assert [json.loads(line)["id"] for line in output.splitlines()] == [task_id]


# ------------------------------------------------------------------ robustness


async def test_garbage_everywhere_keeps_the_emulator_serving(client: httpx.AsyncClient) -> None:
    for method, path, content in [
        ("POST", "/v1/queue/put", b"\xff\xfe"),
        ("POST", "/v1/queue/take", b"null"),
        ("POST", "/v1/queue/take", b'{"queues": "q:1", "size": 1}'),
        ("POST", "/v1/queue/take", b'{"queues": [1, 2], "size": 1}'),
        ("POST", "/v1/queue/register", b"[]"),
        ("POST", "/v1/batches", b"{}"),
        ("GET", "/v1/batches?limit=abc", b""),
        ("POST", "/v1/queue/%00/complete", b"{}"),
        ("GET", "/v1/queue/%20/stats", b""),
    ]:
        resp = await client.request(method, path, content=content)
        assert resp.status_code in (400, 500), (path, resp.status_code, resp.text)
        assert resp.headers["cache-control"] == "no-cache"
    await still_serving(client)


async def test_lazy_offline_loading(redis_server: RedisServer, unique_queue: str) -> None:
    from ray_worker.emulator.server import EmulatorConfig

    config = EmulatorConfig(redis_url=redis_server.url, port=0, lazy_offline_loading=True)
    with EmulatorServer(config) as lazy:
        async with httpx.AsyncClient(
            base_url=lazy.url, headers={"Authorization": f"Bearer {lazy.apikey}"}
        ) as http:
            queue = await register(http, unique_queue)
            task_id = await put(http, queue)
            assert (await http.get(f"/v1/queue/{task_id}")).json()["status"] == "waiting"
            assert (await http.get(f"/v1/queue/{queue}:1/stats")).json()["pending"] == 1
            assert await take(http, [f"{queue}:1"]) == {}
            assert ids(await take(http, [f"{queue}:1"])) == [task_id]
            assert (await http.get(f"/v1/queue/{task_id}")).json()["status"] == "queued"


async def test_event_reader_survives_a_redis_restart(unique_queue: str) -> None:
    from ray_worker.emulator.server import EmulatorConfig

    with RedisServer() as own_redis:
        config = EmulatorConfig(redis_url=own_redis.url, port=0)
        with EmulatorServer(config) as emu:
            async with httpx.AsyncClient(
                base_url=emu.url, headers={"Authorization": f"Bearer {emu.apikey}"}
            ) as http:
                await asyncio.to_thread(own_redis.restart, 0.3)
                queue = await wait_for(
                    lambda: register(http, unique_queue), timeout=10, ignore=(AssertionError,)
                )
                body = {"queue": queue, "endpoint": CHAT, "data": {}, "response_mode": "blocking"}
                pending = asyncio.create_task(http.post("/v1/queue/put", json=body))
                tid = (await take_one(http, f"{queue}:0"))["task_id"]
                r = Redis.from_url(own_redis.url, decode_responses=True)
                try:
                    key = stream_key(emu.topic, emu.instance_id)
                    await r.xadd(key, completion_fields(tid, {"body": {"after": "restart"}}))  # type: ignore[arg-type]
                finally:
                    await r.aclose()
                resp = await pending
                assert (resp.status_code, resp.json()) == (200, {"after": "restart"})


async def test_restart_keeps_port_and_queue_state(
    redis_server: RedisServer, unique_queue: str
) -> None:
    from ray_worker.emulator.server import EmulatorConfig

    with EmulatorServer(EmulatorConfig(redis_url=redis_server.url)) as emu:
        url, instance_id = emu.url, emu.instance_id
        headers = {"Authorization": f"Bearer {emu.apikey}"}
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            queue = await register(http, unique_queue)
            task_id = await put(http, queue)
        await asyncio.to_thread(emu.restart)
        assert (emu.url, emu.instance_id) == (url, instance_id)
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            assert ids(await take(http, [f"{queue}:1"])) == [task_id]
