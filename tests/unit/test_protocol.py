"""Golden-fixture and property tests of ``ray_worker.bella.protocol`` (the wire spec as models)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from ray_worker.bella import protocol
from ray_worker.bella.protocol import (
    BATCH_ID_RE,
    COMPLETION_EVENT,
    PROGRESS_EVENT,
    STREAM_DONE,
    TASK_ID_RE,
    Batch,
    BatchInputLine,
    BatchOutputLine,
    BatchRequest,
    BellaErrorBody,
    BellaResponse,
    CompletionEvent,
    EventBusConfig,
    Level,
    ProgressEvent,
    PutRequest,
    RegisterRequest,
    ResponseMode,
    TakeRequest,
    TakeResponse,
    TakeStrategy,
    Task,
    TaskResult,
    completion_fields,
    decode_event,
    make_batch_id,
    make_task_id,
    openai_error,
    parse_full_queue_name,
    progress_fields,
    result_body,
    sse_data,
    validate_queue_name,
)
from ray_worker.errors import InvalidTaskError, ModelNotFoundError

DATA = Path(__file__).resolve().parent.parent / "data"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# Round trips: fixture → model → to_wire() == fixture
# --------------------------------------------------------------------------------------

ROUND_TRIPS: list[tuple[str, type[protocol.WireModel]]] = [
    ("register_request.json", RegisterRequest),
    ("put_callback_offline.json", PutRequest),
    ("put_callback_online.json", PutRequest),
    ("put_blocking.json", PutRequest),
    ("put_streaming.json", PutRequest),
    ("put_callback_response.json", BellaResponse),
    ("take_request.json", TakeRequest),
    ("eventbus.json", EventBusConfig),
    ("eventbus_guide.json", EventBusConfig),
    ("complete_request.json", TaskResult),
    ("complete_timeout_result.json", TaskResult),
    ("complete_stream_ok.json", TaskResult),
    ("error_400.json", BellaErrorBody),
    ("error_500.json", BellaErrorBody),
    ("batch_request.json", BatchRequest),
    ("batch.json", Batch),
    ("batch_cancelled.json", Batch),
    ("batch_input_line.json", BatchInputLine),
    ("batch_output_line.json", BatchOutputLine),
]


@pytest.mark.parametrize(("name", "model"), ROUND_TRIPS, ids=[n for n, _ in ROUND_TRIPS])
def test_fixture_round_trips(name: str, model: type[protocol.WireModel]) -> None:
    wire = load(name)
    parsed = model.model_validate(wire)
    assert parsed.to_wire() == wire
    # The JSON text round-trips too (what actually crosses the wire).
    assert model.model_validate_json(json.dumps(wire)).to_wire() == wire


@pytest.mark.parametrize(
    "name",
    [
        "take_response_offline.json",
        "take_response_online.json",
        "take_response_empty.json",
    ],
)
def test_take_response_round_trips(name: str) -> None:
    wire = load(name)
    response = TakeResponse.from_wire(wire)
    assert response.to_wire() == wire
    assert [t.task_id for t in response.all_tasks()] == [
        t["task_id"] for tasks in wire.values() for t in tasks
    ]


def test_register_response_is_a_json_string_literal() -> None:
    assert (DATA / "register_response.json").read_text().strip() == '"deepseek-r1"'
    assert load("register_response.json") == "deepseek-r1"


def test_offline_task_fields() -> None:
    task = TakeResponse.from_wire(load("take_response_offline.json")).tasks["deepseek-r1:1"][0]
    assert task.level == Level.OFFLINE
    assert task.response_mode is ResponseMode.BATCH
    assert not task.is_online
    assert task.status == "waiting"
    assert task.callback_url == ""
    assert task.instance_id is None
    assert task.full_queue == "test-queue:1"
    assert task.data["temperature"] == 0.7


def test_online_task_fields() -> None:
    task = TakeResponse.from_wire(load("take_response_online.json")).tasks["deepseek-r1:0"][0]
    assert task.is_online
    assert task.response_mode is ResponseMode.BLOCKING
    assert task.status is None
    assert task.instance_id == "xx.xx.xx.xx:xxxx"
    # The guide's online example: expire_time - start_time = 300 s (§2.1).
    assert task.expire_time - task.start_time == 300_000
    assert not task.expired(at_ms=task.start_time)
    assert task.expired(at_ms=task.expire_time)


def test_zero_expire_time_never_expires() -> None:
    assert not Task(task_id="t").expired(at_ms=10**15)


def test_take_request_guide_body_gains_explicit_defaults() -> None:
    guide = load("take_request_guide.json")
    request = TakeRequest.model_validate(guide)
    assert request.to_wire() == {
        **guide,
        "process_timeout": 0,
        "process_max_retries": 0,
        "min_age_seconds": 0,
    }


def test_take_request_validation() -> None:
    with pytest.raises(ValidationError):
        TakeRequest(queues=[], size=1)
    with pytest.raises(ValidationError):
        TakeRequest(queues=["q:0"], size=1, process_max_retries=-2)
    with pytest.raises(ValidationError):
        TakeRequest.model_validate({"queues": ["q:0"], "size": 1, "strategy": "lifo"})
    assert TakeRequest(queues=["q:0"], size=1).strategy is TakeStrategy.FIFO


def test_outbound_models_reject_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        RegisterRequest.model_validate({**load("register_request.json"), "extra": 1})
    with pytest.raises(ValidationError):
        PutRequest.model_validate({**load("put_blocking.json"), "priority": 1})


# --------------------------------------------------------------------------------------
# Secrets: ak and the eventbus password
# --------------------------------------------------------------------------------------


def test_ak_only_revealed_by_to_wire() -> None:
    wire = load("take_response_online.json")
    wire["deepseek-r1:0"][0]["ak"] = "sk-producer-secret"
    response = TakeResponse.from_wire(wire)
    task = response.all_tasks()[0]
    assert task.ak is not None
    assert task.ak.get_secret_value() == "sk-producer-secret"
    assert task.to_wire()["ak"] == "sk-producer-secret"
    assert response.to_wire() == wire
    for text in (
        repr(task),
        str(task),
        repr(response),
        str(response),
        json.dumps(task.model_dump()),
        task.model_dump_json(),
        json.dumps(task.model_dump(mode="json")),
        response.model_dump_json(),
    ):
        assert "sk-producer-secret" not in text


def test_eventbus_repr_hides_the_password() -> None:
    config = EventBusConfig.model_validate(load("eventbus.json"))
    assert "s3cret" not in repr(config)
    assert "s3cret" not in str(config)
    assert "***" in repr(config)
    assert config.to_wire()["url"] == "redis://:s3cret@10.0.0.5:6379/0"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert protocol.redact_url(url) == redacted


# --------------------------------------------------------------------------------------
# Tolerant readers
# --------------------------------------------------------------------------------------

INBOUND: list[tuple[str, type[BaseModel]]] = [
    ("put_callback_response.json", BellaResponse),
    ("eventbus.json", EventBusConfig),
    ("complete_request.json", TaskResult),
    ("error_500.json", BellaErrorBody),
    ("batch.json", Batch),
    ("batch_input_line.json", BatchInputLine),
]


@pytest.mark.parametrize(("name", "model"), INBOUND, ids=[n for n, _ in INBOUND])
def test_inbound_models_ignore_unknown_fields(name: str, model: type[BaseModel]) -> None:
    wire = load(name)
    parsed = model.model_validate({**wire, "some_future_field": {"x": 1}})
    assert parsed == model.model_validate(wire)


def test_task_ignores_unknown_fields_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    entry = load("take_response_online.json")["deepseek-r1:0"][0]
    caplog.set_level(logging.INFO, logger="ray_worker.bella.protocol")
    protocol._warned_unknown.clear()
    for _ in range(3):
        task = Task.model_validate({**entry, "worker_hint_zz": "x"})
        assert task.task_id == entry["task_id"]
    notes = [r for r in caplog.records if "worker_hint_zz" in r.getMessage()]
    assert len(notes) == 1


def test_aliased_event_fields_are_not_reported_unknown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ray_worker.bella.protocol")
    protocol._warned_unknown.clear()
    decode_event(load("event_progress_chunk.json"))
    decode_event(load("event_completion.json"))
    assert not [r for r in caplog.records if "ignoring unknown" in r.getMessage()]


# --------------------------------------------------------------------------------------
# Names, levels, ids
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek-r1", "a", "A_b-9", "x" * 64])
def test_valid_queue_names(name: str) -> None:
    assert validate_queue_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a:b", "a.b", "a b", "名字", "q/1"])
def test_invalid_queue_names(name: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        validate_queue_name(name)


@pytest.mark.parametrize(
    ("full", "expected"),
    [("q:0", ("q", Level.ONLINE)), ("deepseek-r1:1", ("deepseek-r1", Level.OFFLINE))],
)
def test_parse_full_queue_name(full: str, expected: tuple[str, Level]) -> None:
    assert parse_full_queue_name(full) == expected
    assert protocol.full_queue_name(*expected) == full


@pytest.mark.parametrize("full", ["q", "q:0:1", "q:2", "q:-1", "q:x", "a.b:0", ":0"])
def test_malformed_full_queue_names(full: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - three distinct messages
        parse_full_queue_name(full)


def test_level_two_is_unknown() -> None:
    with pytest.raises(ValueError, match="Unknown queue level"):
        parse_full_queue_name("q:2")


def test_task_ids_follow_the_server_format() -> None:
    at_ms = 1762950826730
    for mode, letter in [
        (ResponseMode.BLOCKING, "B"),
        (ResponseMode.STREAMING, "S"),
        (ResponseMode.CALLBACK, "C"),
        (ResponseMode.BATCH, "P"),
    ]:
        task_id = make_task_id(12, 0, mode, at_ms, instance=1, serial=42)
        match = TASK_ID_RE.match(task_id)
        assert match is not None, task_id
        assert match["mode"] == letter
        assert match["queue_id"] == "12"
        assert match["level"] == "0"
        assert match["stamp"] == "251112123346"
        assert match["instance"] == "0001"
        assert match["serial"] == "000042"
    wrapped = make_task_id(3, 1, ResponseMode.BATCH, at_ms, instance=123456, serial=98765432)
    assert wrapped.endswith("-3456-765432")
    assert TASK_ID_RE.match(wrapped)
    batch_id = make_batch_id(12, 1, at_ms, instance=7, serial=1)
    assert batch_id == "BATCH-12-1-251112123346-0007-000001"
    assert BATCH_ID_RE.match(batch_id)
    assert not TASK_ID_RE.match(batch_id)


def test_fixture_ids_match_the_format() -> None:
    assert TASK_ID_RE.match(load("put_callback_response.json")["data"])
    assert TASK_ID_RE.match(load("batch_output_line.json")["id"])
    assert BATCH_ID_RE.match(load("batch.json")["id"])
    # The guide's ids are placeholders and do not match; workers treat ids as opaque anyway.
    assert not TASK_ID_RE.match(load("complete_request.json")["request_id"])


# --------------------------------------------------------------------------------------
# PutRequest effective level and lifetime (§1.3)
# --------------------------------------------------------------------------------------


def put(**kwargs: Any) -> PutRequest:
    return PutRequest(endpoint="/v1/chat/completions", data={"model": "m"}, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "mode", "level"),
    [
        ({}, ResponseMode.CALLBACK, Level.ONLINE),
        ({"level": 1}, ResponseMode.CALLBACK, Level.OFFLINE),
        ({"level": -1}, ResponseMode.CALLBACK, Level.OFFLINE),
        ({"level": 0, "response_mode": "callback"}, ResponseMode.CALLBACK, Level.ONLINE),
        ({"level": 1, "response_mode": "batch"}, ResponseMode.BATCH, Level.OFFLINE),
        ({"level": 1, "response_mode": "blocking"}, ResponseMode.BLOCKING, Level.ONLINE),
        ({"level": 1, "response_mode": "streaming"}, ResponseMode.STREAMING, Level.ONLINE),
    ],
)
def test_put_effective_mode_and_level(
    kwargs: dict[str, Any], mode: ResponseMode, level: Level
) -> None:
    request = put(**kwargs)
    assert request.effective_mode is mode
    assert request.effective_level is level


def test_put_unknown_level_is_rejected_where_it_applies() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - enum's own message
        _ = put(level=2).effective_level
    # Online modes force level 0 whatever was sent (Put.getQueueLevel()).
    assert put(level=2, response_mode="blocking").effective_level is Level.ONLINE


@pytest.mark.parametrize(
    ("kwargs", "lifetime_s"),
    [
        ({"response_mode": "blocking"}, 300),
        ({"response_mode": "blocking", "timeout": 60}, 60),
        ({"response_mode": "streaming", "timeout": 900}, 300),
        ({"response_mode": "blocking", "timeout": 0}, 300),
        ({}, 300),  # callback without level is online
        ({"timeout": 1000}, 300),
        ({"level": 1}, 300),  # default timeout 300 applies offline too
        ({"level": 1, "timeout": 7200}, 7200),
        ({"level": 1, "timeout": 0}, 86400),
        ({"level": 1, "response_mode": "batch", "timeout": -5}, 86400),
    ],
)
def test_put_lifetime(kwargs: dict[str, Any], lifetime_s: int) -> None:
    assert put(**kwargs).lifetime_s == lifetime_s


def test_put_fixture_levels() -> None:
    assert PutRequest.model_validate(load("put_callback_offline.json")).effective_level == 1
    assert PutRequest.model_validate(load("put_callback_online.json")).effective_level == 0
    assert PutRequest.model_validate(load("put_blocking.json")).effective_mode.is_online
    assert PutRequest.model_validate(load("put_streaming.json")).lifetime_s == 60


# --------------------------------------------------------------------------------------
# Results and errors (§6)
# --------------------------------------------------------------------------------------


def test_task_result_status() -> None:
    assert TaskResult.model_validate(load("complete_timeout_result.json")).status == 408
    assert TaskResult.model_validate(load("complete_request.json")).status == 200
    assert TaskResult().status == 200
    assert TaskResult(status_code="oops").status == 200


def test_result_body_is_exact() -> None:
    wire = load("complete_request.json")
    assert result_body(200, wire["request_id"], wire["body"]) == wire
    assert result_body(200, "t") == {"status_code": 200, "request_id": "t"}


def test_openai_error_shapes_agree() -> None:
    wire = load("openai_error.json")
    detail = wire["error"]
    assert openai_error(detail["message"], detail["type"], detail["code"]) == wire
    assert ModelNotFoundError(detail["message"]).to_body() == wire
    invalid = InvalidTaskError("bad", "messages").to_body()
    assert invalid == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "invalid_request",
        }
    }


def test_batch_list_page() -> None:
    page = load("batch_list.json")
    assert page["object"] == "list"
    batches = [Batch.model_validate(b) for b in page["data"]]
    assert batches[0].request_counts.completed == 1
    assert batches[0].created_at > 10**12  # epoch milliseconds (§1.9)


def test_batch_output_line_embeds_the_complete_payload() -> None:
    line = BatchOutputLine.model_validate(load("batch_output_line.json"))
    assert line.response["request_id"] == line.id
    assert TaskResult.model_validate(line.response).status == 200


# --------------------------------------------------------------------------------------
# Stream events (§4.2): exact field strings
# --------------------------------------------------------------------------------------

PROGRESS_FIXTURES = [
    "event_progress_chunk.json",
    "event_progress_done.json",
    "event_progress_error.json",
    "event_progress_guide.json",
]
COMPLETION_FIXTURES = ["event_completion.json", "event_completion_stream.json"]


@pytest.mark.parametrize("name", PROGRESS_FIXTURES)
def test_progress_fields_match_fixture(name: str) -> None:
    fields = load(name)
    event = decode_event(fields)
    assert isinstance(event, ProgressEvent)
    assert event.name == PROGRESS_EVENT
    assert event.timestamp == int(fields["timestamp"])
    assert event.event_id is not None
    assert event.event_name is not None
    again = progress_fields(
        event.task_id, event.event_id, event.event_name, event.event_data, at_ms=event.timestamp
    )
    assert again == fields
    assert list(again) == ["name", "from", "payload", "context", "timestamp"]


@pytest.mark.parametrize("name", COMPLETION_FIXTURES)
def test_completion_fields_match_fixture(name: str) -> None:
    fields = load(name)
    event = decode_event(fields)
    assert isinstance(event, CompletionEvent)
    assert event.name == COMPLETION_EVENT
    assert completion_fields(event.task_id, event.result, at_ms=event.timestamp) == fields
    assert TaskResult.model_validate(event.result).status == 200


def test_done_and_error_progress_data() -> None:
    done = decode_event(load("event_progress_done.json"))
    assert isinstance(done, ProgressEvent)
    assert done.event_data == STREAM_DONE
    assert sse_data(done.event_data) == "[DONE]"
    error = decode_event(load("event_progress_error.json"))
    assert isinstance(error, ProgressEvent)
    assert error.event_data["error"]["code"] == "engine_error"


def test_decode_event_accepts_bytes() -> None:
    fields = load("event_progress_chunk.json")
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    assert decode_event(raw) == decode_event(fields)


def test_decode_event_unknown_and_malformed() -> None:
    assert decode_event({"name": "batch-expire-event", "payload": "{}"}) is None
    assert decode_event({}) is None
    with pytest.raises(ValueError):  # noqa: PT011 - JSONDecodeError
        decode_event({"name": PROGRESS_EVENT, "payload": "not json"})
    with pytest.raises(ValueError, match="JSON object"):
        decode_event({"name": PROGRESS_EVENT, "payload": "[1]"})
    with pytest.raises(ValidationError):
        decode_event({"name": PROGRESS_EVENT, "payload": '{"eventId":"0"}'})
    with pytest.raises(ValidationError):
        decode_event({"name": COMPLETION_EVENT, "payload": '{"taskId":"t","result":[1]}'})
    # No timestamp field (SDKs before openapi-spi 1.2.74).
    event = decode_event({"name": COMPLETION_EVENT, "from": "", "payload": '{"taskId":"t"}'})
    assert isinstance(event, CompletionEvent)
    assert event.timestamp is None
    assert event.result == {}


def test_event_timestamps_default_to_now() -> None:
    before = protocol.now_ms()
    fields = progress_fields("t", "0", "message", {})
    after = protocol.now_ms()
    assert before <= int(fields["timestamp"]) <= after
    assert protocol.event_minid(at_ms=after) == after - 30 * 60 * 1000
    assert protocol.stream_key("redis-mesh:private-stream:p:", "10.0.0.5:8080") == (
        "redis-mesh:private-stream:p:10.0.0.5:8080"
    )


# --------------------------------------------------------------------------------------
# sse_data (§4.4)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_data", "expected"),
    [
        ("[DONE]", "[DONE]"),
        ("plain text", "plain text"),
        ('data: {"a":1}', '{"a":1}'),
        ("data:[DONE]  ", "[DONE]"),
        ("data:", ""),
        (" data: x", " data: x"),  # only a leading "data:" is stripped
        ({"a": 1, "b": "é"}, '{"a":1,"b":"é"}'),
        ([1, 2], "[1,2]"),
        (None, "null"),
        (3, "3"),
    ],
)
def test_sse_data(event_data: Any, expected: str) -> None:
    assert sse_data(event_data) == expected


def test_sse_data_of_the_chunk_fixture_matches_the_sse_fixture() -> None:
    chunk = decode_event(load("event_progress_chunk.json"))
    assert isinstance(chunk, ProgressEvent)
    sse = (DATA / "put_streaming_response.sse").read_text(encoding="utf-8")
    assert f"data:{sse_data(chunk.event_data)}\n" in sse


# --------------------------------------------------------------------------------------
# Property: arbitrary JSON event data round-trips through the encoders
# --------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(
    task_id=st.text(min_size=1, max_size=40),
    event_id=st.text(max_size=10),
    event_name=st.text(max_size=20),
    event_data=json_values,
    at_ms=st.integers(min_value=0, max_value=2**53),
    as_bytes=st.booleans(),
)
def test_progress_round_trip_property(
    task_id: str, event_id: str, event_name: str, event_data: Any, at_ms: int, as_bytes: bool
) -> None:
    fields = progress_fields(task_id, event_id, event_name, event_data, at_ms=at_ms)
    assert all(isinstance(v, str) for v in fields.values())
    wire: Any = {k.encode(): v.encode() for k, v in fields.items()} if as_bytes else fields
    event = decode_event(wire)
    assert isinstance(event, ProgressEvent)
    assert (event.task_id, event.event_id, event.event_name) == (task_id, event_id, event_name)
    assert event.event_data == event_data
    assert event.timestamp == at_ms


@given(
    task_id=st.text(min_size=1, max_size=40),
    result=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    as_bytes=st.booleans(),
)
def test_completion_round_trip_property(
    task_id: str, result: dict[str, Any], as_bytes: bool
) -> None:
    fields = completion_fields(task_id, result, at_ms=1)
    wire: Any = {k.encode(): v.encode() for k, v in fields.items()} if as_bytes else fields
    event = decode_event(wire)
    assert isinstance(event, CompletionEvent)
    assert event.task_id == task_id
    assert event.result == result


# --------------------------------------------------------------------------------------
# Tolerant take parsing: one entry at a time, the unreadable ones kept aside with a reason
# --------------------------------------------------------------------------------------

GOOD_TASK = {
    "task_id": "TASK-7-0-B-250101000000-0001-000001",
    "ak": "sk-producer",
    "endpoint": "/v1/chat/completions",
    "queue": "q",
    "level": 0,
    "data": {"messages": [{"role": "user", "content": "hi"}]},
    "instance_id": "10.0.0.5:8080",
    "response_mode": "blocking",
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"data": [1, 2]}, "data"),
        ({"data": "text"}, "data"),
        ({"response_mode": "carrier"}, "response_mode"),
        ({"response_mode": 3}, "response_mode"),
        ({"task_id": 17}, "task_id"),
        ({"task_id": ""}, "task_id"),
        ({"task_id": "T" * 300}, "task_id"),
        ({"task_id": "T\udc80"}, "task_id"),
        ({"instance_id": "i\ud800"}, "instance_id"),
        ({"queue": "q\udfff"}, "queue"),
        ({"level": "zero"}, "level"),
        ({"level": 2**40}, "level"),
        ({"expire_time": -1}, "expire_time"),
        ({"start_time": 10**30}, "start_time"),
        ({"start_time": 1.5}, "start_time"),
        ({"ak": 5}, "ak"),
    ],
)
def test_from_wire_keeps_the_good_tasks_and_rejects_the_bad_one(
    change: dict[str, Any], field: str
) -> None:
    bad = {**GOOD_TASK, "task_id": "T-bad", **change}
    good2 = {**GOOD_TASK, "task_id": "T-good-2"}
    response = TakeResponse.from_wire({"q:0": [GOOD_TASK, bad, good2]})
    assert [t.task_id for t in response.all_tasks()] == [GOOD_TASK["task_id"], "T-good-2"]
    assert len(response.rejected) == 1
    invalid = response.rejected[0]
    assert invalid.queue == "q:0"
    assert invalid.reason.startswith(field)
    assert invalid.raw is bad
    # Neither the reason nor the repr carries a value of the entry (the ak above all).
    assert "sk-producer" not in invalid.reason
    assert "sk-producer" not in repr(invalid)
    assert "sk-producer" not in repr(response)


def test_from_wire_rejects_non_objects_and_non_lists_and_keeps_the_rest() -> None:
    response = TakeResponse.from_wire(
        {"q:0": ["junk", None, 5, [GOOD_TASK], GOOD_TASK], "q:1": {"task_id": "x"}}
    )
    assert [t.task_id for t in response.all_tasks()] == [GOOD_TASK["task_id"]]
    assert [r.queue for r in response.rejected] == ["q:0"] * 4 + ["q:1"]
    assert response.rejected[-1].reason == "the queue maps to a non-list"
    assert TakeResponse.from_wire(["q:0"]).rejected[0].reason.startswith("the take answer")
    assert TakeResponse.from_wire({}).all_tasks() == []


def test_valid_odd_values_still_parse() -> None:
    odd = {**GOOD_TASK, "level": 7, "queue": "\u4f60\u597d", "data": {"model": "m\udc80"}}
    (task,) = TakeResponse.from_wire({"x:7": [odd]}).all_tasks()
    assert task.level == 7
    assert task.data["model"] == "m\udc80"  # answered 404 by the dispatcher, not here


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (GOOD_TASK | {"data": 1}, (GOOD_TASK["task_id"], "blocking", "10.0.0.5:8080")),
        (
            {"task_id": "T1", "response_mode": "streaming", "instance_id": "i"},
            ("T1", "streaming", "i"),
        ),
        ({"task_id": "T1", "response_mode": "callback", "data": []}, ("T1", "callback", None)),
        ({"task_id": "T1", "response_mode": "batch"}, ("T1", "batch", None)),
        # Unknown or absent mode: the server's default (callback) is answered by HTTP complete.
        ({"task_id": "T1", "response_mode": "carrier"}, ("T1", "callback", None)),
        ({"task_id": "T1", "response_mode": ["x"]}, ("T1", "callback", None)),
        ({"task_id": "T1"}, ("T1", "callback", None)),
    ],
)
def test_task_return_path(raw: dict[str, Any], expected: tuple[str, str, str | None]) -> None:
    stub = protocol.task_return_path(raw)
    assert stub is not None
    assert (stub.task_id, stub.response_mode.value, stub.instance_id) == expected
    assert stub.ak is None
    assert stub.data == {}


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "T1",
        [GOOD_TASK],
        {},
        {"task_id": 5},
        {"task_id": ""},
        {"task_id": "T\udc80"},
        {"task_id": "T" * 300},
        {"task_id": "T1", "response_mode": "blocking"},  # online without instance_id
        {"task_id": "T1", "response_mode": "streaming", "instance_id": 5},
        {"task_id": "T1", "response_mode": "streaming", "instance_id": ""},
        {"task_id": "T1", "response_mode": "blocking", "instance_id": "i\udc80"},
    ],
)
def test_task_return_path_unknown(raw: Any) -> None:
    assert protocol.task_return_path(raw) is None


def test_task_return_path_keeps_readable_queue_and_level_only() -> None:
    stub = protocol.task_return_path({"task_id": "T", "queue": "q", "level": 1})
    assert stub is not None
    assert stub.full_queue == "q:1"
    stub = protocol.task_return_path({"task_id": "T", "queue": 5, "level": "x"})
    assert stub is not None
    assert stub.full_queue == ":0"


@given(raw=st.dictionaries(st.sampled_from([*GOOD_TASK, "x"]), json_values, max_size=8))
def test_from_wire_never_raises_property(raw: dict[str, Any]) -> None:
    response = TakeResponse.from_wire({"q:0": [raw, GOOD_TASK]})
    assert len(response.all_tasks()) + len(response.rejected) == 2
    assert response.all_tasks()[-1].task_id == GOOD_TASK["task_id"]


# --------------------------------------------------------------------------------------
# A take answer too deep for json.loads: split it, parse each task on its own
# --------------------------------------------------------------------------------------

DEEP = "[" * 5000 + "]" * 5000
"""A JSON value nested far deeper than ``json.loads`` goes."""

tricky_text = st.text(
    alphabet=st.characters()
    | st.characters(categories=["Cs"])
    | st.sampled_from('"\\[]{},: \n\t/'),
    max_size=12,
)
"""Strings with quotes, backslashes, brackets, control characters and lone surrogates."""

tricky_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(tricky_text, children, max_size=4)
    ),
    max_leaves=15,
)

take_entries = st.lists(
    st.builds(
        lambda n, data: {**GOOD_TASK, "task_id": f"T-{n}", "data": data}, st.integers(), tricky_json
    )
    | tricky_json,
    max_size=4,
)
take_bodies = st.dictionaries(tricky_text, take_entries, max_size=3)


def _dump(body: Any, style: int) -> str:
    if style == 0:
        return json.dumps(body)
    if style == 1:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(body, ensure_ascii=False, indent=1)


@given(body=take_bodies, style=st.integers(0, 2))
def test_split_gives_what_json_loads_gives_property(body: dict[str, Any], style: int) -> None:
    text = _dump(body, style)
    split = {
        key: [json.loads(entry) for entry in protocol.split_json_array(value)]
        for key, value in protocol.split_json_object(text)
    }
    assert split == json.loads(text)


@given(body=take_bodies, style=st.integers(0, 2), at=st.integers(0, 10))
def test_a_too_deep_task_is_rejected_alone_property(
    body: dict[str, Any], style: int, at: int
) -> None:
    marker = "@deep@"
    deep_task = {"task_id": "T-deep", "response_mode": "callback", "data": {"x": marker}}
    queue = next(iter(body), "q:0")
    entries = body.setdefault(queue, [])
    entries.insert(at % (len(entries) + 1), deep_task)
    text = _dump(body, style).replace(json.dumps(marker), DEEP)
    entries.remove(deep_task)
    expected = TakeResponse.from_wire(body)

    response = TakeResponse.from_text(text)

    assert response.tasks == expected.tasks
    deep = [
        r for r in response.rejected if r.raw == {"task_id": "T-deep", "response_mode": "callback"}
    ]
    assert [(r.queue, r.reason) for r in deep] == [
        (protocol._queue_label(queue), "data: nested too deeply")
    ]
    assert [r for r in response.rejected if r not in deep] == expected.rejected


def test_too_deep_take_keeps_every_other_task_and_the_deep_ones_return_path() -> None:
    good = json.dumps(GOOD_TASK)
    deep_online = json.dumps({**GOOD_TASK, "task_id": "T-deep", "ak": "sk-x"}).replace(
        '"data": {', f'"data": {{"deep": {DEEP}, '
    )
    text = (
        f'{{"q:0": [{good}, {deep_online}, {DEEP}], "q:1": [{good.replace("000001", "000002")}]}}'
    )
    with pytest.raises(RecursionError):
        json.loads(text)

    response = TakeResponse.from_text(text)

    assert [t.task_id for t in response.all_tasks()] == [
        GOOD_TASK["task_id"],
        GOOD_TASK["task_id"].replace("000001", "000002"),
    ]
    first, second = response.rejected
    assert (first.queue, first.reason) == ("q:0", "data: nested too deeply")
    assert first.raw == {k: v for k, v in GOOD_TASK.items() if k != "data"} | {
        "task_id": "T-deep",
        "ak": "sk-x",
    }
    stub = protocol.task_return_path(first.raw)
    assert stub is not None
    assert (stub.task_id, stub.response_mode, stub.instance_id) == (
        "T-deep",
        ResponseMode.BLOCKING,
        GOOD_TASK["instance_id"],
    )
    assert "sk-x" not in repr(response)
    # An entry that is not even an object has no return path: logged and dropped.
    assert (second.queue, second.reason, second.raw) == (
        "q:0",
        "the task is nested too deeply",
        None,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Expecting value"),
        ("[]", "expected a JSON object, got list"),
        ('"q"', "expected a JSON object, got str"),
        ('{"q:0": {"task_id": "t"}}', "queue 'q:0' maps to a non-list"),
        ('{"q:0": []} extra', "Extra data"),
        ('{"q:0": [' + DEEP + "}", "expected ',' or '}'"),
        ('{"q:0": [' + DEEP + ", {bad}]}", "Expecting property name"),
        ('{"q:0": [' + DEEP + "], " + DEEP + ": []}", "an object key must be a string"),
        ('{"q:0": [' + DEEP + '], "q:1": {"task_id": "t"}}', "queue 'q:1' maps to a non-list"),
        ('{"q:0": [' + DEEP + '] "q:1": []}', "expected ',' or '}'"),
        ('{"q:0": [' + DEEP + '], "q:1": ["unterminated]}', "unterminated JSON string"),
        ('{"q:0": [' + DEEP + "]", "expected ',' or '}'"),
    ],
)
def test_from_text_rejects_what_is_not_an_object_of_lists(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TakeResponse.from_text(text)


def test_from_text_parses_a_plain_answer_with_one_json_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real = json.loads

    def counting(text: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(text)
        return real(text, *args, **kwargs)

    wire = load("take_response_online.json")
    monkeypatch.setattr(protocol.json, "loads", counting)
    assert TakeResponse.from_text(json.dumps(wire)).to_wire() == wire
    assert len(calls) == 1


@pytest.mark.parametrize(
    "element",
    [
        "[" * 400 + "]" * 400,  # deep: most blocks are only counted
        "[" + "[]," * 3000 + '"]}]"]',  # shallow and wide: blocks walked bracket by bracket
        '{"a": ' * 300 + '"}]\\"{["' + "}" * 300,  # brackets in strings between the nests
    ],
    ids=["deep", "wide", "strings"],
)
def test_split_of_values_longer_than_a_scan_block(element: str) -> None:
    body = '{"q:0": [' + ", ".join([element] * 60) + "]}"
    assert len(body) > 10 * protocol._SCAN_BLOCK
    ((key, value),) = protocol.split_json_object(body)
    elements = protocol.split_json_array(value)
    assert key == "q:0"
    assert elements == [element] * 60
    assert [json.loads(e) for e in elements] == json.loads(body)["q:0"]
