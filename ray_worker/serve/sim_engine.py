"""A simulated LLM engine: vLLM's load shape and OpenAI outputs on asyncio timers, no model.

This module owns ``SimEngine``, a stand-in for Ray LLM's ``VLLMEngine`` that ``BellaLLMServer``
starts instead of vLLM when its ``LLMConfig.experimental_configs`` holds ``bella_sim_engine``
(``ray_worker.serve.llm_config.SIM_ENGINE_KEY``). The server's ``run_task``, ``abort`` and
``get_load`` then run unchanged on top of it. The engine models:

- capacity: at most ``max_num_seqs`` requests run; the rest wait, lower ``priority`` first,
  then first come first served (vLLM's priority scheduler);
- timing: ``ttft_s`` before the first token, then ``tokens_per_s`` per request;
- length: ``max_tokens`` / ``max_completion_tokens`` of the request, else the settings' default;
  prompts longer than ``max_model_len`` are rejected (400) as vLLM does;
- abort: frees the slot at once; the stream ends with ``finish_reason="abort"`` as vLLM's does;
- outputs: chunks and full responses shaped like vLLM 0.29's (the pinned release; 0.32's have
  the same keys; ``usage`` included), which the ``openai`` package's types validate;
- failure injection: ``data["sim_fail"]`` (see ``SimFailure``) fails one request with a chosen
  status, before the first token or after some tokens, or raises inside the engine.

Settings come from ``experimental_configs["bella_sim_engine"]`` (``SimEngineSettings``), with
``max_num_seqs`` and ``max_model_len`` defaulting to the config's ``engine_kwargs``.

It must not import vLLM, torch or Ray (unit tests use it alone) and must not busy-wait: every
wait is an asyncio timer, so many replicas fit on two cores.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ray_worker.bella.protocol import openai_error
from ray_worker.serve.llm_config import SIM_DEFAULT_MAX_NUM_SEQS, SIM_ENGINE_KEY

__all__ = [
    "SimEngine",
    "SimEngineSettings",
    "SimFailure",
    "SimRequest",
]

logger = logging.getLogger(__name__)


_WORDS: list[str] = (  # noqa: SIM905 (a word list reads better as text)
    "the queue worker takes a task and the replica streams tokens back to the caller while "
    "the engine keeps its batch full and the cache warm so every request finishes on time"
).split()


class SimEngineSettings(BaseModel):
    """How a simulated replica behaves (``experimental_configs.bella_sim_engine``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(
        default=SIM_DEFAULT_MAX_NUM_SEQS,
        ge=1,
        description="Requests running at once; more wait in the queue.",
    )
    ttft_s: float = Field(default=0.05, ge=0, description="Delay before a request's first token.")
    tokens_per_s: float = Field(
        default=100.0, gt=0, description="Decode speed of each running request."
    )
    max_tokens: int = Field(
        default=16, ge=1, description="Completion length when the request sets no max_tokens."
    )
    max_model_len: int = Field(
        default=2048, ge=8, description="Prompt plus completion tokens allowed (else 400)."
    )
    kv_cache_tokens: int | None = Field(
        default=None,
        ge=1,
        description="KV-cache capacity in tokens for kv_cache_usage; default max_num_seqs * 512.",
    )
    max_waiting: int | None = Field(
        default=None,
        ge=0,
        description="Refuse new requests with 503 when this many wait (vLLM max_num_queued_reqs).",
    )
    embedding_dim: int = Field(default=16, ge=1, description="Length of simulated embeddings.")


class SimFailure(BaseModel):
    """``data["sim_fail"]``: make one request fail (tests only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status_code: int = Field(default=500, ge=400, le=599, description="HTTP status reported.")
    message: str = Field(default="simulated engine failure", description="Error message.")
    after_tokens: int = Field(
        default=0, ge=0, description="Tokens produced before failing (0: before the first)."
    )
    raise_exception: bool = Field(
        default=False,
        description="Raise a RuntimeError inside the engine instead of an error response.",
    )
    kill_engine: bool = Field(
        default=False,
        description=(
            "Kill the whole engine there, as a CUDA error or a SIGKILL of vLLM's EngineCore "
            "does: every request fails with EngineDeadError and the engine stays dead."
        ),
    )


class EngineDeadError(RuntimeError):
    """The simulated engine died (named as vLLM's, which ``engine_io`` recognises)."""


class _ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=1)
    sim_fail: SimFailure | None = None


class _CompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[str] | list[int] = Field(min_length=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=1)
    sim_fail: SimFailure | None = None


class _EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sim_fail: SimFailure | None = None


@dataclass
class SimRequest:
    """A parsed request, as ``SimEngine.parse_request`` returns it."""

    endpoint: str
    request_id: str
    priority: int
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens: int
    prompt_text: str
    failure: SimFailure | None = None


@dataclass(eq=False)
class _Seq:
    """One request's place in the simulated scheduler."""

    request: SimRequest
    seq: int
    state: Literal["waiting", "running", "done"] = "waiting"
    aborted: bool = False
    generated: int = 0
    admitted: asyncio.Future[bool] | None = None
    waker: asyncio.Future[None] | None = None
    started: float = field(default_factory=time.monotonic)

    def wake(self) -> None:
        """End a pause early, or tell a waiting request it was not admitted."""
        if self.waker is not None and not self.waker.done():
            self.waker.set_result(None)
        if self.admitted is not None and not self.admitted.done():
            self.admitted.set_result(False)


def _count_tokens(text: str) -> int:
    # About one token per word, as the tiny BPE roughly does on English.
    return max(1, len(text.split()))


def _message_text(messages: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        parts.append(f"{message.get('role', 'user')} {content or ''}")
    return "\n".join(parts)


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SimEngine:
    """Duck-typed Ray LLM engine (``LLMEngine`` methods) plus what ``BellaLLMServer`` needs."""

    supports_priority = True

    def __init__(
        self,
        llm_config: Any = None,
        *,
        model_id: str | None = None,
        settings: SimEngineSettings | Mapping[str, Any] | None = None,
    ) -> None:
        raw: dict[str, Any] = {}
        if llm_config is not None:
            engine_kwargs = getattr(llm_config, "engine_kwargs", None) or {}
            for key in ("max_num_seqs", "max_model_len"):
                if engine_kwargs.get(key):
                    raw[key] = engine_kwargs[key]
            experimental = getattr(llm_config, "experimental_configs", None) or {}
            raw.update(experimental.get(SIM_ENGINE_KEY) or {})
            model_id = model_id or str(llm_config.model_id)
        if isinstance(settings, SimEngineSettings):
            raw.update(settings.model_dump(exclude_unset=True))
        elif settings is not None:
            raw.update(settings)
        self.settings = SimEngineSettings.model_validate(raw)
        self.model_id = model_id or "sim-model"
        self._kv_capacity = self.settings.kv_cache_tokens or self.settings.max_num_seqs * 512
        self._running: dict[int, _Seq] = {}
        self._waiting: list[tuple[int, int, _Seq]] = []
        self._num_waiting = 0
        self._by_id: dict[str, list[_Seq]] = {}
        self._counter = itertools.count()
        self._fingerprint = "sim-" + hashlib.sha1(self.model_id.encode()).hexdigest()[:8]
        self.started = False
        self.loaded_adapters: set[str] = set()
        """LoRA adapters ``resolve_lora`` was given (``base:adapter``)."""
        self.dead = False
        """A ``kill_engine`` failure killed the engine: every request fails from then on."""

    # -- Ray LLMEngine surface ----------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to load."""
        self.started = True

    async def check_health(self) -> None:
        """Healthy until a ``kill_engine`` failure."""
        self._raise_if_dead()

    def is_dead(self) -> bool:
        """Whether the engine died (``kill_engine``)."""
        return self.dead

    def _raise_if_dead(self) -> None:
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue (simulated engine death)")

    def _die(self) -> None:
        self.dead = True
        for seqs in list(self._by_id.values()):
            for s in seqs:
                s.wake()

    def routing_stats(self) -> dict[str, Any]:
        """No KV-aware routing."""
        return {}

    async def resolve_lora(self, lora_model: Any) -> None:
        """Record the adapter as loaded (``loaded_adapters``); its weights change nothing."""
        self.loaded_adapters.add(str(lora_model.model_id))

    async def shutdown(self) -> None:
        """Abort everything still running or waiting."""
        for request_id in list(self._by_id):
            await self.abort(request_id)

    # -- Bella surface ------------------------------------------------------------------------

    def parse_request(
        self, endpoint: str, data: dict[str, Any], *, request_id: str, priority: int = 0
    ) -> SimRequest:
        """Validate ``data`` for ``endpoint`` (raises pydantic ``ValidationError``)."""
        if endpoint == "/v1/chat/completions":
            chat = _ChatBody.model_validate(data)
            text = _message_text(chat.messages)
            return SimRequest(
                endpoint=endpoint,
                request_id=request_id,
                priority=priority,
                model=chat.model or self.model_id,
                stream=bool(chat.stream),
                include_usage=bool((chat.stream_options or {}).get("include_usage")),
                max_tokens=chat.max_completion_tokens or chat.max_tokens,
                prompt_tokens=_count_tokens(text) + 4 * len(chat.messages),
                prompt_text=text,
                failure=chat.sim_fail,
            )
        if endpoint == "/v1/completions":
            cmpl = _CompletionBody.model_validate(data)
            prompt = cmpl.prompt
            if isinstance(prompt, str):
                text, n_tokens = prompt, _count_tokens(prompt)
            elif all(isinstance(p, int) for p in prompt):
                text, n_tokens = "", len(prompt)
            else:
                text = " ".join(str(p) for p in prompt)
                n_tokens = _count_tokens(text)
            return SimRequest(
                endpoint=endpoint,
                request_id=request_id,
                priority=priority,
                model=cmpl.model or self.model_id,
                stream=bool(cmpl.stream),
                include_usage=bool((cmpl.stream_options or {}).get("include_usage")),
                max_tokens=cmpl.max_tokens,
                prompt_tokens=n_tokens,
                prompt_text=text,
                failure=cmpl.sim_fail,
            )
        if endpoint == "/v1/embeddings":
            emb = _EmbeddingBody.model_validate(data)
            if emb.messages:
                text = _message_text(emb.messages)
            elif isinstance(emb.input, str):
                text = emb.input
            else:
                text = " ".join(str(p) for p in emb.input or [])
            return SimRequest(
                endpoint=endpoint,
                request_id=request_id,
                priority=priority,
                model=emb.model or self.model_id,
                stream=False,
                include_usage=False,
                max_tokens=None,
                prompt_tokens=_count_tokens(text),
                prompt_text=text,
                failure=emb.sim_fail,
            )
        raise ValueError(f"unsupported endpoint {endpoint!r}")

    async def abort(self, request_id: str) -> bool:
        """Abort every running or waiting request with this id; frees their slots at once."""
        seqs = self._by_id.get(request_id)
        if not seqs:
            return False
        for s in list(seqs):
            s.aborted = True
            if s.state == "running":
                self._release(s)
            elif s.state == "waiting":
                self._drop_waiting(s)
            s.wake()
        return True

    def get_load(self) -> dict[str, Any]:
        """Same keys as the vLLM engine's report."""
        used = sum(s.request.prompt_tokens + s.generated for s in self._running.values())
        return {
            "running": len(self._running),
            "waiting": self._num_waiting,
            "kv_cache_usage": min(1.0, used / self._kv_capacity),
            "max_num_seqs": self.settings.max_num_seqs,
            "engine": "simulated",
        }

    # -- OpenAI methods (same output conventions as Ray's VLLMEngine) -----------------------

    async def chat(
        self, request: SimRequest, raw_request_info: Any = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Chat completion: chunk dicts if ``request.stream``, else one response dict."""
        async for out in self._completion_like(request, chat=True):
            yield out

    async def completions(
        self, request: SimRequest, raw_request_info: Any = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Text completion: chunk dicts if ``request.stream``, else one response dict."""
        async for out in self._completion_like(request, chat=False):
            yield out

    async def embeddings(
        self, request: SimRequest, raw_request_info: Any = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """One embedding response, after ``ttft_s`` in a slot."""
        error = self._precheck(request, completion_tokens=0)
        if error is not None:
            yield error
            return
        seq = self._register(request)
        try:
            if not await self._admit(seq):
                return
            await self._pause(seq, self.settings.ttft_s)
            if seq.aborted:
                return
            digest = hashlib.sha256(request.prompt_text.encode()).digest()
            vector = [
                (digest[i % len(digest)] - 127.5) / 127.5
                for i in range(self.settings.embedding_dim)
            ]
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            yield {
                "id": f"embd-{request.request_id}",
                "object": "list",
                "created": int(time.time()),
                "model": request.model,
                "data": [
                    {"index": 0, "object": "embedding", "embedding": [v / norm for v in vector]}
                ],
                "usage": {
                    "prompt_tokens": request.prompt_tokens,
                    "total_tokens": request.prompt_tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        finally:
            self._finish(seq)

    # -- internals ----------------------------------------------------------------------------

    def _max_tokens(self, request: SimRequest) -> int:
        return request.max_tokens or self.settings.max_tokens

    def _precheck(self, request: SimRequest, *, completion_tokens: int) -> dict[str, Any] | None:
        limit = self.settings.max_model_len
        if request.prompt_tokens + completion_tokens > limit:
            return _error_body(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{request.prompt_tokens + completion_tokens} tokens ({request.prompt_tokens} in "
                f"the messages, {completion_tokens} in the completion). Please reduce the length "
                "of the messages or completion.",
                400,
                "BadRequestError",
            )
        cap = self.settings.max_waiting
        if cap is not None and self._num_waiting >= cap and len(self._running) >= self.max_seqs:
            return _error_body(
                f"the engine queue is full ({cap} waiting)", 503, "ServiceUnavailableError"
            )
        failure = request.failure
        if failure is not None and failure.after_tokens == 0:
            if failure.raise_exception:
                raise RuntimeError(failure.message)
            return _error_body(failure.message, failure.status_code, _error_type(failure))
        return None

    @property
    def max_seqs(self) -> int:
        """``max_num_seqs`` of the settings."""
        return self.settings.max_num_seqs

    def _register(self, request: SimRequest) -> _Seq:
        seq = _Seq(request=request, seq=next(self._counter))
        self._by_id.setdefault(request.request_id, []).append(seq)
        return seq

    async def _admit(self, seq: _Seq) -> bool:
        """Wait for a slot (lower priority value first). False if aborted while waiting."""
        if len(self._running) < self.max_seqs and self._num_waiting == 0:
            self._start_running(seq)
            return True
        loop = asyncio.get_running_loop()
        seq.admitted = loop.create_future()
        heapq.heappush(self._waiting, (seq.request.priority, seq.seq, seq))
        self._num_waiting += 1
        try:
            admitted = await seq.admitted
        except BaseException:
            # Cancelled while waiting, or just after being handed a slot.
            if seq.state == "waiting":
                self._drop_waiting(seq)
            raise
        return admitted and not seq.aborted

    def _start_running(self, seq: _Seq) -> None:
        seq.state = "running"
        seq.started = time.monotonic()
        self._running[seq.seq] = seq

    def _drop_waiting(self, seq: _Seq) -> None:
        # Lazy deletion: the heap entry is skipped when popped.
        seq.state = "done"
        self._num_waiting -= 1

    def _release(self, seq: _Seq) -> None:
        if self._running.pop(seq.seq, None) is None:
            return
        seq.state = "done"
        while self._waiting and len(self._running) < self.max_seqs:
            _, _, nxt = heapq.heappop(self._waiting)
            if nxt.state != "waiting":
                continue
            self._num_waiting -= 1
            self._start_running(nxt)
            if nxt.admitted is not None and not nxt.admitted.done():
                nxt.admitted.set_result(True)

    def _finish(self, seq: _Seq) -> None:
        if seq.state == "running":
            self._release(seq)
        elif seq.state == "waiting":
            self._drop_waiting(seq)
        seqs = self._by_id.get(seq.request.request_id)
        if seqs is not None:
            if seq in seqs:
                seqs.remove(seq)
            if not seqs:
                del self._by_id[seq.request.request_id]

    async def _pause(self, seq: _Seq, delay_s: float) -> None:
        """Sleep ``delay_s`` unless aborted first (one future and one timer, no task)."""
        if delay_s <= 0 or seq.aborted:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        seq.waker = fut
        handle = loop.call_later(delay_s, _set_if_pending, fut)
        try:
            await fut
        finally:
            handle.cancel()
            seq.waker = None

    def _token(self, seq: _Seq, i: int) -> str:
        word = _WORDS[(seq.seq * 7 + i) % len(_WORDS)]
        return word if i == 0 else " " + word

    async def _completion_like(
        self, request: SimRequest, *, chat: bool
    ) -> AsyncGenerator[dict[str, Any], None]:
        max_tokens = self._max_tokens(request)
        error = self._precheck(request, completion_tokens=max_tokens)
        if error is not None:
            yield error
            return
        self._raise_if_dead()
        fmt = _Formatter(request, chat=chat, fingerprint=self._fingerprint)
        seq = self._register(request)
        try:
            if not await self._admit(seq):
                self._raise_if_dead()
                if request.stream:
                    yield fmt.delta("", "abort", first=True)
                else:
                    yield fmt.full("", "abort", 0)
                return
            await self._pause(seq, self.settings.ttft_s)
            self._raise_if_dead()
            interval = 1.0 / self.settings.tokens_per_s
            failure = request.failure
            text: list[str] = []
            finish: str = "length"
            if request.stream and chat:
                yield fmt.delta("", None, first=True)
            for i in range(max_tokens):
                if i:
                    await self._pause(seq, interval)
                self._raise_if_dead()
                if seq.aborted:
                    finish = "abort"
                    break
                if failure is not None and failure.after_tokens and i == failure.after_tokens:
                    if failure.kill_engine:
                        self._die()
                        self._raise_if_dead()
                    if failure.raise_exception:
                        raise RuntimeError(failure.message)
                    yield _error_body(failure.message, failure.status_code, _error_type(failure))
                    return
                token = self._token(seq, i)
                seq.generated += 1
                text.append(token)
                if request.stream:
                    last = i == max_tokens - 1
                    yield fmt.delta(token, "length" if last else None, last=last)
            if request.stream:
                if finish == "abort":
                    yield fmt.delta("", "abort", last=True)
                if request.include_usage:
                    yield fmt.usage_chunk(seq.generated)
            else:
                yield fmt.full("".join(text), finish, seq.generated)
        finally:
            self._finish(seq)


def _error_type(failure: SimFailure) -> str:
    if failure.status_code in (429, 503):
        return "ServiceUnavailableError"
    return "BadRequestError" if failure.status_code < 500 else "InternalServerError"


def _error_body(message: str, status: int, err_type: str) -> dict[str, Any]:
    """The OpenAI error body as vLLM sends it: its ``code`` is the HTTP status, an int."""
    body = openai_error(message, err_type)
    body["error"]["code"] = status
    return body


class _Formatter:
    """OpenAI dicts shaped like vLLM 0.29's (``None`` where vLLM sends null)."""

    def __init__(self, request: SimRequest, *, chat: bool, fingerprint: str) -> None:
        self.request = request
        self.chat = chat
        self.fingerprint = fingerprint
        self.created = int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + request.request_id

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.request.model,
        }

    def delta(
        self, token: str, finish: str | None, *, first: bool = False, last: bool = False
    ) -> dict[str, Any]:
        out = self._head()
        if self.chat:
            choice: dict[str, Any] = {"index": 0}
            if first:
                choice["delta"] = {"role": "assistant", "content": token}
                choice.update(logprobs=None, finish_reason=finish)
                out["choices"] = [choice]
                out.update(prompt_token_ids=None, prompt_text=None)
                return out
            choice["delta"] = {"content": token}
            choice.update(logprobs=None, finish_reason=finish)
        else:
            choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": finish}
        if finish is not None or not self.chat:
            choice["stop_reason"] = None
        if not self.chat:
            choice["prompt_token_ids"] = None
        choice["token_ids"] = None
        out["choices"] = [choice]
        if last and not self.request.include_usage:
            out["system_fingerprint"] = self.fingerprint
        return out

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        out = self._head()
        out["choices"] = []
        out["usage"] = {
            "prompt_tokens": self.request.prompt_tokens,
            "total_tokens": self.request.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        out["system_fingerprint"] = self.fingerprint
        return out

    def full(self, text: str, finish: str, completion_tokens: int) -> dict[str, Any]:
        usage = {
            "prompt_tokens": self.request.prompt_tokens,
            "total_tokens": self.request.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }
        choice: dict[str, Any]
        if self.chat:
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
            extra: dict[str, Any] = {
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "prompt_text": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            extra = {}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.request.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": self.fingerprint,
            "usage": usage,
            **extra,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
