"""The limits on one task (``ray_worker.task.limits``): each limit at the bound passes, one
over is a 400 ``invalid_request_error`` naming the field and the limit; the sizes measured; the
fan-out a task holds; per-queue limits over the worker-wide ones."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ray_worker.config import DispatcherConfig, QueueSpec
from ray_worker.errors import InvalidTaskError
from ray_worker.task.limits import TaskLimits, check_task, fan_out, grammar_chars, prompt_chars

NO_LIMITS = TaskLimits()


def refused(data: dict[str, Any], limits: TaskLimits) -> InvalidTaskError:
    with pytest.raises(InvalidTaskError) as caught:
        check_task(data, limits)
    err = caught.value
    assert err.status_code == 400
    assert err.to_body()["error"]["type"] == "invalid_request_error"
    return err


# -- n, best_of, max_tokens, max_completion_tokens -------------------------------------------


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("n", "max_n"),
        ("best_of", "max_n"),
        ("max_tokens", "max_output_tokens"),
        ("max_completion_tokens", "max_output_tokens"),
    ],
)
def test_numbers_at_the_limit_pass_one_over_is_400_naming_field_and_limit(
    field: str, limit: str
) -> None:
    limits = TaskLimits(**{limit: 8})
    check_task({field: 8}, limits)
    check_task({field: 1}, limits)
    err = refused({field: 9}, limits)
    assert err.param == field
    assert limit in err.message
    assert f"'{field}' is 9" in err.message
    assert "at most 8" in err.message
    refused({field: 8.5}, limits)


@pytest.mark.parametrize("value", ["9", True, None, [9], {"n": 9}])
def test_a_field_that_is_not_a_number_is_left_to_the_engine(value: Any) -> None:
    check_task({"n": value, "max_tokens": value}, TaskLimits(max_n=1, max_output_tokens=1))


def test_no_limit_takes_anything() -> None:
    huge = "x" * 2_000_000
    check_task(
        {
            "n": 16384,
            "max_tokens": 10**9,
            "prompt": huge,
            "response_format": {"type": "json_schema", "json_schema": {"s": huge}},
        },
        NO_LIMITS,
    )


# -- prompt size ------------------------------------------------------------------------------


def test_messages_count_the_text_of_their_content() -> None:
    data = {
        "messages": [
            {"role": "system", "content": "abc"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "de"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "f"},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
    }
    assert prompt_chars(data) == {"messages": 6}


@pytest.mark.parametrize(
    ("prompt", "chars"),
    [
        ("hello", 5),
        (["ab", "cde"], 5),
        ([1, 2, 3], 3),  # token ids count one each
        ([[1, 2], [3]], 3),
        ([], 0),
        (7, 0),  # not a prompt: the engine's 400
    ],
)
def test_prompt_and_input_shapes(prompt: Any, chars: int) -> None:
    assert prompt_chars({"prompt": prompt}) == {"prompt": chars}
    assert prompt_chars({"input": prompt}) == {"input": chars}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", [{"role": "user", "content": "x" * 100}]),
        ("messages", [{"role": "user", "content": [{"type": "text", "text": "x" * 100}]}]),
        ("prompt", "x" * 100),
        ("prompt", ["x" * 50, "x" * 50]),
        ("prompt", list(range(100))),
        ("input", "x" * 100),
        ("input", [list(range(60)), list(range(40))]),
    ],
)
def test_prompt_at_the_limit_passes_one_over_is_400(field: str, value: Any) -> None:
    check_task({field: value}, TaskLimits(max_prompt_chars=100))
    err = refused({field: value}, TaskLimits(max_prompt_chars=99))
    assert err.param == field
    assert "max_prompt_chars" in err.message
    assert "is 100 characters" in err.message
    assert "at most 99" in err.message


# -- grammar size -----------------------------------------------------------------------------


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def compact(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


@pytest.mark.parametrize(
    ("field", "value", "size"),
    [
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}},
            compact({"name": "n", "schema": SCHEMA}),
        ),
        ("structured_outputs", {"json": SCHEMA}, compact({"json": SCHEMA})),
        ("structured_outputs", {"regex": "[a-z]+"}, compact({"regex": "[a-z]+"})),
        ("guided_json", SCHEMA, compact(SCHEMA)),
        ("guided_regex", "[a-z]+é", 7),  # a string counts its characters
        ("guided_choice", ["yes", "no"], compact(["yes", "no"])),
        ("guided_grammar", 'root ::= "a"', 12),
    ],
)
def test_grammar_at_the_limit_passes_one_over_is_400(field: str, value: Any, size: int) -> None:
    assert grammar_chars({field: value}) == {field: size}
    check_task({field: value}, TaskLimits(max_grammar_chars=size))
    err = refused({field: value}, TaskLimits(max_grammar_chars=size - 1))
    assert err.param == field
    assert "max_grammar_chars" in err.message
    assert str(size) in err.message


def test_json_object_and_text_formats_have_no_grammar() -> None:
    assert grammar_chars({"response_format": {"type": "json_object"}}) == {"response_format": 0}
    check_task({"response_format": {"type": "text"}}, TaskLimits(max_grammar_chars=1))


def test_grammar_fields_add_up_and_the_largest_is_named() -> None:
    data = {"guided_regex": "a" * 10, "structured_outputs": {"regex": "b" * 30}}
    total = 10 + compact({"regex": "b" * 30})
    check_task(data, TaskLimits(max_grammar_chars=total))
    err = refused(data, TaskLimits(max_grammar_chars=total - 1))
    assert err.param == "structured_outputs"
    assert f"are {total} characters" in err.message


def test_a_grammar_too_deep_to_measure_is_over_the_limit() -> None:
    deep: Any = "x"
    for _ in range(100_000):
        deep = [deep]
    err = refused({"guided_json": deep}, TaskLimits(max_grammar_chars=65_536))
    assert err.param == "guided_json"
    assert "nested too deeply" in err.message


# -- fan-out ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "sequences"),
    [
        ({}, 1),
        ({"n": 1}, 1),
        ({"n": 4}, 4),
        ({"n": 2, "best_of": 5}, 5),
        ({"n": 3.0}, 3),
        ({"n": 0}, 1),
        ({"n": -2}, 1),
        ({"n": "4"}, 1),
        ({"n": True}, 1),
        ({"n": float("nan")}, 1),
        ({"n": float("inf")}, 1),
        ({"n": 100}, 16),  # over max_n: answered 400, charged no more than the limit meanwhile
    ],
)
def test_fan_out(data: dict[str, Any], sequences: int) -> None:
    assert fan_out(data, TaskLimits(max_n=16)) == sequences


def test_fan_out_without_a_limit_is_the_tasks_n() -> None:
    assert fan_out({"n": 16384}, NO_LIMITS) == 16384


# -- per queue over worker-wide ---------------------------------------------------------------


def test_a_queue_overrides_only_the_limits_it_sets() -> None:
    defaults = DispatcherConfig(max_n=8, max_output_tokens=1000)
    assert TaskLimits.of(None, defaults) == TaskLimits(
        max_n=8, max_output_tokens=1000, max_prompt_chars=1_048_576, max_grammar_chars=65_536
    )
    assert TaskLimits.of(QueueSpec(name="q:0"), defaults) == TaskLimits.of(None, defaults)
    queue = QueueSpec(name="q:1", max_n=2, max_output_tokens=None)
    assert TaskLimits.of(queue, defaults) == TaskLimits(
        max_n=2, max_output_tokens=None, max_prompt_chars=1_048_576, max_grammar_chars=65_536
    )


def test_the_defaults_take_ordinary_tasks() -> None:
    limits = TaskLimits.of(None, DispatcherConfig())
    check_task(
        {
            "messages": [{"role": "user", "content": "x" * 100_000}],
            "n": 16,
            "max_tokens": 32_768,
            "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        },
        limits,
    )
    assert refused({"n": 17}, limits).param == "n"
