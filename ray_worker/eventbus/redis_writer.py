"""Event-bus Redis writer: already-encoded stream entries into Redis Streams (protocol §4).

Runs in the publisher actor (``publisher_actor.RedisPublisher`` holds one), never in a
caller. This module owns the event-bus Redis connection (``StreamWriter``, plain asyncio, no
Ray). Apart from the one-shot checks in ``redis_check``, it is the only module that sees
redis-py errors: they are counted, logged and translated into
``errors.EventBusUnavailableError``. It must not encode events beyond what
``protocol.progress_fields`` / ``completion_fields`` produced (``shared.lost_events_answer``
builds the one answer of its own, below), read an entry's JSON payload (each entry carries
its task id and event id: ``shared.Entry``), decide what a successful task's result is, talk
to Bella-Queue over HTTP, or import Ray.

``StreamWriter``
    One ``redis.asyncio.Redis`` built from a URL with explicit socket/connect timeouts, TCP
    keepalive, idle health checks, and redis-py's own retry turned off (this class retries,
    so it knows what may have been applied). ``publish(entries)`` appends to one FIFO buffer
    and returns; ONE writer loop drains everything pending (up to ``max_batch``) into one
    Redis call per round, coalescing entries across tasks. One writer + FIFO ⇒ per-task order.

    Atomicity: each round is ONE call of a Lua script (``EVALSHA``; redis-py reloads it on
    ``NOSCRIPT`` after a restart) that XADDs the batch's entries in order. A script runs
    atomically and Redis runs a command only once it has arrived whole, so a connection drop
    mid-batch applies all of it or none, like MULTI/EXEC. We use a script rather than a
    MULTI/EXEC pipeline because (1) it makes retries exactly-once without an extra round
    trip: the script keeps this writer's high-water mark
    (``bella-ray-worker:evbatch:<publisher uuid>`` = the sequence number of the last entry
    applied, TTL ``idempotency_ttl_s``, one key per writer) and skips entries at or below
    it, so re-sending a batch whose reply was lost never duplicates events; (2) redis-py
    reads one reply per batch instead of a QUEUED reply plus a result per entry: measured
    here ~1.5-2x cheaper on the client than a MULTI/EXEC pipeline, and faster than a plain
    pipeline (``bench/bench_publisher.py``). Bella-Queue itself runs Lua scripts on this
    Redis, so scripting is available. Per-entry outcomes: ``WRONGTYPE`` (the key is not a
    stream) rejects that entry only; any other error stops the script at that entry (earlier
    entries stay applied and are acknowledged; the rest is retried). The mark and the
    entries live and die together, so a Redis restart that loses entries also loses the mark
    and the batch is re-sent. With ``idempotency_ttl_s=0`` no mark is kept (at-least-once: a
    batch whose reply was lost may be duplicated).

    Trimming: every XADD carries ``MINID ~ now-30min`` (``event_minid()``), ``now`` on
    Bella-Queue's clock (``clock_ms``: the caller passes the server's clock; the server trims
    and reads by its own clock, so a skewed local one must not cut live entries). The Java SDK
    trims exactly; we trim approximately (``approximate_trim=True``): Redis then frees whole
    radix-tree nodes only, which is cheaper per XADD and bounds the work of one write. The
    stream may keep up to one node (100 entries by default) older than 30 min; nobody reads
    them: the server reads from "now" and trims consumed entries itself (§4.3).

    Outages: on a Redis error the writer backs off (exponential, jittered) and retries the
    same entries in order; the buffer keeps filling up to ``max_buffered`` entries and
    ``max_buffered_bytes`` characters (keys, field names and values, as ``max_batch_bytes``
    counts them), then ``publish`` waits (backpressure, never drops at enqueue; FIFO among
    waiting callers). An entry larger than the whole byte bound is still taken, alone, once
    the buffer is empty, so nothing wedges. Once Redis has been failing
    continuously for ``outage_timeout_s``, entries older than ``outage_timeout_s`` are given
    up from the front of the buffer: progress entries are counted (``dropped_progress``) and
    logged as a summary; every completion entry is logged at ERROR with its task id and
    counted (``dropped_completions``). A per-entry rejection inside an applied batch
    (e.g. ``WRONGTYPE``) is handled the same way. If the writer loop itself dies (a bug),
    ``publish``/``flush`` raise ``EventBusUnavailableError``, ``healthy()`` is False and
    ``on_dead`` is called (the actor exits, so a fresh one is made by name).

    Answers owed after an outage: a task given up whole because of an outage still has a
    producer waiting (until its own deadline). The writer remembers each such task (bounded,
    for ``ONLINE_MAX_WAIT_S``, the longest an online producer waits: past that the server has
    answered it 408 itself, and only online tasks use the event bus) with its
    stream key and the eventId after the last progress event it saw of it, and once Redis
    answers again it writes it an error chunk (that eventId) and a 503 completion
    (``code: events_lost``); the task's own later events, its completion included, stay
    dropped. An answer the server no longer waits for is dropped there (§4.4), so a late one
    is harmless. A Redis that comes back empty (restarted without persistence) loses the
    idempotency mark with the entries: everything still buffered is written again.

    Written mark (``written_upto``): each buffered entry has a sequence number (``publish``
    returns the last one it buffered); ``written_upto()`` is the highest number N such that
    Redis acknowledged every entry up to N. An entry that was not written (given up in an
    outage or at close, rejected by Redis) stops the mark below it for the rest of this
    writer's life: whoever reads the mark (``publisher_actor.RedisPublisher``, to tell a
    client which of its batches are safe in Redis) must never take a given-up event for a
    written one, and a task given up whole may still be owed its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError, RedisError, ResponseError

from ray_worker.aio import Backoff
from ray_worker.bella.protocol import (
    COMPLETION_EVENT,
    ONLINE_MAX_WAIT_S,
    event_minid,
    now_ms,
    redact_url,
)
from ray_worker.config import PublisherOptions
from ray_worker.errors import EventBusUnavailableError
from ray_worker.eventbus.shared import BareEntry, Entry, describe, lost_events_answer

logger = logging.getLogger(__name__)

__all__ = [
    "MARKER_PREFIX",
    "StreamWriter",
    "StreamWriterStats",
]


MARKER_PREFIX = "bella-ray-worker:evbatch:"
"""Prefix of each writer's idempotency marker key (see the module docstring)."""

_FAILURES = (RedisError, OSError)

_GIVEN_UP_MAX = 100_000
"""Tasks remembered as given up (their later events are dropped)."""
_FATES_MAX = 65_536
"""Completion outcomes remembered for ``delivery`` (a caller asks right after handing over)."""
_OWED_MAX = 65_536
"""Tasks given up in an outage still owed an error answer once Redis is back."""
_OWED_FOR_S = float(ONLINE_MAX_WAIT_S)
"""How long such a task is owed one: the event bus serves online tasks only, whose producers
wait at most this long; past it the server has answered the task 408 itself."""
_UNENCODABLE = (UnicodeError, DataError)
"""What redis-py's encoder raises for a value it cannot encode: that entry's fault, not
Redis's (``DataError`` is a ``RedisError``, so it is caught before ``_FAILURES``)."""

# KEYS[1] = high-water mark key, KEYS[2..] = stream key of each entry, in order.
# ARGV[1] = seq of the first entry (seqs are consecutive), ARGV[2] = MINID, ARGV[3] = "~" or
# "=", ARGV[4] = mark TTL in s (0: no mark); then per entry: field count, field/value pairs.
# Returns {last seq handled, stop error or "", rejected seq, its error, ...}.
_XADD_BATCH_LUA = """
local first = tonumber(ARGV[1])
local ttl = tonumber(ARGV[4])
local done = 0
if ttl > 0 then
  done = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
end
local pos = 5
local last = first - 1
local stop = ''
local out = {}
for k = 2, #KEYS do
  local seq = first + k - 2
  local nf = tonumber(ARGV[pos])
  if seq > done and nf > 0 then
    local args = {KEYS[k], 'MINID', ARGV[3], ARGV[2], '*'}
    for j = pos + 1, pos + 2 * nf do
      args[#args + 1] = ARGV[j]
    end
    local r = redis.pcall('XADD', unpack(args))
    if type(r) == 'table' and r.err then
      if string.sub(r.err, 1, 9) == 'WRONGTYPE' then
        out[#out + 1] = seq
        out[#out + 1] = r.err
      else
        stop = r.err
        break
      end
    end
  end
  last = seq
  pos = pos + 1 + 2 * nf
end
if ttl > 0 and last > done then
  redis.call('SET', KEYS[1], string.format('%d', last), 'EX', ttl)
end
table.insert(out, 1, stop)
table.insert(out, 1, last)
return out
"""


@dataclass
class StreamWriterStats:
    """Counters of a ``StreamWriter``; read them through ``StreamWriter.stats()``."""

    published: int = 0
    batches: int = 0
    retries: int = 0
    reconnects: int = 0
    dropped_progress: int = 0
    dropped_completions: int = 0
    dropped_tasks: int = 0
    """Tasks whose events were given up (each whole: none of its later events is written)."""
    rejected: int = 0
    owed_answers_sent: int = 0
    """Error answers written, once Redis was back, to tasks given up in an outage."""
    buffered: int = 0
    buffered_bytes: int = 0
    """Characters (keys, field names and values) of the entries buffered."""
    last_error: str | None = None


class _LatencyWindow:
    """Enqueue → acknowledged latency: all-time count/mean/max, percentiles over recent ones."""

    def __init__(self, size: int) -> None:
        self._recent: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)
        self.count += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self._recent)

        def pct(q: float) -> float:
            if not ordered:
                return 0.0
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

        return {
            "count": self.count,
            "mean_ms": (self.total_s / self.count * 1000) if self.count else 0.0,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": self.max_s * 1000,
        }


class _Pending:
    __slots__ = ("enqueued_at", "event_id", "fields", "key", "owed", "seq", "size", "task_id")

    def __init__(
        self,
        seq: int,
        key: str,
        fields: Mapping[str, str],
        task_id: str,
        event_id: str,
        enqueued_at: float,
        owed: bool = False,
    ) -> None:
        self.seq = seq
        self.key = key
        self.fields = fields
        self.task_id = task_id
        """Its task ("": none; see ``BareEntry``)."""
        self.event_id = event_id
        """A progress event's ``eventId`` ("" for a completion)."""
        self.enqueued_at = enqueued_at
        self.owed = owed
        """An error answer the writer wrote itself: no caller waits for its fate."""
        self.size = _entry_size(key, fields)
        """Characters of the key, names and values (a round's and the buffer's byte bounds
        count them); 0 once given up in place."""


def _entry_size(key: str, fields: Mapping[str, str]) -> int:
    return len(key) + sum(len(k) + len(v) for k, v in fields.items())


class _Owed:
    """A task given up in an outage: where its answer goes, and its next eventId."""

    __slots__ = ("key", "next_event_id", "since")

    def __init__(self, key: str, since: float) -> None:
        self.key = key
        self.next_event_id = 0
        self.since = since

    def saw(self, event_id: str) -> None:
        """An event of it was given up: its answer's ``eventId`` comes after a numeric one."""
        if event_id.isdigit() and int(event_id) >= self.next_event_id:
            self.next_event_id = int(event_id) + 1


def _is_completion(fields: Mapping[str, str]) -> bool:
    return fields.get("name") == COMPLETION_EVENT


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _escaped(text: str, encoding: str) -> str:
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def _checked(entry: Entry | BareEntry) -> Entry:
    """``entry`` as a four-item ``Entry`` (a ``BareEntry`` is of no task); ``TypeError`` for a
    malformed one."""
    if len(entry) == 2:
        key, fields = entry
        task_id = event_id = ""
    elif len(entry) == 4:
        key, fields, task_id, event_id = entry
    else:
        raise TypeError("an entry must be (stream_key, fields, task_id, event_id)")
    if not isinstance(key, str) or not isinstance(fields, Mapping):
        raise TypeError("an entry must be (stream_key: str, fields: Mapping[str, str], ...)")
    if not isinstance(task_id, str) or not isinstance(event_id, str):
        raise TypeError("an entry's task_id and event_id must be str")
    for name, value in fields.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"stream field {name!r} must be str -> str, got {type(value)}")
    return key, cast("dict[str, str]", fields), task_id, event_id


class StreamWriter:
    """Single-writer, pipelined, outage-tolerant XADD of encoded events (see module doc).

    Safe to construct outside an event loop; the writer starts on first ``publish``.
    """

    def __init__(
        self,
        url: str,
        options: PublisherOptions | None = None,
        *,
        client: Redis | None = None,
        on_acked: Callable[[float], None] | None = None,
        on_dead: Callable[[BaseException], None] | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.options = options or PublisherOptions()
        self.url = url
        # Called once per acknowledged round with its oldest entry's enqueue → ack seconds.
        self._on_acked = on_acked
        # Called once if the writer loop dies (a bug): the owner should go away.
        self._on_dead = on_dead
        # Epoch ms on Bella-Queue's clock, for MINID.
        self._clock_ms = clock_ms or now_ms
        opts = self.options
        self._redis: Redis = client or Redis.from_url(
            url,
            socket_timeout=opts.socket_timeout_s,
            socket_connect_timeout=opts.connect_timeout_s,
            socket_keepalive=True,
            health_check_interval=opts.health_check_interval_s,
            # One retry policy, ours: it keeps the outage clock, the counters and the
            # backoff honest. redis-py retrying inside a round would hide failures.
            retry=Retry(NoBackoff(), 0),
            client_name="bella-ray-worker-publisher",
            # RESP2: what every Redis speaks, and redis-py parses it measurably faster.
            protocol=2,
            # A lone surrogate (e.g. a task's text echoed into an error message) goes out as
            # the six characters \udXXX instead of killing the writer: inside a JSON string,
            # where dumps() puts every text, that is the JSON escape of the same character.
            encoding_errors="backslashreplace",
        )
        self._queue: deque[_Pending] = deque()
        self._given_up: OrderedDict[str, None] = OrderedDict()
        """Tasks given up: their later events are dropped too, until their completion."""
        self._owed: OrderedDict[str, _Owed] = OrderedDict()
        """Tasks given up in an outage, owed an error answer once Redis is back."""
        self._fates: OrderedDict[str, bool] = OrderedDict()
        """Completion events settled: True once Redis acknowledged, False once given up."""
        self._fate_waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._seq = 0
        self._bytes = 0
        """Sizes of the entries in ``_queue`` (``_Pending.size``)."""
        self._hole: int | None = None
        """The lowest sequence number of an entry that was not written (``written_upto``)."""
        self._progress = asyncio.Event()
        self._wake = asyncio.Event()
        self._enqueue_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self._closed = False
        self._down_since: float | None = None
        self._last_down_log = 0.0
        self._marker_key = MARKER_PREFIX + uuid.uuid4().hex
        self._script = self._redis.register_script(_XADD_BATCH_LUA)
        self._stats = StreamWriterStats()
        self._latency = _LatencyWindow(opts.latency_window)

    # ---------------------------------------------------------------- public API

    async def publish(self, entries: Sequence[Entry | BareEntry]) -> int:
        """Append ``entries`` in order; wait while the buffer is full (``max_buffered``
        entries or ``max_buffered_bytes``). Returns once buffered: the sequence number of the
        last entry buffered so far (see ``written_upto``). A ``BareEntry`` is of no task:
        written like any other, given up alone, never answered for, its fate not kept.

        Raises ``EventBusUnavailableError`` if the writer loop died or the publisher is
        closed, ``TypeError`` for a malformed entry (nothing of that call is enqueued).
        """
        self._check_usable()
        checked = [_checked(e) for e in entries]
        if self._given_up:
            checked = [e for e in checked if not self._drop_if_given_up(e)]
        self._ensure_writer()
        queue = self._queue
        limit = self.options.max_buffered
        byte_limit = self.options.max_buffered_bytes
        now = time.monotonic()
        sizes = [_entry_size(e[0], e[1]) for e in checked]
        if (
            not self._enqueue_lock.locked()
            and len(queue) + len(checked) <= limit
            and (self._bytes + sum(sizes) <= byte_limit or (not queue and len(checked) == 1))
        ):
            for entry in checked:
                self._append(entry, now)
            if checked:
                self._wake.set()
            return self._seq
        # Slow path: FIFO among waiting publishers (asyncio.Lock is fair).
        async with self._enqueue_lock:
            for entry, size in zip(checked, sizes, strict=True):
                # An entry larger than the whole byte bound goes in alone (nothing wedges).
                while len(queue) >= limit or (queue and self._bytes + size > byte_limit):
                    await self._progress.wait()
                    self._check_usable()
                self._append(entry, time.monotonic())
                self._wake.set()
            return self._seq

    @property
    def lost_writes(self) -> bool:
        """True once an entry was not written: ``written_upto`` will not pass it."""
        return self._hole is not None

    def written_upto(self) -> int:
        """The highest entry sequence number N such that Redis acknowledged every entry up to
        N (``publish`` returns the numbers). An entry not written (given up, rejected) stops
        it below that entry for good (see the module docstring)."""
        done = self._done_upto()
        return done if self._hole is None else min(done, self._hole - 1)

    async def delivery(self, task_ids: Sequence[str], timeout_s: float) -> dict[str, bool]:
        """Wait up to ``timeout_s`` for the completion events of ``task_ids`` to settle.

        Returns the settled ones: True once Redis acknowledged the completion, False once it
        was given up (outage, rejection, closed). A task missing from the answer is still
        buffered (ask again). Each outcome is answered once; it is then forgotten.
        """
        settled = {t: self._fates.pop(t) for t in task_ids if t in self._fates}
        waiting = [t for t in task_ids if t not in settled]
        if waiting and not settled and timeout_s > 0:
            loop = asyncio.get_running_loop()
            futures = []
            for task_id in waiting:
                future: asyncio.Future[bool] = loop.create_future()
                self._fate_waiters.setdefault(task_id, []).append(future)
                futures.append(future)
            try:
                await asyncio.wait(futures, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task_id, future in zip(waiting, futures, strict=True):
                    waiters = self._fate_waiters.get(task_id, [])
                    if future in waiters:
                        waiters.remove(future)
                        if not waiters:
                            del self._fate_waiters[task_id]
            settled = {t: self._fates.pop(t) for t in task_ids if t in self._fates}
        return settled

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything enqueued so far is acknowledged or given up.

        Returns False if ``timeout_s`` passed first. Raises ``EventBusUnavailableError`` if
        the writer loop died with entries still pending.
        """
        target = self._seq
        try:
            async with asyncio.timeout(timeout_s):
                while self._done_upto() < target:
                    if self._failure is not None:
                        self._check_usable()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, drain within ``drain_timeout_s``, give up the rest, close Redis."""
        if self._closed:
            return
        self._closing = True
        drained = True
        if self._writer is not None and self._failure is None and self._queue:
            try:
                drained = await self.flush(drain_timeout_s)
            except EventBusUnavailableError:
                drained = False
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._queue:
            logger.error(
                "event-bus publisher closing with %d undelivered entries (drained=%s)",
                len(self._queue),
                drained,
            )
            self._give_up(len(self._queue), "publisher closed before delivery")
        self._closed = True
        await self._redis.aclose()
        self._notify()

    def healthy(self) -> bool:
        """False once the writer loop has died or the publisher is closed."""
        return self._failure is None and not self._closed

    def check_health(self) -> None:
        """Raise ``EventBusUnavailableError`` if the writer loop died."""
        if self._failure is not None:
            raise EventBusUnavailableError(
                f"event-bus writer loop died: {describe(self._failure)}"
            ) from self._failure

    def stats(self) -> dict[str, Any]:
        """Counters plus the publish latency summary, as a plain dict."""
        self._stats.buffered = len(self._queue)
        self._stats.buffered_bytes = self._bytes
        out = asdict(self._stats)
        out["healthy"] = self.healthy()
        out["latency"] = self._latency.summary()
        return out

    @property
    def counters(self) -> StreamWriterStats:
        """The live counters object (``buffered`` and ``buffered_bytes`` refreshed)."""
        self._stats.buffered = len(self._queue)
        self._stats.buffered_bytes = self._bytes
        return self._stats

    # ---------------------------------------------------------------- internals

    def _append(self, entry: Entry, now: float, owed: bool = False) -> None:
        self._seq += 1
        key, fields, task_id, event_id = entry
        pending = _Pending(self._seq, key, fields, task_id, event_id, now, owed=owed)
        self._queue.append(pending)
        self._bytes += pending.size

    def _popleft(self) -> _Pending:
        entry = self._queue.popleft()
        self._bytes -= entry.size
        return entry

    def _not_written(self, entry: _Pending) -> None:
        """``entry`` will never be in Redis: the written mark stays below it for good."""
        if self._hole is None or entry.seq < self._hole:
            self._hole = entry.seq

    def _check_usable(self) -> None:
        self.check_health()
        if self._closing or self._closed:
            raise EventBusUnavailableError("event-bus publisher is closed")

    def _ensure_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._run(), name="event-bus-writer"
            )
            self._writer.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failure = exc
            self._stats.last_error = describe(exc)
            logger.error("event-bus writer loop died", exc_info=exc)
            if self._on_dead is not None:
                try:
                    self._on_dead(exc)
                except Exception:
                    logger.exception("event-bus writer on_dead callback failed")
        self._notify()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _done_upto(self) -> int:
        return self._queue[0].seq - 1 if self._queue else self._seq

    async def _run(self) -> None:
        opts = self.options
        backoff = Backoff(opts.backoff_initial_s, opts.backoff_max_s)
        while True:
            if not self._queue:
                self._wake.clear()
                if not self._owed or self._down_since is None:
                    await self._wake.wait()
                    continue
                # Nothing to write, but answers are owed once Redis is back: probe it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff.next_s())
                if self._queue:
                    continue
                try:
                    await self._redis.ping()
                except _FAILURES as exc:
                    self._on_failure(exc)
                else:
                    backoff.reset()
                    self._back_up()
                continue
            try:
                await self._write_round()
            except _UNENCODABLE as exc:
                if not self._escape_unencodable(exc):
                    raise
            except _FAILURES as exc:
                self._on_failure(exc)
                await backoff.sleep()
            else:
                backoff.reset()
                self._back_up()

    def _back_up(self) -> None:
        """A round (or probe) succeeded: end the outage, if any, and send what is owed."""
        if self._down_since is None:
            return
        self._stats.reconnects += 1
        logger.warning(
            "event-bus Redis back after %.1f s; %d entries buffered",
            time.monotonic() - self._down_since,
            len(self._queue),
        )
        self._down_since = None
        self._answer_owed()

    def _next_round(self) -> list[_Pending]:
        """The entries of the next round: at most ``max_batch`` of them and
        ``max_batch_bytes`` of keys and fields (always at least one)."""
        opts = self.options
        batch: list[_Pending] = []
        size = 0
        for entry in itertools.islice(self._queue, opts.max_batch):
            size += entry.size
            if batch and size > opts.max_batch_bytes:
                break
            batch.append(entry)
        return batch

    async def _write_round(self) -> None:
        opts = self.options
        batch = self._next_round()
        keys: list[str] = [self._marker_key]
        args: list[str | int] = [
            batch[0].seq,
            event_minid(self._clock_ms()),
            "~" if opts.approximate_trim else "=",
            opts.idempotency_ttl_s,
        ]
        for entry in batch:
            keys.append(entry.key)
            args.append(len(entry.fields))
            for pair in entry.fields.items():
                args.extend(pair)
        reply = cast("list[Any]", await self._script(keys=keys, args=args))
        self._stats.batches += 1
        last_seq, stop = int(reply[0]), reply[1]
        rejected = {
            int(reply[i]): ResponseError(_text(reply[i + 1])) for i in range(2, len(reply), 2)
        }
        self._ack(last_seq, rejected)
        if stop:
            # Redis refused an entry for a reason that may pass (OOM, READONLY, ...): the
            # entries before it are applied and acknowledged, the rest is retried.
            raise ResponseError(_text(stop))

    def _escape_unencodable(self, exc: Exception) -> bool:
        """Rewrite the next round's entries the client's encoder refuses (an injected client
        with strict encoding errors) as their backslash-escaped text; True if any was.

        Rewritten rather than dropped: the Lua script needs consecutive sequence numbers, and
        the escaped text is still the same event (see ``encoding_errors`` above).
        """
        encoder = self._redis.get_encoder()  # type: ignore[no-untyped-call]
        escaped = 0
        for entry in itertools.islice(self._queue, self.options.max_batch):
            try:
                encoder.encode(entry.key)
                for name, value in entry.fields.items():
                    encoder.encode(name)
                    encoder.encode(value)
            except _UNENCODABLE:
                escaped += 1
                entry.key = _escaped(entry.key, encoder.encoding)
                entry.fields = {
                    _escaped(k, encoder.encoding): _escaped(v, encoder.encoding)
                    for k, v in entry.fields.items()
                }
                size = _entry_size(entry.key, entry.fields)
                self._bytes += size - entry.size
                entry.size = size
        if escaped:
            self._stats.last_error = describe(exc)
            logger.warning("escaped %d event(s) Redis could not encode: %s", escaped, exc)
        return escaped > 0

    def _ack(self, last_seq: int, rejected: Mapping[int, Exception]) -> None:
        now = time.monotonic()
        queue = self._queue
        latency = self._latency
        published = 0
        oldest = 0.0
        while queue and queue[0].seq <= last_seq:
            entry = self._popleft()
            if not entry.fields:
                continue  # given up in place (counted then); the script skipped it
            error = rejected.get(entry.seq) if rejected else None
            if error is None:
                if not published:
                    oldest = now - entry.enqueued_at
                published += 1
                latency.add(now - entry.enqueued_at)
                if not entry.owed and entry.task_id and _is_completion(entry.fields):
                    self._settle(entry.task_id, True)
            else:
                self._not_written(entry)
                self._stats.rejected += 1
                self._stats.last_error = describe(error)
                self._count_dropped(entry, f"rejected by Redis: {describe(error)}")
        self._stats.published += published
        if published and self._on_acked is not None:
            self._on_acked(oldest)
        self._notify()

    def _on_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._stats.retries += 1
        self._stats.last_error = describe(exc)
        if self._down_since is None:
            self._down_since = now
            self._last_down_log = now
            logger.warning(
                "event-bus Redis %s unavailable, buffering %d entries: %s",
                redact_url(self.url),
                len(self._queue),
                describe(exc),
            )
        elif now - self._last_down_log >= 10.0:
            self._last_down_log = now
            logger.warning(
                "event-bus Redis still unavailable after %.1f s, %d entries buffered: %s",
                now - self._down_since,
                len(self._queue),
                describe(exc),
            )
        outage_s = self.options.outage_timeout_s
        if now - self._down_since < outage_s:
            return
        cutoff = now - outage_s
        count = 0
        for entry in self._queue:
            if entry.enqueued_at > cutoff:
                break
            count += 1
        if count:
            self._give_up(count, f"Redis unavailable for {now - self._down_since:.1f} s", owe=True)

    def _give_up(self, count: int, reason: str, *, owe: bool = False) -> None:
        """Drop the ``count`` oldest entries, and every task they belong to whole.

        A task whose event is dropped loses the rest of its events too (those buffered and
        those still to come, until its completion): a stream with a gap must not end as a
        success. Each kind is logged and counted, and so is each task given up. With
        ``owe`` (an outage) each task is remembered for an error answer once Redis is back.
        """
        progress = 0
        tasks: set[str] = set()
        finished: set[str] = set()
        now = time.monotonic()

        def drop(entry: _Pending) -> None:
            nonlocal progress
            task_id = entry.task_id
            if owe and task_id:
                owed = self._owed.get(task_id)
                if owed is None:
                    owed = self._owed[task_id] = _Owed(entry.key, now)
                owed.saw(entry.event_id)
            if _is_completion(entry.fields):
                finished.add(task_id)
                self._count_dropped(entry, reason)
            else:
                progress += 1

        for _ in range(count):
            entry = self._popleft()
            if not entry.fields:
                continue  # given up in place earlier, already counted
            self._not_written(entry)
            if entry.task_id:  # an entry of no task goes alone
                tasks.add(entry.task_id)
            drop(entry)
        for entry in self._queue:
            if entry.fields and entry.task_id in tasks:
                self._not_written(entry)
                drop(entry)
                # Given up in place (no fields): the script skips it, seqs stay consecutive.
                entry.fields = {}
                self._bytes -= entry.size
                entry.size = 0
        for task_id in tasks - finished:
            self._given_up[task_id] = None
            self._given_up.move_to_end(task_id)
        while len(self._given_up) > _GIVEN_UP_MAX:
            self._given_up.popitem(last=False)
        while len(self._owed) > _OWED_MAX:
            self._owed.popitem(last=False)
        self._stats.dropped_tasks += len(tasks)
        if progress:
            self._stats.dropped_progress += progress
        logger.warning(
            "gave up %d tasks whole (%d progress events): %s", len(tasks), progress, reason
        )
        self._notify()

    def _drop_if_given_up(self, entry: Entry) -> bool:
        """True (and counted) when ``entry`` is an event of a task given up whole."""
        key, fields, task_id, event_id = entry
        if task_id not in self._given_up:
            return False
        owed = self._owed.get(task_id)
        if owed is not None:
            owed.saw(event_id)
        if _is_completion(fields):
            del self._given_up[task_id]
        dropped = _Pending(0, key, fields, task_id, event_id, 0.0)
        self._count_dropped(dropped, "its task was given up after an outage")
        return True

    def _answer_owed(self) -> None:
        """Redis answers again: queue an error chunk and a 503 completion for each task given
        up in the outage that may still be waiting (see the module docstring)."""
        if not self._owed:
            return
        owed, self._owed = self._owed, OrderedDict()
        now = time.monotonic()
        sent = 0
        for task_id, task in owed.items():
            if now - task.since > _OWED_FOR_S:
                continue
            for entry in lost_events_answer(
                task.key,
                task_id,
                task.next_event_id,
                "the worker's event bus was unavailable; this task's events were lost",
            ):
                self._append(entry, now, owed=True)
            sent += 1
        if sent:
            self._stats.owed_answers_sent += sent
            logger.warning(
                "event-bus Redis is back: answering %d tasks given up in the outage with 503",
                sent,
            )
            self._wake.set()

    def _settle(self, task_id: str, delivered: bool) -> None:
        """Record a completion's fate for ``delivery`` and wake whoever waits for it."""
        fates = self._fates
        fates[task_id] = delivered
        fates.move_to_end(task_id)
        while len(fates) > _FATES_MAX:
            fates.popitem(last=False)
        for future in self._fate_waiters.pop(task_id, ()):
            if not future.done():
                future.set_result(delivered)

    def _count_dropped(self, entry: _Pending, reason: str) -> None:
        task_id = entry.task_id or "?"
        if _is_completion(entry.fields):
            self._stats.dropped_completions += 1
            if entry.task_id:
                self._settle(entry.task_id, False)
            logger.error(
                "completion event of task %s NOT delivered to stream %s: %s",
                task_id,
                entry.key,
                reason,
                extra={"task_id": task_id},
            )
        else:
            self._stats.dropped_progress += 1
            logger.warning(
                "progress event of task %s not delivered to stream %s: %s",
                task_id,
                entry.key,
                reason,
            )
