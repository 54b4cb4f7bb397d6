"""The peer benchmark's pure helpers: engine flags, config edits, metrics, process roles."""

from __future__ import annotations

from typing import Any

from bench.bench_peer import (
    engine_cli_args,
    engine_counters,
    parse_assignment,
    parse_prometheus,
    set_path,
    step_figures,
    worker_role,
)

VLLM_TEXT = """\
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="tiny-llama"} 10.0
vllm:iteration_tokens_total_bucket{engine="0",le="8.0",model_name="tiny-llama"} 40.0
vllm:iteration_tokens_total_count{engine="0",model_name="tiny-llama"} 40.0
vllm:iteration_tokens_total_sum{engine="0",model_name="tiny-llama"} 250.0
vllm:generation_tokens_total{engine="0",model_name="tiny-llama"} 200.0
vllm:prompt_tokens_total{engine="0",model_name="tiny-llama"} 50.0
"""

# Ray's metrics agent: a ray_ prefix, ':' as '_', a label whose value ends in "le=".
RAY_TEXT = """\
ray_vllm_iteration_tokens_total_bucket{ReplicaId="a",handle="xle=",le="1.0"} 4.0
ray_vllm_iteration_tokens_total_bucket{ReplicaId="a",handle="xle=",le="+Inf"} 30.0
ray_vllm_iteration_tokens_total_count{ReplicaId="a"} 20.0
ray_vllm_iteration_tokens_total_count{ReplicaId="b"} 10.0
ray_vllm_iteration_tokens_total_sum{ReplicaId="a"} 160.0
ray_vllm_generation_tokens_total{ReplicaId="a"} 150.0
ray_serve_num_router_requests_total{deployment="x",le="oops"} 3.0
"""


def test_engine_kwargs_become_vllm_flags() -> None:
    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "max_model_len": 512,
        "enforce_eager": True,
        "enable_lora": False,
        "tool_call_parser": None,
        "structured_outputs_config": {"enable_in_reasoning": True},
    }
    assert engine_cli_args(kwargs) == [
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--structured-outputs-config",
        '{"enable_in_reasoning": true}',
    ]


def test_set_path_walks_lists_and_deletes_on_null() -> None:
    args: dict[str, Any] = {"llm_configs": [{"engine_kwargs": {"a": 1, "b": 2}}]}
    set_path(args, "llm_configs.0.engine_kwargs.a", 3)
    set_path(args, "llm_configs.0.engine_kwargs.b", None)
    set_path(args, "poller.load_report_interval_s", 0.5)
    assert args == {
        "llm_configs": [{"engine_kwargs": {"a": 3}}],
        "poller": {"load_report_interval_s": 0.5},
    }
    assert parse_assignment("x.y=null") == ("x.y", None)
    assert parse_assignment("OMP_NUM_THREADS=2") == ("OMP_NUM_THREADS", 2)
    assert parse_assignment("backend=uni") == ("backend", "uni")


def test_engine_counters_from_vllm_and_from_rays_agent() -> None:
    assert engine_counters(parse_prometheus(VLLM_TEXT)) == {
        "steps": 40.0,
        "steps_of_1_token": 10.0,
        "generation_tokens": 200.0,
        "prompt_tokens": 50.0,
        "preemptions": 0.0,
    }
    ray = engine_counters(parse_prometheus(RAY_TEXT))
    assert ray is not None
    assert (ray["steps"], ray["steps_of_1_token"], ray["generation_tokens"]) == (30.0, 4.0, 150.0)
    assert engine_counters(parse_prometheus("up 1\n")) is None


def test_step_figures_are_the_difference_and_the_mean_batch() -> None:
    before = engine_counters(parse_prometheus(VLLM_TEXT))
    assert before is not None
    after = {**before, "steps": 140.0, "steps_of_1_token": 30.0, "generation_tokens": 1000.0}
    figures = step_figures(before, after)
    assert figures["steps"] == 100.0
    assert figures["generation_tokens_per_step"] == 8.0
    assert figures["share_of_steps_with_1_token"] == 0.2
    assert step_figures(None, after) is None


def test_worker_process_roles() -> None:
    assert worker_role("ray::ServeReplica:bench-peer:QueuePoller") == "poller"
    assert worker_role("ray::ServeReplica:bench-peer:tiny-llama.handle_request") == "llm"
    assert worker_role("ray::RedisPublisher.publish") == "publisher"
    assert worker_role("VLLM::EngineCore") == "engine_core"
    assert worker_role("VLLM::Worker") == "engine_worker"
    assert worker_role("ray::ServeController.listen_for_change") == "ray"
    assert worker_role("/usr/lib/ray/gcs_server --gcs_server_port=1") == "ray"
