"""Config: WorkerAppArgs defaults and validation, QueueSpec, env overrides, load_app_args."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from ray_worker.bella.protocol import Level, TakeStrategy
from ray_worker.config import (
    CapacityConfig,
    DispatcherConfig,
    EnvSettings,
    PollerConfig,
    PublisherOptions,
    QueueSpec,
    WorkerAppArgs,
    load_app_args,
    plaintext_url_warnings,
)
from ray_worker.errors import ConfigError

ENV_VARS = ("BELLA_QUEUE_URL", "BELLA_QUEUE_APIKEY", "BELLA_QUEUE_QUEUES", "BELLA_EVENTBUS_URL")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BELLA_* variable of the developer's shell leaks into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def llm(model_id: str) -> dict[str, Any]:
    return {"model_loading_config": {"model_id": model_id}}


def app_args(**overrides: Any) -> WorkerAppArgs:
    values: dict[str, Any] = {
        "queue_url": "http://127.0.0.1:8080",
        "queues": ["q:0", "q:1"],
        "llm_configs": [llm("m")],
        **overrides,
    }
    return WorkerAppArgs.model_validate(values)


# -- defaults --------------------------------------------------------------------------------


def test_poller_defaults() -> None:
    assert PollerConfig().model_dump() == {
        "strategy": TakeStrategy.ACTIVE_PASSIVE,
        "max_take_size": 32,
        "process_timeout_s": 900,
        "process_max_retries": 2,
        "min_age_seconds": 0,
        "idle_backoff_initial_s": 0.005,
        "idle_backoff_max_s": 0.05,
        "error_backoff_initial_s": 0.2,
        "error_backoff_max_s": 10.0,
        "take_timeout_s": 10.0,
        "stats_interval_s": 2.0,
        "drain_timeout_s": 600.0,
    }


def test_capacity_defaults() -> None:
    assert CapacityConfig().model_dump() == {
        "target_ratio": 1.25,
        "online_reserve_ratio": 0.1,
        "max_preemptions": 2,
        "kv_cache_high_watermark": 0.95,
        "load_stale_after_s": 5.0,
        "load_report_interval_s": 0.5,
        "load_heartbeat_s": 2.0,
    }


def test_dispatcher_defaults() -> None:
    assert DispatcherConfig().model_dump() == {
        "max_replica_retries": 2,
        "overload_retry_initial_s": 0.1,
        "overload_retry_max_s": 2.0,
        "max_task_time_s": 600.0,
        "complete_backoff_max_s": 10.0,
        "complete_backoff_initial_s": 0.5,
        "complete_max_retry_s": 86400.0,
        "complete_max_connections": 32,
        "outbox_max_entries": 10000,
        "outbox_max_bytes": 268435456,
        "remember_completed": 4096,
        "reasoning_field": "reasoning_content",
        "cancel_check_interval_s": 30.0,
        "cancel_check_max_requests": 20,
        "max_n": 16,
        "max_output_tokens": None,
        "max_prompt_chars": 1_048_576,
        "max_grammar_chars": 65_536,
    }


def test_publisher_defaults() -> None:
    assert PublisherOptions().model_dump() == {
        "max_buffered": 10_000,
        "max_buffered_bytes": 256 * 1024 * 1024,
        "send_interval_ms": 20.0,
        "max_batch": 1000,
        "max_batch_bytes": 8 * 1024 * 1024,
        "outage_timeout_s": 60.0,
        "socket_timeout_s": 5.0,
        "connect_timeout_s": 2.0,
        "health_check_interval_s": 15,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 1.0,
        "approximate_trim": True,
        "idempotency_ttl_s": 3600,
        "latency_window": 4096,
    }


def test_app_args_defaults() -> None:
    args = WorkerAppArgs()
    assert args.queue_url is None
    assert args.queues == []
    assert args.eventbus_url is None
    assert args.register_queues is False
    assert args.llm_configs == []
    assert args.engine == "vllm"
    assert args.poller == PollerConfig()
    assert args.capacity == CapacityConfig()
    assert args.dispatcher == DispatcherConfig()
    assert args.publisher == PublisherOptions()
    assert set(WorkerAppArgs.model_fields) == {
        "queue_url",
        "queues",
        "eventbus_url",
        "register_queues",
        "llm_configs",
        "engine",
        "poller",
        "capacity",
        "dispatcher",
        "publisher",
    }


@pytest.mark.parametrize(
    "model",
    [WorkerAppArgs, PollerConfig, CapacityConfig, DispatcherConfig, PublisherOptions, QueueSpec],
)
def test_every_field_is_described(model: type[pydantic.BaseModel]) -> None:
    undocumented = [name for name, f in model.model_fields.items() if not f.description]
    assert undocumented == []


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "values"),
    [
        (WorkerAppArgs, {"queue": "q:0"}),
        (PollerConfig, {"size": 3}),
        (CapacityConfig, {"target": 2}),
        (DispatcherConfig, {"retries": 1}),
        (PublisherOptions, {"buffer": 1}),
        (QueueSpec, {"name": "q:0", "level": 0}),
    ],
)
def test_extra_fields_are_forbidden(
    model: type[pydantic.BaseModel], values: dict[str, Any]
) -> None:
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        model.model_validate(values)


def test_nested_extra_fields_are_forbidden() -> None:
    with pytest.raises(pydantic.ValidationError):
        WorkerAppArgs.model_validate({"poller": {"max_take_size": 4, "sise": 2}})


def test_models_are_frozen() -> None:
    args = app_args()
    with pytest.raises(pydantic.ValidationError):
        args.queue_url = "http://elsewhere"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        args.poller.max_take_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "values",
    [
        {"max_take_size": 0},
        {"max_take_size": 1001},
        {"process_timeout_s": -1},
        {"process_max_retries": -2},
        {"idle_backoff_initial_s": 0},
        {"strategy": "lifo"},
    ],
)
def test_poller_ranges(values: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        PollerConfig.model_validate(values)


@pytest.mark.parametrize(
    "values",
    [
        {"target_ratio": 0},
        {"online_reserve_ratio": 1.0},
        {"online_reserve_ratio": -0.1},
        {"kv_cache_high_watermark": 1.5},
    ],
)
def test_capacity_ranges(values: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        CapacityConfig.model_validate(values)


def test_engine_choices() -> None:
    assert WorkerAppArgs(engine="simulated").engine == "simulated"
    with pytest.raises(pydantic.ValidationError):
        WorkerAppArgs.model_validate({"engine": "tgi"})


# -- queues ----------------------------------------------------------------------------------


def test_queue_spec_parts() -> None:
    spec = QueueSpec(name="chat-q_1:1", model="m")
    assert spec.base == "chat-q_1"
    assert spec.level is Level.OFFLINE
    assert QueueSpec(name="x:0").level is Level.ONLINE
    assert QueueSpec(name="x:0").model is None


@pytest.mark.parametrize("name", ["q", "q:2", "q:x", "a:b:0", "bad.name:0", ":0", "q" * 65 + ":0"])
def test_bad_queue_names_are_rejected(name: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        QueueSpec(name=name)


def test_queues_from_strings_and_dicts() -> None:
    args = WorkerAppArgs.model_validate(
        {"queues": ["a:0", {"name": "b:1", "model": "m2"}, {"name": "c:1"}]}
    )
    assert args.queues == [
        QueueSpec(name="a:0"),
        QueueSpec(name="b:1", model="m2"),
        QueueSpec(name="c:1"),
    ]


def test_queues_from_a_comma_string() -> None:
    args = WorkerAppArgs.model_validate({"queues": " a:0 , b:1,, "})
    assert [q.name for q in args.queues] == ["a:0", "b:1"]


def test_queues_listed_twice_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="listed twice"):
        WorkerAppArgs.model_validate({"queues": ["a:0", {"name": "a:0", "model": "m"}]})


def test_model_ids_and_queue_model() -> None:
    args = app_args(
        queues=["a:0", {"name": "b:1", "model": "m2"}], llm_configs=[llm("m1"), llm("m2")]
    )
    assert args.model_ids() == ["m1", "m2"]
    assert args.queue_model(args.queues[0]) == "m1"
    assert args.queue_model(args.queues[1]) == "m2"


@pytest.mark.parametrize("entry", [{}, {"model_loading_config": {}}, {"model_loading_config": 3}])
def test_model_id_is_required(entry: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="model_id"):
        app_args(llm_configs=[entry]).model_ids()


# -- resolved(): env overrides and required settings -------------------------------------------


def test_resolved_without_env_keeps_the_file_values() -> None:
    args = app_args(eventbus_url="redis://file:6379/0")
    assert args.resolved(EnvSettings()) == args


def test_env_overrides_url_queues_and_eventbus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", "http://env:9000")
    monkeypatch.setenv("BELLA_EVENTBUS_URL", "redis://:pw@env:6379/0")
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", "b:1, a:0 ,")
    args = app_args(queues=[{"name": "a:0", "model": "m"}, "z:0"])
    resolved = args.resolved()  # reads the environment itself
    assert resolved.queue_url == "http://env:9000"
    assert resolved.eventbus_url == "redis://:pw@env:6379/0"
    assert [q.name for q in resolved.queues] == ["b:1", "a:0"]
    assert resolved.queues[1].model == "m"  # the file's model for a queue it also lists
    assert resolved.queues[0].model is None
    assert args.queue_url == "http://127.0.0.1:8080"  # the original is untouched


def test_env_queues_keep_the_files_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", "a:0,b:1")
    args = app_args(queues=[{"name": "a:0", "max_n": 2, "max_output_tokens": None}])
    a, b = args.resolved().queues
    assert a == args.queues[0]
    assert a.max_n == 2
    assert a.model_fields_set >= {"max_n", "max_output_tokens"}  # explicit null kept
    assert b == QueueSpec(name="b:1")
    assert b.model_fields_set == {"name"}


def test_env_queues_need_a_model_when_several_are_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", "b:1")
    with pytest.raises(ConfigError, match=r"b:1 must name its model"):
        app_args(llm_configs=[llm("m"), llm("m2")]).resolved()


def test_env_queues_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", "a:0,bad.name:3")
    with pytest.raises(ConfigError, match="BELLA_QUEUE_QUEUES"):
        app_args().resolved()


def test_env_queues_listed_twice_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", "a:0,a:0")
    with pytest.raises(ConfigError, match="listed twice"):
        app_args().resolved()


def test_empty_env_values_do_not_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", "")
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", "")
    args = app_args()
    assert args.resolved() == args


def test_missing_url_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="BELLA_QUEUE_URL"):
        app_args(queue_url=None).resolved()


def test_url_from_env_alone_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", "http://env:9000")
    assert app_args(queue_url=None).resolved().queue_url == "http://env:9000"


def test_missing_queues_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="BELLA_QUEUE_QUEUES"):
        app_args(queues=[]).resolved()


def test_missing_models_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="llm_configs is empty"):
        app_args(llm_configs=[]).resolved()


def test_duplicate_models_are_rejected() -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        app_args(llm_configs=[llm("m"), llm("m")]).resolved()


def test_queue_model_must_be_served() -> None:
    with pytest.raises(ConfigError, match="'nope' not in"):
        app_args(queues=[{"name": "q:0", "model": "nope"}]).resolved()


def test_several_models_need_a_model_per_queue() -> None:
    with pytest.raises(ConfigError, match="q:1 must name its model"):
        app_args(
            queues=[{"name": "q:0", "model": "m"}, "q:1"], llm_configs=[llm("m"), llm("m2")]
        ).resolved()
    ok = app_args(
        queues=[{"name": "q:0", "model": "m"}, {"name": "q:1", "model": "m2"}],
        llm_configs=[llm("m"), llm("m2")],
    )
    assert ok.resolved() == ok


def test_explicit_env_settings_object_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", "http://from-os:1")
    env = EnvSettings(queue_url="http://given:2")
    assert app_args().resolved(env).queue_url == "http://given:2"


# -- the API key ----------------------------------------------------------------------------


def test_apikey_missing_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="BELLA_QUEUE_APIKEY"):
        EnvSettings().require_apikey()


def test_apikey_empty_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_APIKEY", "")
    with pytest.raises(ConfigError, match="BELLA_QUEUE_APIKEY"):
        EnvSettings().require_apikey()


def test_apikey_from_env_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_APIKEY", "sk-very-secret")
    env = EnvSettings()
    assert env.require_apikey().get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(env)
    assert "sk-very-secret" not in str(env.model_dump())


def test_env_settings_read_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", "http://u")
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", "a:0")
    monkeypatch.setenv("BELLA_EVENTBUS_URL", "redis://e")
    monkeypatch.setenv("BELLA_UNRELATED", "ignored")
    env = EnvSettings()
    assert (env.queue_url, env.queue_queues, env.eventbus_url) == ("http://u", "a:0", "redis://e")


# -- load_app_args --------------------------------------------------------------------------


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_load_app_args_reads_our_application(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "applications": [
                {"name": "other", "import_path": "somewhere:app", "args": {"x": 1}},
                {
                    "name": "bella",
                    "import_path": "ray_worker.app:build_app",
                    "args": {"queues": ["q:0"], "poller": {"max_take_size": 4}},
                },
            ]
        },
    )
    args = load_app_args(path)
    assert [q.name for q in args.queues] == ["q:0"]
    assert args.poller.max_take_size == 4


def test_per_queue_task_limits_load_and_the_rest_come_from_the_dispatcher(
    tmp_path: Path,
) -> None:
    from ray_worker.task.limits import TaskLimits

    path = write(
        tmp_path,
        {
            "applications": [
                {
                    "import_path": "ray_worker.app:build_app",
                    "args": {
                        "queues": [
                            {"name": "chat:0", "max_n": 4, "max_prompt_chars": 1000},
                            {"name": "bulk:1", "max_output_tokens": 256, "max_grammar_chars": None},
                            "plain:1",
                        ],
                        "dispatcher": {"max_output_tokens": 8192, "max_grammar_chars": 4096},
                    },
                }
            ]
        },
    )
    args = load_app_args(path)
    chat, bulk, plain = (TaskLimits.of(q, args.dispatcher) for q in args.queues)
    assert chat == TaskLimits(
        max_n=4, max_output_tokens=8192, max_prompt_chars=1000, max_grammar_chars=4096
    )
    # null on a queue is no limit there, not the dispatcher's
    assert bulk == TaskLimits(
        max_n=16, max_output_tokens=256, max_prompt_chars=1_048_576, max_grammar_chars=None
    )
    assert plain == TaskLimits.of(None, args.dispatcher)
    assert plain == TaskLimits(
        max_n=16, max_output_tokens=8192, max_prompt_chars=1_048_576, max_grammar_chars=4096
    )


def test_per_queue_limits_survive_the_trip_to_the_poller_as_json() -> None:
    """The Serve app hands its args to the poller as ``model_dump(mode="json")``: a limit a
    queue leaves unset must come back unset (the dispatcher's), not null (no limit)."""
    from ray_worker.task.limits import TaskLimits

    args = app_args(
        queues=[{"name": "a:0", "max_n": 2, "max_grammar_chars": None}, "b:1"],
        dispatcher={"max_output_tokens": 100},
    )
    dumped = args.model_dump(mode="json")
    assert dumped["queues"] == [
        {"name": "a:0", "model": None, "max_n": 2, "max_grammar_chars": None},
        {"name": "b:1", "model": None},
    ]
    back = WorkerAppArgs.model_validate(dumped)
    assert back == args
    for before, after in zip(args.queues, back.queues, strict=True):
        assert TaskLimits.of(after, back.dispatcher) == TaskLimits.of(before, args.dispatcher)
    assert TaskLimits.of(back.queues[1], back.dispatcher) == TaskLimits(
        max_n=16, max_output_tokens=100, max_prompt_chars=1_048_576, max_grammar_chars=65_536
    )


@pytest.mark.parametrize(
    "limit", ["max_n", "max_output_tokens", "max_prompt_chars", "max_grammar_chars"]
)
def test_task_limits_are_positive(limit: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        QueueSpec(name="q:0", **{limit: 0})
    with pytest.raises(pydantic.ValidationError):
        DispatcherConfig(**{limit: 0})
    assert getattr(QueueSpec(name="q:0", **{limit: 1}), limit) == 1


def test_load_app_args_by_name(tmp_path: Path) -> None:
    apps = [
        {"name": "one", "import_path": "ray_worker.app:build_app", "args": {"queues": "a:0"}},
        {"name": "two", "import_path": "ray_worker.app:build_app", "args": {"queues": "b:0"}},
    ]
    path = write(tmp_path, {"applications": apps})
    assert load_app_args(path).queues[0].name == "a:0"
    assert load_app_args(str(path), app_name="two").queues[0].name == "b:0"
    with pytest.raises(ConfigError, match="no application"):
        load_app_args(path, app_name="three")


def test_load_app_args_without_args_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, {"applications": [{"import_path": "ray_worker.app:build_app"}]})
    assert load_app_args(path) == WorkerAppArgs()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (["not", "a", "mapping"], "not a YAML mapping"),
        ({"proxy_location": "EveryNode"}, "no 'applications' list"),
        ({"applications": [{"import_path": "elsewhere:app"}, "junk"]}, "no application"),
    ],
)
def test_load_app_args_errors(tmp_path: Path, document: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_app_args(write(tmp_path, document))


def test_load_app_args_rejects_unknown_args(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"applications": [{"import_path": "ray_worker.app:build_app", "args": {"queus": []}}]},
    )
    with pytest.raises(pydantic.ValidationError):
        load_app_args(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_resolve(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", "http://127.0.0.1:8080")
    args = load_app_args(path)
    resolved = args.resolved()
    assert resolved.queues
    assert resolved.model_ids()


# -- plaintext URLs to other hosts --------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.8.9.10:8080/",
        "http://localhost:8080",
        "http://[::1]:8080",
        "https://bella.example.com",
        "redis://:pw@127.0.0.1:6379/0",
        "redis://localhost/0",
        "rediss://:pw@10.0.0.5:6379/0",
        "unix:///run/redis.sock",
        None,
    ],
)
def test_no_plaintext_warning_for_loopback_or_tls(url: str | None) -> None:
    assert plaintext_url_warnings(queue_url=url, eventbus_url=url) == []


def test_plaintext_warnings_name_the_url_hidden_password_and_what_leaks() -> None:
    warnings = plaintext_url_warnings(
        queue_url="http://bella-queue:8080", eventbus_url="redis://:s3cr3t/pw@10.0.0.5:6379/0"
    )
    assert len(warnings) == 2
    queue, redis = warnings
    assert "Bella-Queue URL http://bella-queue:8080" in queue
    assert "producer keys (ak)" in queue
    assert "https://" in queue
    assert "event-bus Redis URL redis://:***@10.0.0.5:6379/0" in redis
    assert "to 10.0.0.5," in redis  # the host after the password's '/' and '@'
    assert "rediss://" in redis
    assert "s3cr3t" not in "".join(warnings)


@pytest.mark.parametrize(
    "url",
    ["http://[2001:db8::1]:8080", "HTTP://Bella.Example.com", "http://127.0.0.1.nip.io:8080"],
)
def test_plaintext_warning_for_other_hosts(url: str) -> None:
    [warning] = plaintext_url_warnings(queue_url=url, eventbus_url=None)
    assert "not a loopback address" in warning


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_serve_the_status_on_loopback_only(path: Path) -> None:
    # GET /bella answers without authentication: exposing it is the operator's deliberate act.
    http = yaml.safe_load(path.read_text()).get("http_options") or {}
    assert http.get("host", "127.0.0.1") in ("127.0.0.1", "localhost", "::1")
