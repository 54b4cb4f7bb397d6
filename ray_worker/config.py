"""Typed configuration: the Serve app's ``args`` and the environment contract.

This module owns every knob an operator sets, as frozen pydantic models with a description
on each field (the configuration reference is generated from them), and the environment
overrides of DESIGN.md: ``BELLA_QUEUE_URL``, ``BELLA_QUEUE_APIKEY``, ``BELLA_QUEUE_QUEUES``,
``BELLA_EVENTBUS_URL``. It must not do I/O beyond reading the environment and YAML files.
The API key comes only from the environment and is held as a ``SecretStr``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from ray_worker.bella.protocol import Level, TakeStrategy, parse_full_queue_name
from ray_worker.errors import ConfigError

__all__ = [
    "ADAPTER_SEPARATOR",
    "DEFAULT_DRAIN_TIMEOUT_S",
    "DEFAULT_ENGINE",
    "STOP_MARGIN_S",
    "CapacityConfig",
    "DispatcherConfig",
    "Engine",
    "EnvSettings",
    "PollerConfig",
    "PublisherOptions",
    "QueueSpec",
    "ReasoningField",
    "WorkerAppArgs",
    "adapter_of",
    "load_app_args",
    "plaintext_url_warnings",
]

DEFAULT_DRAIN_TIMEOUT_S = 600.0
"""The default stop budget (``poller.drain_timeout_s``): an online producer waits at most
600 s (protocol §1.3), so no online task outlives it."""
STOP_MARGIN_S = 30.0
"""What a stopping replica gets after its budget: the cut tasks' answers, the outbox's last
tries, closing. Serve's ``graceful_shutdown_timeout_s`` is the budget plus this."""

Engine = Literal["vllm", "simulated"]
"""The engine inside the LLM replicas: vLLM, or the simulated CPU load-shape stand-in."""
DEFAULT_ENGINE: Engine = "vllm"

ADAPTER_SEPARATOR = ":"
"""A task's ``data.model`` ``base:adapter`` names a LoRA adapter of the served model ``base``
(Ray Serve LLM's spelling); the adapter is loaded from ``{lora path}/{adapter}``."""

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def adapter_of(model: str, base: str) -> str | None:
    """The adapter ``model`` names on ``base`` (``base:adapter``), or None.

    Only a plain directory name counts (letters, digits, ``._-``, not starting with a dot), so
    a task can never point the replica at a path outside the adapters' directory.
    """
    prefix = base + ADAPTER_SEPARATOR
    if not model.startswith(prefix):
        return None
    adapter = model[len(prefix) :]
    return adapter if _ADAPTER_NAME.fullmatch(adapter) else None


ReasoningField = Literal["reasoning_content", "reasoning", "both"]
"""Where chat answers carry a model's thinking: DeepSeek's name, vLLM's, or both."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_QUEUE_LIMITS = ("max_n", "max_output_tokens", "max_prompt_chars", "max_grammar_chars")
"""``QueueSpec``'s limits on one task; unset, the ``DispatcherConfig`` field of the same name."""


class QueueSpec(_Frozen):
    """One Bella-Queue queue the worker takes from."""

    name: str = Field(description="Full queue name '<queue>:<level>', level 0 (online) or 1.")
    model: str | None = Field(
        default=None,
        description=(
            "Served model for tasks of this queue whose data.model is missing, and the deployment "
            "whose capacity this queue draws on. Required when several models are served."
        ),
    )
    max_n: int | None = Field(
        default=None,
        ge=1,
        description=(
            "This queue's limit on a task's n and best_of (dispatcher.max_n when unset; null "
            "here: no limit)."
        ),
    )
    max_output_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "This queue's limit on max_tokens / max_completion_tokens (dispatcher."
            "max_output_tokens when unset; null here: no limit)."
        ),
    )
    max_prompt_chars: int | None = Field(
        default=None,
        ge=1,
        description=(
            "This queue's limit on a task's prompt size (dispatcher.max_prompt_chars when "
            "unset; null here: no limit)."
        ),
    )
    max_grammar_chars: int | None = Field(
        default=None,
        ge=1,
        description=(
            "This queue's limit on a task's structured-output grammar size (dispatcher."
            "max_grammar_chars when unset; null here: no limit)."
        ),
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        parse_full_queue_name(value)
        return value

    @model_serializer(mode="wrap")
    def _dump_only_set_limits(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A limit the queue does not set is left out of a dump (the Serve app's args travel
        as one): loaded back it stays unset, the dispatcher's, not null (no limit)."""
        data = handler(self)
        if isinstance(data, dict):
            for name in _QUEUE_LIMITS:
                if name not in self.model_fields_set:
                    data.pop(name, None)
        return data

    @property
    def base(self) -> str:
        """The queue name without its level."""
        return parse_full_queue_name(self.name)[0]

    @property
    def level(self) -> Level:
        """The queue's level."""
        return parse_full_queue_name(self.name)[1]


class PollerConfig(_Frozen):
    """How the poller takes tasks (protocol §1.4, §3)."""

    strategy: TakeStrategy = Field(
        default=TakeStrategy.ACTIVE_PASSIVE,
        description=(
            "Take strategy. active_passive takes queues in list order; the poller lists level-0 "
            "queues first so online work is taken before offline work."
        ),
    )
    max_take_size: int = Field(
        default=32, ge=1, le=1000, description="Largest size sent in one take (fifo caps at 10)."
    )
    process_timeout_s: int = Field(
        default=900,
        ge=0,
        description=(
            "Sent with takes of level-1 queues: the server redelivers a task not completed in this "
            "many seconds (needs Redis keyspace events on the server). 0 disables redelivery."
        ),
    )
    process_max_retries: int = Field(
        default=2, ge=-1, description="Redeliveries after process_timeout; -1 is unlimited."
    )
    min_age_seconds: int = Field(default=0, ge=0, description="Take only tasks this old.")
    idle_backoff_initial_s: float = Field(
        default=0.005, gt=0, description="First wait after an empty take; doubles per empty take."
    )
    idle_backoff_max_s: float = Field(
        default=0.05,
        gt=0,
        description="Longest wait between takes of an idle queue (bounds idle pickup latency).",
    )
    error_backoff_initial_s: float = Field(
        default=0.2, gt=0, description="First wait after a failed take; doubles per failure."
    )
    error_backoff_max_s: float = Field(
        default=10.0, gt=0, description="Longest wait after repeated take failures."
    )
    take_timeout_s: float = Field(default=10.0, gt=0, description="HTTP timeout of one take.")
    stats_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="While at capacity after full takes, how often queue stats are read.",
    )
    drain_timeout_s: float = Field(
        default=DEFAULT_DRAIN_TIMEOUT_S,
        ge=0,
        description=(
            "The stop budget: when a replica stops (Ctrl-C, `serve shutdown`, a redeploy, a "
            "downscale) it takes nothing new and lets running tasks finish this long; what is "
            "still running then is answered 503 (online, level 0) or left for redelivery "
            "(level 1). Serve's `graceful_shutdown_timeout_s` of every deployment is set to it "
            f"plus {STOP_MARGIN_S:.0f} s (the answers, the outbox, closing). The default lets "
            "every online task finish (the producer waits at most 600 s)."
        ),
    )


class CapacityConfig(_Frozen):
    """How much work the worker holds per replica (see README, capacity model)."""

    target_ratio: float = Field(
        default=1.25,
        gt=0,
        description=(
            "Target tasks in flight per replica as a multiple of its max_num_seqs. Above 1 keeps "
            "continuous batching full while tasks travel; the excess waits inside the worker."
        ),
    )
    online_reserve_ratio: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description=(
            "Engine seats kept for online tasks, as a share of max_num_seqs (rounded up): each "
            "engine runs max_num_seqs plus these; offline work never uses more than max_num_seqs."
        ),
    )
    max_preemptions: int = Field(
        default=2,
        ge=0,
        description=(
            "Times one offline task may be aborted and run again from the start to give its seat "
            "to an online task that found every seat taken (0: offline runs are never preempted)."
        ),
    )
    kv_cache_high_watermark: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="A replica whose KV cache is this full gets no new work until it drains.",
    )
    load_stale_after_s: float = Field(
        default=5.0,
        gt=0,
        description="A replica that has not reported its load for this long is not counted.",
    )
    load_report_interval_s: float = Field(
        default=0.5,
        gt=0,
        description=(
            "How often each LLM replica reads its load; it reports to the poller when the load "
            "changed (and every load_heartbeat_s)."
        ),
    )
    load_heartbeat_s: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Longest time between two reports of a replica whose load is unchanged (capped at "
            "half of load_stale_after_s, so one lost report does not make a replica stale)."
        ),
    )

    @property
    def report_heartbeat_s(self) -> float:
        """The heartbeat the replicas use: ``load_heartbeat_s`` within
        [``load_report_interval_s``, ``load_stale_after_s`` / 2]."""
        return max(
            self.load_report_interval_s, min(self.load_heartbeat_s, self.load_stale_after_s / 2)
        )


class DispatcherConfig(_Frozen):
    """How each task is run and answered."""

    max_replica_retries: int = Field(
        default=2, ge=0, description="Retries of a task whose replica failed before any output."
    )
    overload_retry_initial_s: float = Field(
        default=0.1, gt=0, description="First wait before re-sending a task the replicas refused."
    )
    overload_retry_max_s: float = Field(
        default=2.0, gt=0, description="Longest wait between re-sends of a refused task."
    )
    max_task_time_s: float = Field(
        default=600.0,
        gt=0,
        description="Deadline of a task whose expire_time is unset (online tasks: 600 s at most).",
    )
    complete_backoff_initial_s: float = Field(
        default=0.5, gt=0, description="First wait before retrying a failed HTTP complete."
    )
    complete_backoff_max_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait between complete attempts (jittered, doubling up to it).",
    )
    complete_max_retry_s: float = Field(
        default=86_400.0,
        gt=0,
        description=(
            "How long a replica retries the answer of a task without expire_time; a task with "
            "one is retried until it expires."
        ),
    )
    complete_max_connections: int = Field(
        default=32,
        ge=1,
        description="HTTP connections for completes, a pool apart from takes and other calls.",
    )
    outbox_max_entries: int = Field(
        default=10_000,
        ge=1,
        description="Answers a replica's outbox holds while Bella-Queue is away; then new "
        "answers wait for room (backpressure: the task stays held, nothing is dropped).",
    )
    outbox_max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Bytes (JSON size of the results) a replica's outbox holds; then new answers "
        "wait for room. One answer larger than this is still sent, alone.",
    )
    remember_completed: int = Field(
        default=4096,
        ge=0,
        description="How many completed task ids are remembered to recognise redeliveries.",
    )
    reasoning_field: ReasoningField = Field(
        default="reasoning_content",
        description=(
            "Where chat answers carry a reasoning model's thinking (engine_kwargs "
            "reasoning_parser): reasoning_content (DeepSeek's API), reasoning (vLLM's name) "
            "or both, in messages and streamed deltas alike."
        ),
    )
    cancel_check_interval_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "Every this often each replica asks Bella-Queue about its level-1 offline tasks "
            "that have run at least this long (GET /v1/queue/{id}; one GET /v1/batches/{id} "
            "per batch) and aborts those cancelled, unanswered (0: never check)."
        ),
    )
    cancel_check_max_requests: int = Field(
        default=20,
        ge=1,
        description=(
            "Most status requests one replica sends per cancel_check_interval_s (the least "
            "recently checked first; the rest wait for the next rounds)."
        ),
    )
    max_n: int | None = Field(
        default=16,
        ge=1,
        description=(
            "Most sequences one task may ask for (OpenAI n, and best_of): above it the poller "
            "answers 400 invalid_request_error (param n or best_of) before the task reaches a "
            "replica. A task holds its n sequences of capacity. A queue's max_n overrides it; "
            "null: no limit."
        ),
    )
    max_output_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most output tokens one task may ask for (max_tokens, max_completion_tokens): above "
            "it, 400 (param max_tokens or max_completion_tokens). null: no limit (max_model_len "
            "bounds it). A task without max_tokens passes: engine_kwargs "
            "override_generation_config {max_new_tokens: N} sets its default. A queue's "
            "max_output_tokens overrides it."
        ),
    )
    max_prompt_chars: int | None = Field(
        default=1_048_576,
        ge=1,
        description=(
            "Most characters of one task's prompt: the text of its messages' content (strings "
            "and text parts; images and audio are bounded by the engine), completions' prompt "
            "and embeddings' input (strings, or lists of them; a token id counts as one). Above "
            "it, 400 (param messages, prompt or input). A queue's max_prompt_chars overrides "
            "it; null: no limit."
        ),
    )
    max_grammar_chars: int | None = Field(
        default=65_536,
        ge=1,
        description=(
            "Most characters of one task's structured-output constraints: the compact JSON "
            "size of response_format (all but its type: json_schema, a structural tag), "
            "structured_outputs and every guided_* field (a string counts its length). Above "
            "it, 400 (param: the largest of those fields). A queue's max_grammar_chars "
            "overrides it; null: no limit."
        ),
    )


class PublisherOptions(_Frozen):
    """The event-bus publisher (``RedisPublisher``): buffering, retries, trimming."""

    max_buffered: int = Field(
        default=10_000,
        ge=1,
        description="Entries held while Redis is slow or down; then publish() waits.",
    )
    max_buffered_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description=(
            "Most characters (keys, field names and values: about bytes) held while Redis is "
            "slow or down; then publish() waits. Bounds the publisher actor's memory when "
            "entries are large (embeddings answers of MBs); an entry larger than this is still "
            "taken, alone, once the buffer is empty."
        ),
    )
    send_interval_ms: float = Field(
        default=20.0,
        ge=0,
        description=(
            "Callers (LLM replicas, the poller) send their events to the node's publisher at "
            "most this often, each send carrying everything gathered since; a stream's first "
            "chunk and completions leave at once. 0 sends as soon as the previous send returned."
        ),
    )
    max_batch: int = Field(default=1000, ge=1, description="Most entries in one transaction.")
    max_batch_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1,
        description=(
            "Most characters (keys, field names and values: about bytes) in one transaction; "
            "an entry larger than this goes alone. Keeps a round of large answers (embeddings) "
            "far below "
            "Redis's query buffer limit (1 GiB), which would close the connection on every "
            "retry and stall the node's events."
        ),
    )
    outage_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="After this long of continuous Redis failure, older entries are given up.",
    )
    socket_timeout_s: float = Field(default=5.0, gt=0, description="Redis read/write timeout.")
    connect_timeout_s: float = Field(default=2.0, gt=0, description="Redis connect timeout.")
    health_check_interval_s: int = Field(
        default=15, ge=0, description="PING a pooled connection idle this long before use."
    )
    backoff_initial_s: float = Field(default=0.05, gt=0, description="First retry delay.")
    backoff_max_s: float = Field(default=1.0, gt=0, description="Largest retry delay.")
    approximate_trim: bool = Field(
        default=True, description="MINID ~ (whole nodes) rather than exact trimming."
    )
    idempotency_ttl_s: int = Field(
        default=3600,
        ge=0,
        description="TTL of this publisher's batch marker key (refreshed per batch); 0 disables "
        "it. Keep it above outage_timeout_s.",
    )
    latency_window: int = Field(
        default=4096, ge=1, description="Recent entries kept for the latency percentiles."
    )

    @model_validator(mode="after")
    def _marker_outlives_outage(self) -> PublisherOptions:
        if self.idempotency_ttl_s and self.idempotency_ttl_s <= self.outage_timeout_s:
            raise ValueError("idempotency_ttl_s must exceed outage_timeout_s (or be 0)")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return self


class RunnerSettings(_Frozen):
    """What each LLM replica's task runner needs to answer tasks itself.

    Derived from ``WorkerAppArgs`` by ``runner_settings()``; operators never write it.
    """

    queue_url: str = Field(description="Bella-Queue base URL (HTTP complete, event-bus lookup).")
    eventbus_url: str | None = Field(
        default=None, description="Redis URL for events instead of the one the server reports."
    )
    dispatcher: DispatcherConfig = Field(
        default_factory=DispatcherConfig, description="Task execution."
    )
    publisher: PublisherOptions = Field(default_factory=PublisherOptions, description="Event bus.")
    drain_timeout_s: float = Field(
        default=DEFAULT_DRAIN_TIMEOUT_S,
        ge=0,
        description="How long a stopping replica lets its tasks finish (the stop budget).",
    )
    redelivers: bool = Field(
        default=True,
        description=(
            "Level-1 takes set process_timeout, so the server redelivers a level-1 task left "
            "unanswered: a stop leaves such tasks for redelivery (otherwise it answers 503)."
        ),
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="HTTP timeout of one call to Bella-Queue."
    )
    redelivery_window_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "process_timeout_s x (process_max_retries + 1) of level-1 takes: the server answers "
            "such a task 408 itself by then, so its run stops (0: no such bound)."
        ),
    )


class WorkerAppArgs(_Frozen):
    """The ``args`` of ``ray_worker.app:build_app`` in a Serve config file."""

    queue_url: str | None = Field(
        default=None, description="Bella-Queue base URL; env BELLA_QUEUE_URL overrides."
    )
    queues: list[QueueSpec] = Field(
        default_factory=list,
        description="Queues: 'name:level' or {name, model}; env BELLA_QUEUE_QUEUES overrides.",
    )
    eventbus_url: str | None = Field(
        default=None,
        description=(
            "Redis URL for events, instead of the one GET /v1/queue/eventbus reports; "
            "env BELLA_EVENTBUS_URL overrides."
        ),
    )
    register_queues: bool = Field(
        default=False,
        description="Register the queues at start-up (for the emulator); errors are ignored.",
    )
    llm_configs: list[dict[str, Any]] = Field(
        default_factory=list,
        description="ray.serve.llm LLMConfig mappings, one per served model.",
    )
    engine: Engine = Field(
        default=DEFAULT_ENGINE,
        description="Engine inside the LLM replicas; 'simulated' is the CPU load-shape stand-in.",
    )
    poller: PollerConfig = Field(default_factory=PollerConfig, description="Take loop.")
    capacity: CapacityConfig = Field(default_factory=CapacityConfig, description="Capacity model.")
    dispatcher: DispatcherConfig = Field(
        default_factory=DispatcherConfig, description="Task execution."
    )
    publisher: PublisherOptions = Field(default_factory=PublisherOptions, description="Event bus.")

    @field_validator("queues", mode="before")
    @classmethod
    def _queue_strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [q for q in value.split(",") if q.strip()]
        if isinstance(value, list):
            return [{"name": q.strip()} if isinstance(q, str) else q for q in value]
        return value

    @model_validator(mode="after")
    def _check(self) -> WorkerAppArgs:
        names = [q.name for q in self.queues]
        if len(set(names)) != len(names):
            raise ValueError(f"queues are listed twice: {names}")
        return self

    def model_ids(self) -> list[str]:
        """The served model ids, in config order."""
        ids = []
        for cfg in self.llm_configs:
            loading = cfg.get("model_loading_config") or {}
            model_id = loading.get("model_id") if isinstance(loading, Mapping) else None
            if not model_id:
                raise ConfigError("every llm_configs entry needs model_loading_config.model_id")
            ids.append(str(model_id))
        return ids

    def lora_model_ids(self) -> list[str]:
        """The served models that take LoRA adapters (their entry has a ``lora_config``)."""
        return [
            model_id
            for model_id, cfg in zip(self.model_ids(), self.llm_configs, strict=True)
            if cfg.get("lora_config")
        ]

    def resolved(self, env: EnvSettings | None = None) -> WorkerAppArgs:
        """Apply the environment overrides and check what must be set."""
        env = env or EnvSettings()
        update: dict[str, Any] = {}
        if env.queue_url:
            update["queue_url"] = env.queue_url
        if env.eventbus_url:
            update["eventbus_url"] = env.eventbus_url
        if env.queue_queues:
            # A queue the file lists keeps its model and limits.
            listed = {q.name: q for q in self.queues}
            names = [n.strip() for n in env.queue_queues.split(",") if n.strip()]
            if len(set(names)) != len(names):
                raise ConfigError(f"BELLA_QUEUE_QUEUES: queues are listed twice: {names}")
            try:
                update["queues"] = [listed.get(n) or QueueSpec(name=n) for n in names]
            except ValidationError as err:
                reasons = "; ".join(str(e["msg"]) for e in err.errors())
                raise ConfigError(f"BELLA_QUEUE_QUEUES: {reasons}") from None
        args = self.model_copy(update=update)
        if not args.queue_url:
            raise ConfigError("set BELLA_QUEUE_URL or queue_url: the Bella-Queue base URL")
        if not args.queues:
            raise ConfigError("set BELLA_QUEUE_QUEUES or queues: which 'name:level' queues to take")
        models = args.model_ids()
        if not models:
            raise ConfigError("llm_configs is empty: the worker needs at least one model to serve")
        if len(set(models)) != len(models):
            raise ConfigError(f"model ids are listed twice: {models}")
        for queue in args.queues:
            if queue.model is not None and queue.model not in models:
                raise ConfigError(f"queue {queue.name}: model {queue.model!r} not in {models}")
            if queue.model is None and len(models) > 1:
                raise ConfigError(f"queue {queue.name} must name its model: several are served")
        return args

    def scale_to_zero_models(self) -> list[str]:
        """Models whose deployment may scale to zero (``autoscaling_config.min_replicas: 0``)."""
        out = []
        for model_id, cfg in zip(self.model_ids(), self.llm_configs, strict=True):
            deployment = cfg.get("deployment_config") or {}
            autoscaling = (
                deployment.get("autoscaling_config") if isinstance(deployment, dict) else None
            )
            if isinstance(autoscaling, dict) and autoscaling.get("min_replicas", 1) == 0:
                out.append(model_id)
        return out

    def runner_settings(self) -> RunnerSettings:
        """The settings every LLM replica's task runner gets."""
        if not self.queue_url:
            raise ConfigError("set BELLA_QUEUE_URL or queue_url: the Bella-Queue base URL")
        return RunnerSettings(
            queue_url=self.queue_url,
            eventbus_url=self.eventbus_url,
            dispatcher=self.dispatcher,
            publisher=self.publisher,
            drain_timeout_s=self.poller.drain_timeout_s,
            redelivers=self.poller.process_timeout_s > 0,
            request_timeout_s=self.poller.take_timeout_s,
            redelivery_window_s=(
                self.poller.process_timeout_s * (self.poller.process_max_retries + 1)
                if self.poller.process_timeout_s > 0 and self.poller.process_max_retries >= 0
                else 0.0
            ),
        )

    def queue_model(self, queue: QueueSpec) -> str:
        """The deployment a queue draws on: its own model, or the only one served."""
        return queue.model or self.model_ids()[0]


class EnvSettings(BaseSettings):
    """The environment contract (DESIGN.md). Values here override the config file."""

    model_config = SettingsConfigDict(env_prefix="BELLA_", extra="ignore", frozen=True)

    queue_url: str | None = Field(default=None, description="BELLA_QUEUE_URL")
    queue_apikey: SecretStr | None = Field(default=None, description="BELLA_QUEUE_APIKEY")
    queue_queues: str | None = Field(default=None, description="BELLA_QUEUE_QUEUES, comma list")
    eventbus_url: str | None = Field(default=None, description="BELLA_EVENTBUS_URL")

    def require_apikey(self) -> SecretStr:
        """The API key, or a ``ConfigError`` naming the variable."""
        if self.queue_apikey is None or not self.queue_apikey.get_secret_value():
            raise ConfigError("set BELLA_QUEUE_APIKEY: the Bella-Queue API key (never in a config)")
        return self.queue_apikey


def load_app_args(path: str | os.PathLike[str], app_name: str | None = None) -> WorkerAppArgs:
    """Load the ``args`` of our app from a Serve config file (``applications[].args``)."""
    document = yaml.safe_load(Path(path).read_text())
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: not a YAML mapping")
    apps = document.get("applications")
    if not isinstance(apps, list):
        raise ConfigError(f"{path}: no 'applications' list (a Serve config file is expected)")
    for app in apps:
        if not isinstance(app, dict):
            continue
        if str(app.get("import_path", "")).startswith("ray_worker.") and (
            app_name is None or app.get("name") == app_name
        ):
            return WorkerAppArgs.model_validate(app.get("args") or {})
    raise ConfigError(f"{path}: no application with a ray_worker import_path")


_PLAINTEXT_SCHEMES = {"http": "HTTP", "redis": "Redis"}
"""URL schemes that carry no TLS (``https://`` and ``rediss://`` do; ``unix://`` stays local)."""


def plaintext_url_warnings(*, queue_url: str | None, eventbus_url: str | None) -> list[str]:
    """Warnings for the Bella-Queue URL or event-bus Redis URL when it is plaintext to a host
    that is not this machine (loopback is 127.0.0.0/8, ::1 and ``localhost``).

    Every take answer carries the producers' API keys (``ak``) and every call the worker's own
    key; the event-bus URL carries the Redis password, and events the answers. The URLs in the
    warnings are redacted (``protocol.redact_url``). ``ray-worker check`` prints them; the poller
    logs them once at start.
    """
    from ray_worker.bella.protocol import redact_url

    warnings = []
    for what, url, carries, secure in (
        (
            "Bella-Queue URL",
            queue_url,
            "the API key and every take's producer keys (ak)",
            "https://",
        ),
        ("event-bus Redis URL", eventbus_url, "the Redis password and the answers", "rediss://"),
    ):
        if not url:
            continue
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        host = _url_host(url)
        if scheme not in _PLAINTEXT_SCHEMES or host is None or _is_loopback(host):
            continue
        warnings.append(
            f"{what} {redact_url(url)} is plaintext {_PLAINTEXT_SCHEMES[scheme]} to {host}, "
            f"not a loopback address: {carries} cross the network unencrypted "
            f"(use {secure}, or reach it through a tunnel or a loopback proxy)"
        )
    return warnings


def _url_host(url: str) -> str | None:
    """The host of ``url`` (no brackets, lower case), or None when there is none.

    The userinfo ends at the last ``@`` (as in ``protocol.redact_url``): a password may hold
    ``/``, ``:`` or ``@`` unescaped, which ``urlsplit`` would misread as the host.
    """
    rest = url.partition("://")[2]
    if "@" in rest:
        rest = rest.rsplit("@", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if authority.startswith("["):
        host = authority[1:].partition("]")[0]
    else:
        host = authority.rpartition(":")[0] if ":" in authority else authority
    return host.lower() or None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
