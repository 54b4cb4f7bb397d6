"""Bella-Queue wire protocol: every message of ``bella-queue-protocol.md`` as a model.

This module owns the exact shape of what crosses the wire between a worker, Bella-Queue
and the event-bus Redis: HTTP bodies (register, put, take, complete, eventbus, batches,
error envelopes), the Task, and the two Redis stream events with their field encoding.
It must not do I/O. Readers are tolerant (unknown inbound fields are ignored and logged
once); writers are strict (outbound bodies are exact, snake_case, nulls omitted).

Section numbers in docstrings refer to the protocol specification.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

QUEUE_NAME_RE = re.compile(r"^[a-zA-Z0-9_\-]+$")
QUEUE_NAME_MAX_LEN = 64
FIFO_TAKE_CAP = 10
"""``fifo`` returns at most this many tasks per take (§3)."""
SEQUENTIAL_LOCK_TTL_S = 600
EVENT_STREAM_MINID_WINDOW_MS = 30 * 60 * 1000
"""XADD trims entries older than now minus this window (§4.2)."""
ONLINE_MAX_LIFETIME_S = 300
ONLINE_MAX_WAIT_S = 600
OFFLINE_DEFAULT_LIFETIME_S = 86400
DEFAULT_PUT_TIMEOUT_S = 300
QUEUE_NAME_HEADER = "X-BELLA-QUEUE-NAME"
"""The optional header of ``POST /v1/batches`` naming the queue (§1.9; routed if absent)."""
DEFAULT_ENDPOINT = "/v1/chat/completions"
"""The capability the worker registers a queue with when none is named (§1.1), and the endpoint
a task without one is served as."""

PROGRESS_EVENT = "task-progress-event"
COMPLETION_EVENT = "task-completion-event"
STREAM_DONE = "[DONE]"
JAVA_LONG_MAX = 2**63 - 1
"""The server keeps times as Java ``long``s: an inbound time beyond this is out of range."""
JAVA_INT_MIN, JAVA_INT_MAX = -(2**31), 2**31 - 1
TASK_ID_MAX_LEN = 256
"""An inbound ``task_id`` or ``instance_id`` longer than this is not one the server minted."""


def now_ms() -> int:
    """Epoch milliseconds, the protocol's time unit."""
    return time.time_ns() // 1_000_000


def dumps(obj: Any) -> str:
    """Compact JSON as the Java side writes it (UTF-8, no spaces)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class ResponseMode(enum.StrEnum):
    """How a task's producer waits for its result (§1.3)."""

    BLOCKING = "blocking"
    STREAMING = "streaming"
    CALLBACK = "callback"
    BATCH = "batch"

    @property
    def is_online(self) -> bool:
        """Blocking and streaming tasks are answered through the event bus (§4.1)."""
        return self in (ResponseMode.BLOCKING, ResponseMode.STREAMING)

    @property
    def id_letter(self) -> str:
        """The mode letter inside a task id (§2.2)."""
        return _MODE_LETTERS[self]


_MODE_LETTERS = {
    ResponseMode.BLOCKING: "B",
    ResponseMode.STREAMING: "S",
    ResponseMode.CALLBACK: "C",
    ResponseMode.BATCH: "P",
}


class TakeStrategy(enum.StrEnum):
    """How ``take`` walks the listed queues (§3)."""

    FIFO = "fifo"
    ROUND_ROBIN = "round_robin"
    ACTIVE_PASSIVE = "active_passive"
    SEQUENTIAL = "sequential"


class Level(enum.IntEnum):
    """Queue level: 0 is online (Redis only), 1 is offline (persisted) (§2.3)."""

    ONLINE = 0
    OFFLINE = 1


def validate_queue_name(name: str) -> str:
    """Check a base queue name as register does (§1.1); raise ``ValueError`` if invalid."""
    if not name or len(name) > QUEUE_NAME_MAX_LEN or not QUEUE_NAME_RE.match(name):
        raise ValueError(
            f"queue name {name!r} must match {QUEUE_NAME_RE.pattern} and be at most "
            f"{QUEUE_NAME_MAX_LEN} characters"
        )
    return name


def parse_full_queue_name(full: str) -> tuple[str, Level]:
    """Split ``"name:level"`` into its parts; raise ``ValueError`` if malformed (§1.4)."""
    parts = full.split(":")
    if len(parts) != 2:
        raise ValueError(f"queue {full!r} must be '<name>:<level>' with exactly one ':'")
    name, level_text = parts
    try:
        level = Level(int(level_text))
    except ValueError:
        raise ValueError(f"Unknown queue level in {full!r}: only 0 and 1 exist") from None
    validate_queue_name(name)
    return name, level


def full_queue_name(name: str, level: int) -> str:
    """Join a base name and a level into the ``"name:level"`` form."""
    return f"{name}:{int(level)}"


# --------------------------------------------------------------------------------------
# Task ids (§2.2)
# --------------------------------------------------------------------------------------

TASK_ID_RE = re.compile(
    r"^TASK-(?P<queue_id>\d+)-(?P<level>\d)-(?P<mode>[BSCP])-(?P<stamp>\d{12})"
    r"-(?P<instance>\d{4})-(?P<serial>\d{6})$"
)
BATCH_ID_RE = re.compile(
    r"^BATCH-(?P<queue_id>\d+)-(?P<level>\d)-(?P<stamp>\d{12})-(?P<instance>\d{4})-(?P<serial>\d{6})$"
)


def _id_stamp(at_ms: int) -> str:
    return time.strftime("%y%m%d%H%M%S", time.gmtime(at_ms / 1000))


def make_task_id(
    queue_id: int, level: int, mode: ResponseMode, at_ms: int, instance: int, serial: int
) -> str:
    """Mint a task id in the server's format; workers treat ids as opaque."""
    return (
        f"TASK-{queue_id}-{int(level)}-{mode.id_letter}-{_id_stamp(at_ms)}"
        f"-{instance % 10000:04d}-{serial % 1_000_000:06d}"
    )


def make_batch_id(queue_id: int, level: int, at_ms: int, instance: int, serial: int) -> str:
    """Mint a batch id in the server's format."""
    return (
        f"BATCH-{queue_id}-{int(level)}-{_id_stamp(at_ms)}"
        f"-{instance % 10000:04d}-{serial % 1_000_000:06d}"
    )


# --------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------


class WireModel(BaseModel):
    """A strict outbound message: exact fields, snake_case, nulls omitted on dump."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict sent on the wire (nulls omitted, secrets revealed)."""
        return self.model_dump(mode="json", exclude_none=True, context={"reveal_secrets": True})


_warned_unknown: set[tuple[str, str]] = set()


class InboundModel(WireModel):
    """A tolerant inbound message: unknown fields are ignored and logged once per name."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _note_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            # Aliased fields (camelCase event payloads) arrive under their alias.
            known = set(cls.model_fields) | {
                f.alias for f in cls.model_fields.values() if f.alias is not None
            }
            for key in data:
                if key not in known and (cls.__name__, key) not in _warned_unknown:
                    _warned_unknown.add((cls.__name__, key))
                    logger.info("ignoring unknown %s field %r", cls.__name__, key)
        return data


# --------------------------------------------------------------------------------------
# HTTP messages (§1)
# --------------------------------------------------------------------------------------


class RegisterRequest(WireModel):
    """``POST /v1/queue/register`` body (§1.1)."""

    queue: str = Field(description="Base queue name, no level: ^[a-zA-Z0-9_-]+$, at most 64.")
    endpoint: str = Field(min_length=1, description="Capability, e.g. /v1/chat/completions.")


class PutRequest(WireModel):
    """``POST /v1/queue/put`` body (§1.3)."""

    endpoint: str = Field(description="Capability, e.g. /v1/chat/completions.")
    data: dict[str, Any] = Field(description="The request body; becomes task.data.")
    queue: str | None = Field(default=None, description="Base queue name; routed if absent.")
    level: int | None = Field(default=None, description="0 online, 1 offline; default 0.")
    response_mode: ResponseMode | None = Field(
        default=None, description="Default callback. blocking/streaming force level 0."
    )
    callback_url: str | None = Field(default=None, description="The server POSTs results here.")
    timeout: int | None = Field(default=None, description="Task lifetime in seconds.")
    trace_id: str | None = Field(default=None, description="Echoed as task.trace_id.")

    @property
    def effective_mode(self) -> ResponseMode:
        """The mode the server applies: callback when absent."""
        return self.response_mode or ResponseMode.CALLBACK

    @property
    def effective_level(self) -> Level:
        """``Put.getQueueLevel()``: 0 for online modes, else ``level`` (1 if negative)."""
        if self.effective_mode.is_online:
            return Level.ONLINE
        level = 0 if self.level is None else self.level
        return Level(level) if level >= 0 else Level.OFFLINE

    @property
    def lifetime_s(self) -> int:
        """``Put.getTaskTimeout()``: online min(timeout, 300); offline timeout or 24 h."""
        timeout = DEFAULT_PUT_TIMEOUT_S if self.timeout is None else self.timeout
        if self.effective_level is Level.ONLINE:
            return min(timeout, ONLINE_MAX_LIFETIME_S) if timeout > 0 else ONLINE_MAX_LIFETIME_S
        return timeout if timeout > 0 else OFFLINE_DEFAULT_LIFETIME_S


class BellaResponse(InboundModel):
    """The wrapper only callback-mode put returns: ``{code, timestamp, data}`` (§1.0)."""

    code: int
    timestamp: int
    data: Any = None


class BellaErrorBody(InboundModel):
    """A 400/500 error object: ``{code, message, timestamp[, stacktrace]}`` (§1.0)."""

    code: int
    message: str = ""
    timestamp: int = 0
    stacktrace: str | None = None


class TakeRequest(WireModel):
    """``POST /v1/queue/take`` body (§1.4). Always sends strategy and size explicitly."""

    queues: list[str] = Field(min_length=1, description="Full names '<queue>:<level>'.")
    size: int = Field(description="How many tasks at most; semantics per strategy (§3).")
    strategy: TakeStrategy = Field(default=TakeStrategy.FIFO, description="Take strategy.")
    process_timeout: int = Field(
        default=0, ge=0, description="Seconds before an uncompleted task is redelivered (§2.5)."
    )
    process_max_retries: int = Field(
        default=0, ge=-1, description="Redeliveries after process_timeout; -1 unlimited."
    )
    min_age_seconds: int = Field(default=0, ge=0, description="Take only tasks this old.")
    endpoint: str | None = Field(default=None, description="Sent by the SDK; ignored.")


_JavaTime = Annotated[int, Field(ge=0, le=JAVA_LONG_MAX)]
"""An epoch-millisecond time as the server stores it (a non-negative Java ``long``)."""


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Task(InboundModel):
    """A task as ``take`` returns it (§2.1). ``ak`` is the producer's key: a secret."""

    task_id: str = Field(min_length=1, max_length=TASK_ID_MAX_LEN)
    ak: SecretStr | None = None
    endpoint: str = ""
    queue: str = ""
    level: int = Field(default=0, ge=JAVA_INT_MIN, le=JAVA_INT_MAX)
    data: dict[str, Any] = Field(default_factory=dict)
    status: str | None = None
    result: Any = None
    instance_id: str | None = Field(default=None, max_length=TASK_ID_MAX_LEN)
    batch_id: str | None = None
    trace_id: str | None = None
    custom_id: str | None = None
    start_time: _JavaTime = 0
    running_time: _JavaTime = 0
    expire_time: _JavaTime = 0
    completed_time: _JavaTime = 0
    callback_url: str | None = None
    response_mode: ResponseMode = ResponseMode.CALLBACK

    @field_validator("task_id", "instance_id", "queue")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        # Ids go into URLs and stream keys, the queue into metric tags: a lone surrogate
        # could not be sent back.
        if value is not None and not _is_utf8(value):
            raise ValueError("must be valid Unicode (no lone surrogates)")
        return value

    @field_serializer("ak")
    def _dump_ak(self, ak: SecretStr | None, info: SerializationInfo) -> str | None:
        if ak is None:
            return None
        context = info.context or {}
        return ak.get_secret_value() if context.get("reveal_secrets") else str(ak)

    @property
    def full_queue(self) -> str:
        """``"<queue>:<level>"``."""
        return full_queue_name(self.queue, self.level)

    @property
    def is_online(self) -> bool:
        """Answered through the event bus rather than HTTP complete (§4.1)."""
        return self.response_mode.is_online

    def expired(self, at_ms: int | None = None) -> bool:
        """Whether ``expire_time`` has passed (a zero expire_time never expires)."""
        return self.expire_time > 0 and (now_ms() if at_ms is None else at_ms) >= self.expire_time


def describe_validation(exc: ValidationError) -> str:
    """The locations and messages of a ValidationError, never its input values (secrets)."""
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)[:5]
    ]
    return "; ".join(parts)


@dataclass(frozen=True)
class InvalidTask:
    """An entry of a take answer that is not a readable Task (§1.4).

    The server already popped it, so it is answered 400 when :func:`task_return_path` finds
    its id and return path, and logged otherwise. ``raw`` may hold the producer's ``ak``: it
    is left out of ``repr`` and must never be logged.
    """

    queue: str
    reason: str
    raw: Any = field(default=None, repr=False)


def task_return_path(raw: Any) -> Task | None:
    """A minimal Task with only ``raw``'s id and return path, or None when either is unknown.

    Online (``blocking``/``streaming``) tasks are answered on the event bus, which needs a
    valid ``instance_id``; any other mode, unknown or absent ones included (the server's
    default is ``callback``), is answered by HTTP complete, which needs only the ``task_id``.
    """
    if not isinstance(raw, Mapping):
        return None
    try:
        mode = ResponseMode(str(raw.get("response_mode")))
    except ValueError:
        mode = ResponseMode.CALLBACK
    stub: dict[str, Any] = {"task_id": raw.get("task_id"), "response_mode": mode}
    if mode.is_online:
        stub["instance_id"] = raw.get("instance_id")
        if not isinstance(stub["instance_id"], str) or not stub["instance_id"]:
            return None
    for name in ("queue", "level"):
        # Kept for logs and metrics when readable; never needed to answer.
        value = raw.get(name)
        if (name == "queue" and isinstance(value, str) and _is_utf8(value)) or (
            name == "level" and type(value) is int and JAVA_INT_MIN <= value <= JAVA_INT_MAX
        ):
            stub[name] = value
    try:
        return Task.model_validate(stub)
    except ValidationError:
        return None


def _queue_label(key: Any) -> str:
    return key if isinstance(key, str) and _is_utf8(key) else repr(key)


def _read_entries(queue: str, entries: list[Any], rejected: list[InvalidTask]) -> list[Task]:
    """The entries of one queue that are Tasks; the others are appended to ``rejected``."""
    parsed: list[Task] = []
    for entry in entries:
        try:
            parsed.append(Task.model_validate(entry))
        except ValidationError as exc:
            rejected.append(InvalidTask(queue, describe_validation(exc), entry))
        except RecursionError:
            rejected.append(InvalidTask(queue, "the task is nested too deeply", entry))
    return parsed


def _too_deep(queue: str, entry_text: str) -> InvalidTask:
    """A take entry nested too deeply to parse, with the top-level fields that do parse.

    ``raw`` keeps every top-level field of the entry but the too-deep ones, so that
    :func:`task_return_path` finds its id and return path; ``None`` when the entry is not an
    object. The reason names the too-deep fields the Task model knows, never a value.
    """
    try:
        members = split_json_object(entry_text)
    except ValueError:
        return InvalidTask(queue, "the task is nested too deeply", None)
    raw: dict[str, Any] = {}
    deep: list[str] = []
    for key, value_text in members:
        try:
            raw[key] = json.loads(value_text)
        except RecursionError:
            deep.append(key if key in Task.model_fields else "another field")
    where = ", ".join(sorted(set(deep))) or "the task"
    return InvalidTask(queue, f"{where}: nested too deeply", raw)


# --------------------------------------------------------------------------------------
# Splitting JSON text without parsing it (a take answer too deep for json.loads)
# --------------------------------------------------------------------------------------

_WS_RE = re.compile(r"[ \t\n\r]*")
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR_END_RE = re.compile(r"[,\]}\s]")


def _skip_ws(text: str, pos: int) -> int:
    match = _WS_RE.match(text, pos)
    return match.end() if match else pos


def _value_end(text: str, pos: int) -> int:
    """Where the JSON value starting at ``pos`` ends, scanning without recursion.

    Strings are skipped whole (escaped quotes, brackets inside strings); only brackets
    outside strings are counted, with ``str.count`` where the value cannot end (so a body of
    millions of brackets costs milliseconds). The value itself is checked by whoever parses it.
    """
    if pos >= len(text):
        raise ValueError("a JSON value is missing at the end of the text")
    first = text[pos]
    if first == '"':
        string = _STRING_RE.match(text, pos)
        if string is None:
            raise ValueError("unterminated JSON string")
        return string.end()
    if first not in "[{":
        scalar_end = _SCALAR_END_RE.search(text, pos)
        return len(text) if scalar_end is None else scalar_end.start()
    depth = 1
    pos += 1
    while True:
        quote = text.find('"', pos)
        end = len(text) if quote < 0 else quote
        closes = text.count("]", pos, end) + text.count("}", pos, end)
        if closes < depth:  # the value goes on past this stretch
            depth += text.count("[", pos, end) + text.count("{", pos, end) - closes
        else:
            closed, depth = _close_in(text, pos, end, depth)
            if closed >= 0:
                return closed
        if quote < 0:
            raise ValueError("unterminated JSON array or object")
        string = _STRING_RE.match(text, quote)
        if string is None:
            raise ValueError("unterminated JSON string")
        pos = string.end()


_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SCAN_BLOCK = 4096


def _close_in(text: str, start: int, end: int, depth: int) -> tuple[int, int]:
    """The index after the bracket of ``text[start:end]`` (no strings in it) that brings
    ``depth`` to 0, or -1 and the depth at ``end``.

    Block by block: a block with fewer closing brackets than ``depth`` cannot close the value
    and is only counted; the others are walked with running sums (C loops either way).
    """
    for block in range(start, end, _SCAN_BLOCK):
        block_end = min(end, block + _SCAN_BLOCK)
        closes = text.count("]", block, block_end) + text.count("}", block, block_end)
        if closes < depth:
            depth += text.count("[", block, block_end) + text.count("{", block, block_end)
            depth -= closes
            continue
        steps = map(_BRACKET_STEP.get, text[block:block_end], itertools.repeat(0))
        sums = list(itertools.accumulate(steps))
        try:
            return block + sums.index(-depth) + 1, 0
        except ValueError:
            depth += sums[-1]
    return -1, depth


def _members(text: str, opening: str) -> list[tuple[str, str]]:
    # (key, value text) of an object, ("", element text) of an array.
    closing = "}" if opening == "{" else "]"
    pos = _skip_ws(text, 0)
    if text[pos : pos + 1] != opening:
        raise ValueError(f"expected a JSON {'object' if opening == '{' else 'array'}")
    pos = _skip_ws(text, pos + 1)
    found: list[tuple[str, str]] = []
    if text[pos : pos + 1] == closing:
        pos += 1
    else:
        while True:
            key = ""
            if opening == "{":
                if text[pos : pos + 1] != '"':
                    raise ValueError("an object key must be a string")
                key_end = _value_end(text, pos)
                key = json.loads(text[pos:key_end])
                pos = _skip_ws(text, key_end)
                if text[pos : pos + 1] != ":":
                    raise ValueError("expected ':' after an object key")
                pos = _skip_ws(text, pos + 1)
            end = _value_end(text, pos)
            found.append((key, text[pos:end]))
            pos = _skip_ws(text, end)
            separator = text[pos : pos + 1]
            pos += 1
            if separator == closing:
                break
            if separator != ",":
                raise ValueError(f"expected ',' or {closing!r}")
            pos = _skip_ws(text, pos)
    if _skip_ws(text, pos) != len(text):
        raise ValueError("extra data after the JSON value")
    return found


def split_json_object(text: str) -> list[tuple[str, str]]:
    """The top-level members of the JSON object ``text`` as ``(key, value JSON text)``.

    Keys are decoded, values are left as text: no value is parsed, so a value nested deeper
    than ``json.loads`` goes does not stop the others from being read. Raises ``ValueError``
    when ``text`` is not one object (a malformed value is only found when it is parsed).
    """
    return _members(text, "{")


def split_json_array(text: str) -> list[str]:
    """The elements of the JSON array ``text`` as JSON texts (see :func:`split_json_object`)."""
    return [element for _, element in _members(text, "[")]


class TakeResponse(BaseModel):
    """``take`` answers ``{"<queue>:<level>": [Task, ...]}`` (§1.4); ``{}`` when empty.

    ``rejected`` holds the entries that could not be read as tasks (see :meth:`from_wire`).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    tasks: dict[str, list[Task]] = Field(default_factory=dict)
    rejected: list[InvalidTask] = Field(default_factory=list)

    @classmethod
    def from_wire(cls, body: Any) -> TakeResponse:
        """Parse the raw map the server sends, one entry at a time.

        Tolerant: an entry that is not a valid Task goes to ``rejected`` (with a reason that
        names fields, never values), as does a queue mapped to something else than a list;
        the other tasks are kept. A body that is not an object parses as empty, rejected.
        """
        if not isinstance(body, Mapping):
            return cls(rejected=[InvalidTask("", "the take answer is not a JSON object", body)])
        tasks: dict[str, list[Task]] = {}
        rejected: list[InvalidTask] = []
        for key, value in body.items():
            queue = _queue_label(key)
            if not isinstance(value, list):
                rejected.append(InvalidTask(queue, "the queue maps to a non-list", value))
                continue
            tasks[queue] = _read_entries(queue, value, rejected)
        return cls(tasks=tasks, rejected=rejected)

    @classmethod
    def from_text(cls, text: str) -> TakeResponse:
        """Parse the take answer's JSON text; raise ``ValueError`` when it is not an object of
        lists (not JSON, a queue mapped to a non-list: the server misbehaved).

        One ``json.loads`` of the whole text. Only when that fails on nesting (a task's
        ``data`` nested deeper than the parser goes) is the text split with
        :func:`split_json_object` and each task parsed on its own: the deep one is rejected
        with the top-level fields that could be read (its id and return path, so it is
        answered 400), and the others are kept.
        """
        try:
            body = json.loads(text)
        except RecursionError:
            return cls._from_split(text)
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object, got {type(body).__name__}")
        for queue, entries in body.items():
            if not isinstance(entries, list):
                raise ValueError(f"queue {_queue_label(queue)!r} maps to a non-list")
        return cls.from_wire(body)

    @classmethod
    def _from_split(cls, text: str) -> TakeResponse:
        # Duplicate keys: the last one wins, as with json.loads.
        queues = dict(split_json_object(text))
        tasks: dict[str, list[Task]] = {}
        rejected: list[InvalidTask] = []
        for key, value_text in queues.items():
            queue = _queue_label(key)
            if not value_text.startswith("["):
                raise ValueError(f"queue {queue!r} maps to a non-list")
            entries: list[Any] = []
            for entry_text in split_json_array(value_text):
                try:
                    entries.append(json.loads(entry_text))
                except RecursionError:
                    rejected.append(_too_deep(queue, entry_text))
            tasks[queue] = _read_entries(queue, entries, rejected)
        return cls(tasks=tasks, rejected=rejected)

    def to_wire(self) -> dict[str, Any]:
        """The raw map of the readable tasks, secrets revealed, as the server sends it."""
        return {key: [t.to_wire() for t in value] for key, value in self.tasks.items()}

    def all_tasks(self) -> list[Task]:
        """Every task, in the order the server listed them."""
        return [task for tasks in self.tasks.values() for task in tasks]


class EventBusConfig(InboundModel):
    """``GET /v1/queue/eventbus`` answer (§1.2). ``url`` may embed a password."""

    url: str
    topic: str

    def __repr__(self) -> str:
        return f"EventBusConfig(url={redact_url(self.url)!r}, topic={self.topic!r})"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """``url`` with its credentials hidden, for logs, errors and status pages.

    ``scheme://user:password@host/...`` becomes ``scheme://user:***@host/...`` and a lone
    ``scheme://token@host`` becomes ``scheme://***@host``. The userinfo ends at the LAST ``@``
    of the URL: a password may hold ``@``, ``/``, ``:``, ``?`` or ``#`` unescaped, which
    ``urlsplit`` would cut at the wrong place (``redis://:ab/cd@h``). An ``@`` inside a path
    or query is so over-redacted, which is the safe side. A URL without ``@`` is unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    userinfo, host = rest.rsplit("@", 1)
    user, colon, _password = userinfo.partition(":")
    shown = f"{user}:***" if colon and not _has_delims(user) else "***"
    return f"{scheme}{sep}{shown}@{host}"


def _has_delims(user: str) -> bool:
    # A "user" holding a path or query delimiter means the userinfo guess is off: hide it all.
    return any(c in user for c in "/?#")


# --------------------------------------------------------------------------------------
# Results (§6) and OpenAI errors
# --------------------------------------------------------------------------------------


def openai_error(
    message: str, type_: str = "server_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` (the one home
    of its shape: ``TaskError.to_body`` builds it here). ``param`` and ``code`` are always
    present, null when unset, as OpenAI sends them."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class TaskResult(InboundModel):
    """The complete body and the completion event's ``result`` (§6.1).

    ``status_code`` is an int from workers; the server's own timeout result sends the string
    ``"408"`` (§6.3), so readers accept both.
    """

    status_code: int | str = 200
    request_id: str | None = None
    body: Any = None
    stream: bool | None = None

    @property
    def status(self) -> int:
        """``status_code`` as an int (the server's ``MapUtils.getInteger``, default 200)."""
        try:
            return int(self.status_code)
        except (TypeError, ValueError):
            return 200


def result_body(status_code: int, request_id: str, body: Any = None) -> dict[str, Any]:
    """The exact ``{status_code, request_id, body}`` a worker sends (§6.1)."""
    result: dict[str, Any] = {"status_code": status_code, "request_id": request_id}
    if body is not None:
        result["body"] = body
    return result


# --------------------------------------------------------------------------------------
# Redis stream events (§4.2)
# --------------------------------------------------------------------------------------


def stream_key(topic: str, instance_id: str) -> str:
    """The stream a task's events go to: ``topic + instance_id``, verbatim."""
    return topic + instance_id


def event_minid(at_ms: int | None = None) -> int:
    """The XADD ``MINID`` for an event written now: 30 minutes back."""
    return (now_ms() if at_ms is None else at_ms) - EVENT_STREAM_MINID_WINDOW_MS


def progress_fields(
    task_id: str, event_id: str, event_name: str, event_data: Any, at_ms: int | None = None
) -> dict[str, str]:
    """Stream fields of a progress event: ``name, from, payload (JSON text), context, timestamp``.

    Written for the hot path (one call per token chunk): a single ``json.dumps``.
    """
    payload = {
        "taskId": task_id,
        "eventId": event_id,
        "eventName": event_name,
        "eventData": event_data,
    }
    return {
        "name": PROGRESS_EVENT,
        "from": "",
        "payload": dumps(payload),
        "context": "",
        "timestamp": str(now_ms() if at_ms is None else at_ms),
    }


def completion_fields(
    task_id: str, result: Mapping[str, Any], at_ms: int | None = None
) -> dict[str, str]:
    """Stream fields of a completion event; ``result`` is ``{status_code, request_id, body}``."""
    return {
        "name": COMPLETION_EVENT,
        "from": "",
        "payload": dumps({"taskId": task_id, "result": dict(result)}),
        "context": "",
        "timestamp": str(now_ms() if at_ms is None else at_ms),
    }


class ProgressEvent(InboundModel):
    """Payload of a ``task-progress-event``; camelCase on the wire."""

    name: Literal["task-progress-event"] = "task-progress-event"
    task_id: str = Field(alias="taskId")
    event_id: str | None = Field(default=None, alias="eventId")
    event_name: str | None = Field(default=None, alias="eventName")
    event_data: Any = Field(default=None, alias="eventData")
    timestamp: int | None = None


class CompletionEvent(InboundModel):
    """Payload of a ``task-completion-event``; ``result`` must be a JSON object."""

    name: Literal["task-completion-event"] = "task-completion-event"
    task_id: str = Field(alias="taskId")
    result: dict[str, Any] = Field(default_factory=dict)
    timestamp: int | None = None


StreamEvent = Annotated[ProgressEvent | CompletionEvent, Field(discriminator="name")]


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def decode_event(
    fields: Mapping[str, str] | Mapping[bytes, bytes],
) -> ProgressEvent | CompletionEvent | None:
    """Decode one stream entry as the server does (§4.3); ``None`` for unknown names.

    Raises ``ValueError`` when ``payload`` is not JSON or lacks ``taskId``.
    """
    text = {_text(k): _text(v) for k, v in fields.items()}
    name = text.get("name", "")
    if name not in (PROGRESS_EVENT, COMPLETION_EVENT):
        return None
    payload = json.loads(text.get("payload") or "{}")
    if not isinstance(payload, dict):
        raise ValueError("event payload must be a JSON object")
    timestamp = text.get("timestamp")
    payload = {**payload, "name": name, "timestamp": int(timestamp) if timestamp else None}
    if name == PROGRESS_EVENT:
        return ProgressEvent.model_validate(payload)
    return CompletionEvent.model_validate(payload)


def sse_data(event_data: Any) -> str:
    """What the server writes as SSE ``data:`` for a progress event (§4.4).

    A string is sent verbatim, with a leading ``data:`` stripped; anything else is JSON.
    """
    if isinstance(event_data, str):
        if event_data.startswith("data:"):
            return event_data[5:].strip()
        return event_data
    return dumps(event_data)


# --------------------------------------------------------------------------------------
# Batches (§1.9, §7)
# --------------------------------------------------------------------------------------


class BatchRequest(WireModel):
    """``POST /v1/batches`` body (OpenAI ``BatchRequest``)."""

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None


class BatchRequestCounts(InboundModel):
    """OpenAI batch request counts."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(InboundModel):
    """An OpenAI-style batch object; timestamps are epoch milliseconds (§1.9)."""

    id: str
    object: str = "batch"
    endpoint: str = ""
    input_file_id: str = ""
    completion_window: str = "24h"
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int = 0
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    metadata: dict[str, Any] | None = None


class BatchInputLine(InboundModel):
    """One line of a batch input JSONL file."""

    custom_id: str = ""
    method: str = "POST"
    url: str = ""
    body: dict[str, Any] = Field(default_factory=dict)


KEYSPACE_EVENTS_SETTING = "notify-keyspace-events"
"""The Redis setting Bella-Queue's redelivery timer depends on (§2.5)."""


def keyspace_events_redeliver(flags: str) -> bool:
    """Whether Redis's ``notify-keyspace-events`` value lets Bella-Queue's redelivery timer fire.

    The server ``PSUBSCRIBE``s ``__keyevent@0__:expired`` (§2.5): keyevent notifications
    (``E``) of expired keys (``x``, or ``A``, which includes it) are needed; ``K`` (keyspace
    channels) and ``g`` (generic commands) do not deliver that channel.
    """
    return "E" in flags and ("x" in flags or "A" in flags)


class BatchOutputLine(WireModel):
    """One line of a batch output file: the worker's complete payload verbatim (§7)."""

    id: str
    custom_id: str
    response: dict[str, Any]


__all__ = [
    "COMPLETION_EVENT",
    "DEFAULT_ENDPOINT",
    "FIFO_TAKE_CAP",
    "JAVA_LONG_MAX",
    "KEYSPACE_EVENTS_SETTING",
    "PROGRESS_EVENT",
    "QUEUE_NAME_HEADER",
    "STREAM_DONE",
    "Batch",
    "BatchInputLine",
    "BatchOutputLine",
    "BatchRequest",
    "BellaErrorBody",
    "BellaResponse",
    "CompletionEvent",
    "EventBusConfig",
    "InvalidTask",
    "Level",
    "ProgressEvent",
    "PutRequest",
    "RegisterRequest",
    "ResponseMode",
    "StreamEvent",
    "TakeRequest",
    "TakeResponse",
    "TakeStrategy",
    "Task",
    "TaskResult",
    "completion_fields",
    "decode_event",
    "describe_validation",
    "dumps",
    "event_minid",
    "full_queue_name",
    "keyspace_events_redeliver",
    "make_batch_id",
    "make_task_id",
    "now_ms",
    "openai_error",
    "parse_full_queue_name",
    "progress_fields",
    "redact_url",
    "result_body",
    "split_json_array",
    "split_json_object",
    "sse_data",
    "stream_key",
    "task_return_path",
    "validate_queue_name",
]
