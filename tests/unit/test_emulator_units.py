"""Pure pieces of the emulator: SSE formatting, task-id parsing, windows, config, waiting."""

from __future__ import annotations

import asyncio
import re

import pytest

from ray_worker.bella.protocol import TASK_ID_RE, Level, ResponseMode, make_task_id, sse_data
from ray_worker.emulator.batches import parse_completion_window
from ray_worker.emulator.config import EmulatorConfig
from ray_worker.emulator.http import format_sse, parse_multipart
from ray_worker.emulator.routes import result_status
from ray_worker.emulator.store import ApiError, parse_task_id
from ray_worker.testing.waiting import wait_for, wait_for_sync


def test_format_sse_matches_spring_sse_emitter() -> None:
    assert format_sse("0", "message", sse_data({"a": 1})) == 'id:0\nevent:message\ndata:{"a":1}\n\n'
    assert format_sse("7", "message", sse_data("data: [DONE]")) == (
        "id:7\nevent:message\ndata:[DONE]\n\n"
    )
    assert format_sse(None, None, "x") == "data:x\n\n"


def test_parse_task_id_reads_queue_id_and_level() -> None:
    task_id = make_task_id(42, 1, ResponseMode.BATCH, 1_700_000_000_000, 12, 345)
    assert TASK_ID_RE.match(task_id)
    assert parse_task_id(task_id) == (42, Level.OFFLINE)


@pytest.mark.parametrize(
    ("task_id", "status"),
    [
        ("garbage", 500),
        ("TASK-1-0", 500),
        ("TASK-one-0-C-x", 400),
        ("TASK-1-zero-C-x", 400),
        ("TASK-1-2-C-x", 400),
    ],
)
def test_parse_task_id_errors_follow_the_server(task_id: str, status: int) -> None:
    with pytest.raises(ApiError) as err:
        parse_task_id(task_id)
    assert err.value.status == status


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ("24h", ("24h", 86400)),
        ("30m", ("30m", 1800)),
        ("2d", ("2d", 172800)),
        ("10s", ("24h", 86400)),
        ("soon", ("24h", 86400)),
        ("", ("24h", 86400)),
    ],
)
def test_completion_window(window: str, expected: tuple[str, int]) -> None:
    assert parse_completion_window(window) == expected


def test_config_defaults() -> None:
    config = EmulatorConfig(redis_url="redis://127.0.0.1:1/0", port=9000)
    assert config.resolved_instance_id == "127.0.0.1:9000"
    assert config.topic == "redis-mesh:private-stream:local:"
    assert config.callback_retry_delays_s == (2.0, 5.0, 10.0)
    assert EmulatorConfig(redis_url="r", instance_id="10.0.0.5:8080").resolved_instance_id == (
        "10.0.0.5:8080"
    )
    with pytest.raises(ValueError, match="API key"):
        EmulatorConfig(redis_url="r", apikeys=())


def testparse_multipart() -> None:
    boundary = "XyZ"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
        '{"a":1}\n{"b":2}\n\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    parts = parse_multipart(f"multipart/form-data; boundary={boundary}", body)
    assert parts["purpose"] == (None, b"batch")
    assert parts["file"] == ("in.jsonl", b'{"a":1}\n{"b":2}\n')
    with pytest.raises(ApiError):
        parse_multipart("application/json", b"{}")


async def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = []

    def predicate() -> int | None:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else None

    assert await wait_for(predicate, timeout=5, interval=0) == 3

    async def async_predicate() -> str:
        await asyncio.sleep(0)
        return "ready"

    assert await wait_for(async_predicate) == "ready"


async def test_wait_for_times_out_with_the_last_value() -> None:
    with pytest.raises(TimeoutError, match=re.escape("last value: 0")):
        await wait_for(lambda: 0, timeout=0.05, message="never")


async def test_wait_for_ignores_listed_exceptions() -> None:
    attempts = []

    def flaky() -> bool:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("not yet")
        return True

    assert await wait_for(flaky, timeout=5, interval=0, ignore=(ConnectionError,))
    with pytest.raises(KeyError):
        await wait_for(lambda: {}["x"], timeout=1)


def test_wait_for_sync() -> None:
    values = iter([None, "", "done"])
    assert wait_for_sync(lambda: next(values), timeout=5, interval=0) == "done"
    with pytest.raises(TimeoutError):
        wait_for_sync(lambda: False, timeout=0.05)


@pytest.mark.parametrize(
    ("result", "status"),
    [
        ({}, 200),
        ({"status_code": 201}, 201),
        ({"status_code": "408"}, 408),
        ({"status_code": "abc"}, 200),
        ({"status_code": [500]}, 200),
        ({"status_code": True}, 200),
        ({"status_code": 1000}, 200),
    ],
)
def test_blocking_status_is_read_like_map_utils_get_integer(
    result: dict[str, object], status: int
) -> None:
    assert result_status(result) == status
