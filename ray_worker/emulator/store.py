"""The Bella-Queue emulator's queue logic over a real Redis (spec §1-§3, §2.5, §8, §9.2).

This module owns what Bella-Queue keeps in Redis and in its MySQL database, reproduced in
Redis alone: registered queues, one ZSET per ``<queue>:<level>`` scored by ``start_time`` with
the task JSON at ``<queue>:<level>:metadata:<task_id>``, the offline "database" (one hash per
offline task with the statuses waiting → queued → succeeded/cancelled), the four take
strategies, conditional completion, cancellation, per-queue counters and the timer-based
redelivery of ``process_timeout``/``process_max_retries``.

It must not speak HTTP, send callbacks or touch batch files: a completion is handed to the
``on_completed`` hook, and errors are raised as :class:`ApiError` for the HTTP layer to render.
It never logs a task's ``ak``.

Key layout (the first three are the real server's names, the rest are emulator-private):

- ``<q>:<level>`` ZSET (score ``start_time``), ``<q>:<level>:metadata:<id>`` task JSON
- ``sequential:running:<q>:<level>`` the sequential lock, ``bella-batch:cancel:<batch>`` flag
- ``bella-emu:queues`` / ``bella-emu:queue-ids`` registrations, ``bella-emu:task:<id>`` the
  offline row, ``bella-emu:unloaded:<q>:1`` tasks not yet loaded (lazy mode),
  ``bella-emu:stats:<q>:<level>`` counters, ``bella-emu:redelivery`` due timers,
  ``bella-emu:retry:<id>`` / ``bella-emu:max-retry:<id>`` redelivery bookkeeping.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from ray_worker.bella.protocol import (
    FIFO_TAKE_CAP,
    SEQUENTIAL_LOCK_TTL_S,
    Level,
    PutRequest,
    ResponseMode,
    TakeStrategy,
    Task,
    dumps,
    full_queue_name,
    make_task_id,
    now_ms,
    validate_queue_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ONLINE_QUEUE_CAPACITY",
    "ApiError",
    "CompletedTask",
    "QueueMeta",
    "QueueStore",
    "TakeParams",
    "batch_cancel_key",
    "parse_task_id",
    "sequential_lock_key",
    "text",
    "text_map",
    "texts",
]

PREFIX = "bella-emu:"
ONLINE_QUEUE_CAPACITY = 10000
"""A put to an online queue holding more than this many tasks fails with 500 (§1.3)."""
ONLINE_METADATA_TTL_S = 24 * 3600
OFFLINE_METADATA_TTL_S = 7 * 24 * 3600
LAZY_LOAD_BATCH = 100
ILLEGAL_DATA = "非法的数据"


class ApiError(Exception):
    """An error the HTTP layer renders as ``{"code","message","timestamp"}`` (§1.0).

    ``status`` 400 mirrors the server's ``IllegalArgumentException`` family; 500 mirrors
    everything else (and carries a stack trace on the wire).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ApiError:
    """A 400 error."""
    return ApiError(400, message)


def server_error(message: str) -> ApiError:
    """A 500 error."""
    return ApiError(500, message)


def sequential_lock_key(full_queue: str) -> str:
    """The real server's sequential lock key (§3)."""
    return f"sequential:running:{full_queue}"


def batch_cancel_key(batch_id: str) -> str:
    """The real server's batch cancellation flag (§7)."""
    return f"bella-batch:cancel:{batch_id}"


def text(value: object) -> str:
    """A Redis reply item as ``str`` (the clients decode, but the types do not say so)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def texts(values: Iterable[Any]) -> list[str]:
    """A Redis list reply as ``list[str]``."""
    return [text(v) for v in values]


def text_map(values: Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash reply as ``dict[str, str]``."""
    return {text(k): text(v) for k, v in values.items()}


def _metadata_key(full_queue: str, task_id: str) -> str:
    return f"{full_queue}:metadata:{task_id}"


def _task_key(task_id: str) -> str:
    return f"{PREFIX}task:{task_id}"


def _stats_key(full_queue: str) -> str:
    return f"{PREFIX}stats:{full_queue}"


def _unloaded_key(full_queue: str) -> str:
    return f"{PREFIX}unloaded:{full_queue}"


_QUEUES = f"{PREFIX}queues"
_QUEUE_IDS = f"{PREFIX}queue-ids"
_QUEUE_SEQ = f"{PREFIX}seq:queue"
_SERIAL_SEQ = f"{PREFIX}seq:serial"
_REDELIVERY = f"{PREFIX}redelivery"


def _retry_key(task_id: str) -> str:
    return f"{PREFIX}retry:{task_id}"


def _max_retry_key(task_id: str) -> str:
    return f"{PREFIX}max-retry:{task_id}"


def parse_task_id(task_id: str) -> tuple[int, Level]:
    """Read the queue id and level out of a task id as the server does (§2.2, §1.5).

    Too few ``-`` segments → 500 (the server's array index error); a non-numeric queue id or
    level, or a level other than 0/1 → 400 (its ``NumberFormatException``/unknown level).
    """
    parts = task_id.split("-")
    if len(parts) < 4:
        raise server_error(f"Index {len(parts)} out of bounds for task id {task_id!r}")
    try:
        queue_id = int(parts[1])
        level = int(parts[2])
    except ValueError:
        raise bad_request(f"For input string: {task_id!r}") from None
    if level not in (0, 1):
        raise bad_request(f"Unknown queue level: {level}")
    return queue_id, Level(level)


@dataclass(frozen=True)
class QueueMeta:
    """A registered queue: its numeric id (used in task ids), name and endpoint."""

    id: int
    queue: str
    endpoint: str


@dataclass(frozen=True)
class TakeParams:
    """A validated take request (§1.4)."""

    queues: list[str]
    strategy: TakeStrategy
    size: int
    process_timeout_s: int = 0
    process_max_retries: int = 0
    min_age_s: int = 0


@dataclass(frozen=True)
class CompletedTask:
    """A completion that took effect; the hook fires its callback and batch output."""

    task_id: str
    queue: str
    level: int
    response_mode: str
    callback_url: str
    batch_id: str
    custom_id: str
    result: dict[str, Any]


CompletionHook = Callable[[CompletedTask], Awaitable[None]]

# --------------------------------------------------------------------------------------
# Lua: each take step is atomic, like the server's scripts (§3)
# --------------------------------------------------------------------------------------

# KEYS[1] zset; ARGV[1] max score (now - min_age), ARGV[2] count, ARGV[3] "1" keeps the
# metadata of callback-mode tasks (online/dequeue.lua). Returns [id, meta, id, meta, ...].
_POP_LUA = """
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local mkey = KEYS[1] .. ':metadata:' .. id
  local meta = redis.call('GET', mkey)
  local keep = false
  if meta and ARGV[3] == '1' then
    local ok, decoded = pcall(cjson.decode, meta)
    keep = ok and type(decoded) == 'table' and decoded['response_mode'] == 'callback'
  end
  if not keep then redis.call('DEL', mkey) end
  table.insert(out, id)
  table.insert(out, meta or '')
end
return out
"""

# KEYS: zsets; ARGV[1] max score, ARGV[2] count. Globally oldest first (fifo.lua).
# Returns [key, id, meta, ...].
_FIFO_LUA = """
local out = {}
for _ = 1, tonumber(ARGV[2]) do
  local best, best_score, best_key = nil, nil, nil
  for _, key in ipairs(KEYS) do
    local head = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, 1)
    if #head > 0 and (best_score == nil or tonumber(head[2]) < best_score) then
      best, best_score, best_key = head[1], tonumber(head[2]), key
    end
  end
  if best == nil then break end
  redis.call('ZREM', best_key, best)
  local mkey = best_key .. ':metadata:' .. best
  local meta = redis.call('GET', mkey)
  redis.call('DEL', mkey)
  table.insert(out, best_key)
  table.insert(out, best)
  table.insert(out, meta or '')
end
return out
"""

# KEYS[1] zset, KEYS[2] lock; ARGV[1] max score, ARGV[2] lock ttl (sequential.lua).
_SEQUENTIAL_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local head = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #head == 0 then return {} end
local id = head[1]
redis.call('ZREM', KEYS[1], id)
local mkey = KEYS[1] .. ':metadata:' .. id
local meta = redis.call('GET', mkey)
redis.call('DEL', mkey)
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[2]))
return {id, meta or ''}
"""

# KEYS[1] task row; ARGV[1] now, ARGV[2] result JSON. UPDATE ... WHERE status='queued' AND
# expired_at >= now (QueueRepo#completeTask).
_COMPLETE_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local expire = tonumber(redis.call('HGET', KEYS[1], 'expire_time') or '0')
if expire > 0 and expire < tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'result', ARGV[2], 'completed_time', ARGV[1])
return 1
"""

# KEYS[1] task row: status waiting|queued → cancelled.
_CANCEL_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'waiting' or status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled')
  return 1
end
return 0
"""

# KEYS[1] lock; ARGV[1] task id: release only the holder's lock.
_RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1] task row; ARGV[1] lazy status to move from. waiting → queued, once.
_LOAD_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'waiting' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued')
return 1
"""


class QueueStore:
    """Bella-Queue's queue state in Redis; one per emulator, safe to share a Redis."""

    def now_ms(self) -> int:
        """This server's clock: the machine's, moved by ``clock_offset_ms``."""
        return now_ms() + self.clock_offset_ms

    def __init__(
        self,
        redis: Redis,
        *,
        instance_id: str,
        lazy_offline_loading: bool = False,
        on_completed: CompletionHook | None = None,
        clock_offset_ms: int = 0,
    ) -> None:
        self._redis = redis
        self.clock_offset_ms = clock_offset_ms
        """This server's clock minus the machine's (clock-skew tests): its timestamps."""
        self.instance_id = instance_id
        self._instance_number = zlib.crc32(instance_id.encode()) % 10000
        self.lazy_offline_loading = lazy_offline_loading
        self.on_completed = on_completed
        self._pop = redis.register_script(_POP_LUA)
        self._fifo = redis.register_script(_FIFO_LUA)
        self._sequential = redis.register_script(_SEQUENTIAL_LUA)
        self._complete = redis.register_script(_COMPLETE_LUA)
        self._cancel = redis.register_script(_CANCEL_LUA)
        self._release_lock = redis.register_script(_RELEASE_LOCK_LUA)
        self._load = redis.register_script(_LOAD_LUA)

    # ---------------------------------------------------------------- queues (§1.1, §1.7)

    async def register(self, queue: str, endpoint: str) -> None:
        """Register a queue; a duplicate → 400 "非法的数据" (the unique index)."""
        try:
            validate_queue_name(queue)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        if not endpoint:
            raise bad_request("endpoint must not be empty")
        if await self._redis.hexists(_QUEUES, queue):
            raise bad_request(ILLEGAL_DATA)
        queue_id = int(await self._redis.incr(_QUEUE_SEQ))
        record = dumps(
            {"id": queue_id, "queue": queue, "endpoint": endpoint, "ctime": self.now_ms()}
        )
        if not await self._redis.hsetnx(_QUEUES, queue, record):
            raise bad_request(ILLEGAL_DATA)
        await self._redis.hset(_QUEUE_IDS, str(queue_id), queue)

    async def queue_meta(self, queue: str) -> QueueMeta | None:
        """The registration of ``queue`` (a base name), or None."""
        raw = await self._redis.hget(_QUEUES, queue)
        if raw is None:
            return None
        record = json.loads(raw)
        return QueueMeta(id=int(record["id"]), queue=record["queue"], endpoint=record["endpoint"])

    async def require_queue(self, queue: str) -> QueueMeta:
        """The registration of ``queue`` or a 500, as the server's NPE/cache loader gives."""
        meta = await self.queue_meta(queue)
        if meta is None:
            raise server_error(f"Queue not registered: {queue}")
        return meta

    async def _queue_name_by_id(self, queue_id: int) -> str | None:
        name = await self._redis.hget(_QUEUE_IDS, str(queue_id))
        return None if name is None else str(name)

    async def stats(self, full_queue: str) -> dict[str, Any] | None:
        """The ``queue_head`` counters plus the emulator-only ``pending`` backlog."""
        name, level = self._parse_full(full_queue)
        if await self.queue_meta(name) is None:
            return None
        full = full_queue_name(name, level)
        counters = text_map(await self._redis.hgetall(_stats_key(full)))
        pending = int(await self._redis.zcard(full))
        if level is Level.OFFLINE:
            pending += int(await self._redis.zcard(_unloaded_key(full)))
        return {
            "queue": full,
            "put_count": int(counters.get("put_count", 0)),
            "loaded_count": int(counters.get("loaded_count", 0)),
            "completed_count": int(counters.get("completed_count", 0)),
            "pending": pending,
        }

    @staticmethod
    def _parse_full(full_queue: str) -> tuple[str, Level]:
        parts = full_queue.split(":")
        if len(parts) != 2:
            raise bad_request(f"Illegal queue name: {full_queue}")
        try:
            level = int(parts[1])
        except ValueError:
            raise bad_request(f"For input string: {parts[1]!r}") from None
        if level not in (0, 1):
            raise bad_request(f"Unknown queue level: {level}")
        return parts[0], Level(level)

    # ---------------------------------------------------------------- put (§1.3, §2)

    async def _serials(self, count: int) -> range:
        last = int(await self._redis.incrby(_SERIAL_SEQ, count))
        return range(last - count + 1, last + 1)

    async def new_task(
        self,
        *,
        queue: QueueMeta,
        level: Level,
        mode: ResponseMode,
        ak: str,
        endpoint: str,
        data: dict[str, Any],
        lifetime_s: int | None = None,
        expire_time: int | None = None,
        trace_id: str | None = None,
        callback_url: str | None = None,
        batch_id: str | None = None,
        serial: int | None = None,
    ) -> Task:
        """Mint a task exactly as take will return it (§2.1, §2.2)."""
        now = self.now_ms()
        if serial is None:
            serial = (await self._serials(1))[0]
        task_id = make_task_id(queue.id, level, mode, now, self._instance_number, serial)
        online = level is Level.ONLINE
        # Offline start_time is a DB datetime: second granularity (§2.1).
        start = now if online else now - now % 1000
        if expire_time is None:
            expire_time = start + 1000 * (lifetime_s or 0)
        fields: dict[str, Any] = {
            "task_id": task_id,
            "ak": ak,
            "endpoint": endpoint,
            "queue": queue.queue,
            "level": int(level),
            "data": data,
            "start_time": start,
            "running_time": 0,
            "expire_time": expire_time,
            "completed_time": 0,
            "response_mode": mode,
        }
        if online:
            fields["instance_id"] = self.instance_id
            if trace_id is not None:
                fields["trace_id"] = trace_id
            if callback_url:
                fields["callback_url"] = callback_url
        else:
            fields["status"] = "waiting"
            fields["batch_id"] = batch_id or ""
            fields["trace_id"] = trace_id or ""
            fields["callback_url"] = callback_url or ""
        return Task.model_validate(fields)

    async def task_for_put(self, req: PutRequest, *, queue: QueueMeta, ak: str) -> Task:
        """The task a put creates, with the effective level and lifetime of ``req``."""
        return await self.new_task(
            queue=queue,
            level=req.effective_level,
            mode=req.effective_mode,
            ak=ak,
            endpoint=req.endpoint,
            data=req.data,
            lifetime_s=req.lifetime_s,
            trace_id=req.trace_id,
            callback_url=req.callback_url,
        )

    async def enqueue(self, task: Task, custom_id: str = "") -> None:
        """Store a new task: online in the ZSET; offline in the DB, loaded now or lazily."""
        await self.enqueue_many([(task, custom_id)])

    async def enqueue_many(self, tasks: list[tuple[Task, str]]) -> None:
        """Store several tasks in one round trip; the online capacity is checked first."""
        online_queues = {t.full_queue for t, _ in tasks if t.level == Level.ONLINE}
        for full in online_queues:
            if int(await self._redis.zcard(full)) >= ONLINE_QUEUE_CAPACITY:
                raise server_error("Queue full")
        pipe = self._redis.pipeline(transaction=False)
        for task, custom_id in tasks:
            full = task.full_queue
            wire = task.to_wire()
            pipe.hincrby(_stats_key(full), "put_count", 1)
            if task.level == Level.ONLINE:
                pipe.set(_metadata_key(full, task.task_id), dumps(wire), ex=ONLINE_METADATA_TTL_S)
                pipe.zadd(full, {task.task_id: task.start_time})
                pipe.hincrby(_stats_key(full), "loaded_count", 1)
                continue
            row: dict[Any, Any] = {
                "task": dumps({k: v for k, v in wire.items() if k != "status"}),
                "queue": task.queue,
                "level": str(task.level),
                "custom_id": custom_id,
                "batch_id": task.batch_id or "",
                "callback_url": task.callback_url or "",
                "response_mode": str(task.response_mode),
                "start_time": str(task.start_time),
                "expire_time": str(task.expire_time),
                "running_time": "0",
                "completed_time": "0",
            }
            if self.lazy_offline_loading:
                row["status"] = "waiting"
                pipe.hset(_task_key(task.task_id), mapping=row)
                pipe.zadd(_unloaded_key(full), {task.task_id: task.start_time})
            else:
                row["status"] = "queued"
                pipe.hset(_task_key(task.task_id), mapping=row)
                pipe.set(
                    _metadata_key(full, task.task_id),
                    dumps({**wire, "status": "waiting"}),
                    ex=OFFLINE_METADATA_TTL_S,
                )
                pipe.zadd(full, {task.task_id: task.start_time})
                pipe.hincrby(_stats_key(full), "loaded_count", 1)
        await pipe.execute()

    async def _load_offline(self, full: str) -> int:
        """Lazy loading (§2.4): move up to 100 waiting rows into the Redis buffer."""
        popped: list[Any] = list(await self._redis.zpopmin(_unloaded_key(full), LAZY_LOAD_BATCH))
        loaded = 0
        for member, score in popped:
            task_id = text(member)
            if not await self._load(keys=[_task_key(task_id)]):
                continue
            raw = await self._redis.hget(_task_key(task_id), "task")
            if raw is None:
                continue
            wire = {**json.loads(raw), "status": "waiting"}
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(_metadata_key(full, task_id), dumps(wire), ex=OFFLINE_METADATA_TTL_S)
            pipe.zadd(full, {task_id: score})
            pipe.hincrby(_stats_key(full), "loaded_count", 1)
            await pipe.execute()
            loaded += 1
        return loaded

    # ---------------------------------------------------------------- take (§1.4, §3)

    async def take(self, params: TakeParams) -> dict[str, list[dict[str, Any]]]:
        """Pop tasks per the strategy; drop expired ones and tasks of cancelled batches."""
        now = self.now_ms()
        max_score = now - 1000 * params.min_age_s
        popped: list[tuple[str, str, str]] = []  # (full queue, task id, metadata JSON)
        strategy = params.strategy
        if strategy is TakeStrategy.FIFO:
            size = min(params.size, FIFO_TAKE_CAP)
            if size > 0:
                raw = await self._fifo(keys=params.queues, args=[max_score, size])
                popped = [(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]
        elif strategy is TakeStrategy.ACTIVE_PASSIVE:
            for full in params.queues:
                if len(popped) >= params.size:
                    break
                popped += await self._pop_from(full, max_score, params.size - len(popped))
        elif strategy is TakeStrategy.ROUND_ROBIN:
            empty_in_a_row = 0
            index = 0
            while len(popped) < params.size and empty_in_a_row < len(params.queues):
                full = params.queues[index % len(params.queues)]
                index += 1
                got = await self._pop_from(full, max_score, 1)
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                popped += got
        else:  # sequential: size ignored, at most one per queue
            for full in params.queues:
                raw = await self._sequential(
                    keys=[full, sequential_lock_key(full)],
                    args=[max_score, SEQUENTIAL_LOCK_TTL_S],
                )
                if raw:
                    popped.append((full, raw[0], raw[1]))

        result: dict[str, list[dict[str, Any]]] = {}
        for full, task_id, meta in popped:
            task = await self._accept_popped(full, task_id, meta, params, now)
            if task is not None:
                result.setdefault(full, []).append(task)

        if self.lazy_offline_loading:
            for full in dict.fromkeys(params.queues):
                if full.endswith(":1") and full not in result and not await self._redis.zcard(full):
                    await self._load_offline(full)
        return result

    async def _pop_from(self, full: str, max_score: int, count: int) -> list[tuple[str, str, str]]:
        keep_callback_meta = "1" if full.endswith(":0") else "0"
        raw = await self._pop(keys=[full], args=[max_score, count, keep_callback_meta])
        return [(full, raw[i], raw[i + 1]) for i in range(0, len(raw), 2)]

    async def _accept_popped(
        self, full: str, task_id: str, meta: str, params: TakeParams, now: int
    ) -> dict[str, Any] | None:
        if not meta:
            logger.warning("task %s popped from %s without metadata: lost", task_id, full)
            return None
        try:
            task: dict[str, Any] = json.loads(meta)
        except json.JSONDecodeError:
            logger.warning("task %s in %s has unreadable metadata: dropped", task_id, full)
            return None
        expire = int(task.get("expire_time") or 0)
        if 0 < expire < now:
            logger.info("dropping expired task %s from %s", task_id, full)
            return None
        batch_id = task.get("batch_id")
        if batch_id and await self._redis.exists(batch_cancel_key(batch_id)):
            logger.info("dropping task %s of cancelled batch %s", task_id, batch_id)
            return None
        if int(task.get("level", 0)) == Level.OFFLINE:
            await self._redis.hset(_task_key(task_id), "running_time", str(now))
            if params.process_timeout_s > 0:
                await self._arm_redelivery(task_id, params, expire, now)
        return task

    async def _arm_redelivery(
        self, task_id: str, params: TakeParams, expire: int, now: int
    ) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(_REDELIVERY, {task_id: now + 1000 * params.process_timeout_s})
        ttl_ms = expire - now if expire > 0 else OFFLINE_METADATA_TTL_S * 1000
        if ttl_ms > 0:
            pipe.set(_max_retry_key(task_id), str(params.process_max_retries), px=ttl_ms)
        await pipe.execute()

    # ---------------------------------------------------------------- redelivery (§2.5)

    async def process_due_redeliveries(self, limit: int = 100) -> int:
        """Fire the due ``process_timeout`` timers: re-enqueue or complete with 408."""
        now = self.now_ms()
        due = texts(await self._redis.zrangebyscore(_REDELIVERY, "-inf", now, start=0, num=limit))
        fired = 0
        for task_id in due:
            if not await self._redis.zrem(_REDELIVERY, task_id):
                continue  # another emulator sharing this Redis claimed it
            fired += 1
            await self._on_process_timeout(task_id, now)
        return fired

    async def _on_process_timeout(self, task_id: str, now: int) -> None:
        row = text_map(await self._redis.hgetall(_task_key(task_id)))
        max_retry_raw = await self._redis.get(_max_retry_key(task_id))
        max_retry = int(max_retry_raw) if max_retry_raw is not None else 0
        retries = int(await self._redis.get(_retry_key(task_id)) or 0)
        may_retry = max_retry != 0 and (max_retry == -1 or retries < max_retry)
        if row and row.get("status") == "queued" and may_retry:
            expire = int(row.get("expire_time") or 0)
            full = full_queue_name(row["queue"], int(row["level"]))
            wire = {**json.loads(row["task"]), "status": "queued"}
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(_retry_key(task_id))
            pipe.expire(_retry_key(task_id), OFFLINE_METADATA_TTL_S)
            pipe.set(_metadata_key(full, task_id), dumps(wire), ex=OFFLINE_METADATA_TTL_S)
            pipe.zadd(full, {task_id: int(row["start_time"])})
            await pipe.execute()
            logger.info(
                "redelivering task %s to %s (retry %d of %d, expires in %d ms)",
                task_id,
                full,
                retries + 1,
                max_retry,
                expire - now,
            )
            return
        logger.info("task %s timed out in processing: completing with 408", task_id)
        await self.complete(task_id, {"status_code": "408", "request_id": task_id})

    # ---------------------------------------------------------------- complete (§1.5, §8)

    async def complete(self, task_id: str, result: dict[str, Any]) -> bool:
        """Complete a task; True when it took effect (the HTTP answer is 200 either way)."""
        queue_id, level = parse_task_id(task_id)
        await self._clear_redelivery(task_id)
        if level is Level.OFFLINE:
            done = await self._complete(
                keys=[_task_key(task_id)], args=[self.now_ms(), dumps(result)]
            )
            if not done:
                return False
            row = text_map(await self._redis.hgetall(_task_key(task_id)))
            completed = CompletedTask(
                task_id=task_id,
                queue=row.get("queue", ""),
                level=int(level),
                response_mode=row.get("response_mode", ""),
                callback_url=row.get("callback_url", ""),
                batch_id=row.get("batch_id", ""),
                custom_id=row.get("custom_id", ""),
                result=result,
            )
        else:
            name = await self._queue_name_by_id(queue_id)
            if name is None:
                return False
            # Online: only callback-mode tasks keep their metadata after take (§3).
            meta = await self._redis.getdel(_metadata_key(full_queue_name(name, 0), task_id))
            if meta is None:
                return False
            task = json.loads(meta)
            completed = CompletedTask(
                task_id=task_id,
                queue=name,
                level=0,
                response_mode=str(task.get("response_mode", "")),
                callback_url=str(task.get("callback_url") or ""),
                batch_id="",
                custom_id="",
                result=result,
            )
        full = full_queue_name(completed.queue, level)
        await self._release_lock(keys=[sequential_lock_key(full)], args=[task_id])
        await self._redis.hincrby(_stats_key(full), "completed_count", 1)
        if self.on_completed is not None:
            await self.on_completed(completed)
        return True

    async def _clear_redelivery(self, task_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(_REDELIVERY, task_id)
        pipe.delete(_max_retry_key(task_id), _retry_key(task_id))
        await pipe.execute()

    async def count_online_completion(self, full_queue: str) -> None:
        """Count a completion event answered by this instance (blocking/streaming)."""
        await self._redis.hincrby(_stats_key(full_queue), "completed_count", 1)

    # ---------------------------------------------------------------- cancel, get (§1.6, §1.7)

    async def cancel(self, task_id: str) -> bool:
        """Remove a task from its ZSET and metadata; offline rows become ``cancelled``."""
        queue_id, level = parse_task_id(task_id)
        name = await self._queue_name_by_id(queue_id)
        if name is None:
            return False
        full = full_queue_name(name, level)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(full, task_id)
        pipe.delete(_metadata_key(full, task_id))
        pipe.zrem(_unloaded_key(full), task_id)
        removed = await pipe.execute()
        cancelled = bool(removed[0])
        if level is Level.OFFLINE:
            cancelled = bool(await self._cancel(keys=[_task_key(task_id)])) or cancelled
        return cancelled

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """The offline task with its status (and ``result`` once completed); else 500."""
        _, level = parse_task_id(task_id)
        if level is Level.ONLINE:
            raise server_error(f"Table 'queue.task_{level}' doesn't exist for {task_id}")
        row = text_map(await self._redis.hgetall(_task_key(task_id)))
        if not row:
            raise server_error("java.lang.NullPointerException")
        task: dict[str, Any] = json.loads(row["task"])
        task["status"] = row.get("status", "waiting")
        if task["status"] == "succeeded":
            task["running_time"] = int(row.get("running_time") or 0)
            task["completed_time"] = int(row.get("completed_time") or 0)
        if row.get("result"):
            task["result"] = json.loads(row["result"])
        return task

    async def task_status(self, task_id: str) -> str | None:
        """The offline row's status, for tests and batches."""
        status = await self._redis.hget(_task_key(task_id), "status")
        return None if status is None else str(status)
