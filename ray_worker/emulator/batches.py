"""The emulator's file store and OpenAI-style batches over Bella-Queue tasks (§1.9, §7).

This module owns the local file API (``/v1/files``: uploaded bytes plus a JSON sidecar in a
directory) and the batch lifecycle: splitting an input JSONL file into level-1 ``batch``
tasks, collecting one output line ``{id, custom_id, response}`` per completed task, writing
parse failures to an error file, and finalizing the batch as ``completed``, ``cancelled`` or
``expired`` with its output files. Batch state lives in Redis so any emulator instance on the
same Redis can complete a batch task.

It must not speak HTTP or decide queue semantics: tasks go through :class:`QueueStore`.
Timestamps are epoch milliseconds, as the real server's ``toBatch`` writes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis

from ray_worker.bella.protocol import (
    Level,
    ResponseMode,
    Task,
    dumps,
    make_batch_id,
    now_ms,
)
from ray_worker.emulator.store import (
    PREFIX,
    CompletedTask,
    QueueMeta,
    QueueStore,
    bad_request,
    batch_cancel_key,
    text_map,
    texts,
)

logger = logging.getLogger(__name__)

__all__ = ["BatchManager", "FileStore", "parse_completion_window"]

_WINDOW_RE = re.compile(r"(\d+)([a-zA-Z]+)")
_WINDOW_UNITS_S = {"m": 60, "h": 3600, "d": 86400}
_SPLIT_CHUNK = 100
_BATCHES = f"{PREFIX}batches"
_BATCH_EXPIRY = f"{PREFIX}batch-expiry"
_CANCEL_FLAG_TTL_S = 7 * 24 * 3600
_PARSE_ERROR = {"code": "parse_error", "message": "Failed to parse request data."}
_TIMESTAMP_FIELDS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def parse_completion_window(window: str) -> tuple[str, int]:
    """``(\\d+)([a-zA-Z]+)`` with unit m/h/d; anything else becomes ``"24h"`` (§1.9)."""
    match = _WINDOW_RE.fullmatch(window.strip())
    if match is None or match.group(2) not in _WINDOW_UNITS_S:
        return "24h", 24 * 3600
    return window.strip(), int(match.group(1)) * _WINDOW_UNITS_S[match.group(2)]


def _batch_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}"


class FileStore:
    """Files on local disk: ``<root>/<id>`` holds the bytes, ``<root>/<id>.json`` the object."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _valid_id(file_id: str) -> bool:
        return bool(re.fullmatch(r"file-[0-9a-f]{24}", file_id))

    async def save(self, content: bytes, *, filename: str, purpose: str) -> dict[str, Any]:
        """Store ``content`` and return its OpenAI-style file object."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": now_ms(),
            "filename": filename,
            "purpose": purpose,
        }
        await asyncio.to_thread(self._write, file_id, content, obj)
        return obj

    def _write(self, file_id: str, content: bytes, obj: dict[str, Any]) -> None:
        (self.root / file_id).write_bytes(content)
        (self.root / f"{file_id}.json").write_text(dumps(obj), encoding="utf-8")

    async def get(self, file_id: str) -> dict[str, Any] | None:
        """The file object, or None."""
        if not self._valid_id(file_id):
            return None
        path = self.root / f"{file_id}.json"
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return None
        obj: dict[str, Any] = json.loads(text)
        return obj

    async def content(self, file_id: str) -> bytes | None:
        """The file's bytes, or None."""
        if not self._valid_id(file_id):
            return None
        try:
            return await asyncio.to_thread((self.root / file_id).read_bytes)
        except FileNotFoundError:
            return None

    async def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every stored file object, newest first."""
        paths = await asyncio.to_thread(lambda: sorted(self.root.glob("file-*.json")))
        objs: list[dict[str, Any]] = []
        for path in paths:
            obj = await self.get(path.stem)
            if obj is not None and (purpose is None or obj.get("purpose") == purpose):
                objs.append(obj)
        return sorted(objs, key=lambda o: int(o.get("created_at", 0)), reverse=True)


Router = Callable[[dict[str, Any]], Awaitable[QueueMeta]]
"""Resolves a request body (its ``model``) to a registered queue, or raises a 400."""


class BatchManager:
    """Batches as Redis hashes; their tasks go through the shared :class:`QueueStore`."""

    def __init__(self, redis: Redis, store: QueueStore, files: FileStore) -> None:
        self._redis = redis
        self._store = store
        self._files = files
        self._instance_number = zlib.crc32(store.instance_id.encode()) % 10000

    # ---------------------------------------------------------------- create

    async def create(
        self,
        body: dict[str, Any],
        *,
        ak: str,
        queue_name: str | None,
        route: Router,
    ) -> dict[str, Any]:
        """``POST /v1/batches``: validate, split the input into tasks, return the batch."""
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise bad_request("input_file_id must not be blank")
        if not isinstance(endpoint, str) or not endpoint:
            raise bad_request("endpoint must not be blank")
        if not isinstance(window, str) or not window.strip():
            raise bad_request("completion_window must not be blank")
        metadata = body.get("metadata")
        window, window_s = parse_completion_window(window)
        content = await self._files.content(input_file_id)
        if content is None:
            raise bad_request(f"File not found: {input_file_id}")
        lines = [
            (number, line)
            for number, line in enumerate(content.decode("utf-8", "replace").splitlines(), 1)
            if line.strip()
        ]
        if queue_name:
            queue = await self._store.require_queue(queue_name)
        else:
            first = _parse_line(lines[0][1]) if lines else None
            queue = await route(first[1] if first else {})

        now = self._store.now_ms()
        serial = int(await self._redis.incr(f"{PREFIX}seq:batch"))
        batch_id = make_batch_id(queue.id, Level.OFFLINE, now, self._instance_number, serial)
        expires_at = now + 1000 * window_s
        record: dict[Any, Any] = {
            "id": batch_id,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": window,
            "status": "validating",
            "created_at": str(now),
            "expires_at": str(expires_at),
            "queue": queue.queue,
            "total": str(len(lines)),
            "completed": "0",
            "failed": "0",
        }
        if metadata is not None:
            record["metadata"] = dumps(metadata)
        key = _batch_key(batch_id)
        await self._redis.hset(key, mapping=record)
        await self._redis.zadd(_BATCHES, {batch_id: now})
        await self._redis.zadd(_BATCH_EXPIRY, {batch_id: expires_at})

        failed = 0
        for start in range(0, len(lines), _SPLIT_CHUNK):
            chunk: list[tuple[Task, str]] = []
            for number, line in lines[start : start + _SPLIT_CHUNK]:
                parsed = _parse_line(line)
                if parsed is None:
                    failed += 1
                    error = {"id": "", "customId": str(number), "error": _PARSE_ERROR}
                    await self._redis.rpush(f"{key}:errors", dumps(error))
                    continue
                custom_id, data = parsed
                task = await self._store.new_task(
                    queue=queue,
                    level=Level.OFFLINE,
                    mode=ResponseMode.BATCH,
                    ak=ak,
                    endpoint=endpoint,
                    data=data,
                    expire_time=expires_at,
                    trace_id=batch_id,
                    batch_id=batch_id,
                )
                chunk.append((task, custom_id))
            if chunk:
                await self._store.enqueue_many(chunk)
        await self._redis.hset(
            key,
            mapping={"failed": str(failed), "status": "in_progress", "in_progress_at": str(now)},
        )
        logger.info(
            "batch %s: %d lines into %s:1 (%d unparseable)",
            batch_id,
            len(lines),
            queue.queue,
            failed,
        )
        # Workers may have finished every task while the split was still running.
        done = int(await self._redis.hget(key, "completed") or 0)
        if done + failed >= len(lines):
            await self._finalize(batch_id, "completed")
        batch = await self.get(batch_id)
        assert batch is not None
        return batch

    # ---------------------------------------------------------------- read

    async def get(self, batch_id: str) -> dict[str, Any] | None:
        """The OpenAI-style batch object (nulls omitted), or None."""
        row = text_map(await self._redis.hgetall(_batch_key(batch_id)))
        if not row:
            return None
        batch: dict[str, Any] = {
            "id": row["id"],
            "object": "batch",
            "endpoint": row.get("endpoint", ""),
            "input_file_id": row.get("input_file_id", ""),
            "completion_window": row.get("completion_window", "24h"),
            "status": row.get("status", "validating"),
        }
        for name in ("output_file_id", "error_file_id"):
            if row.get(name):
                batch[name] = row[name]
        for name in _TIMESTAMP_FIELDS:
            if row.get(name):
                batch[name] = int(row[name])
        batch["request_counts"] = {
            "total": int(row.get("total", 0)),
            "completed": int(row.get("completed", 0)),
            "failed": int(row.get("failed", 0)),
        }
        if row.get("metadata"):
            batch["metadata"] = json.loads(row["metadata"])
        return batch

    async def list(self, *, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """``{object:"list", data, has_more, first_id, last_id}``, newest first."""
        limit = max(1, min(limit, 100))
        start = 0
        if after:
            rank = await self._redis.zrevrank(_BATCHES, after)
            start = 0 if rank is None else int(cast(int, rank)) + 1
        ids = texts(await self._redis.zrevrange(_BATCHES, start, start + limit))
        data = [b for b in [await self.get(i) for i in ids[:limit]] if b is not None]
        result: dict[str, Any] = {"object": "list", "data": data, "has_more": len(ids) > limit}
        if data:
            result["first_id"] = data[0]["id"]
            result["last_id"] = data[-1]["id"]
        return result

    # ---------------------------------------------------------------- lifecycle

    async def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """Set the cancel flag; take drops its tasks and complete writes no output (§7)."""
        key = _batch_key(batch_id)
        if not await self._redis.exists(key):
            return None
        if not await self._redis.exists(f"{key}:finalized"):
            await self._redis.set(batch_cancel_key(batch_id), "1", ex=_CANCEL_FLAG_TTL_S)
            await self._redis.hset(
                key, mapping={"status": "cancelling", "cancelling_at": str(self._store.now_ms())}
            )
            await self._finalize(batch_id, "cancelled")
        return await self.get(batch_id)

    async def on_completed(self, completed: CompletedTask) -> None:
        """Append ``{id, custom_id, response}`` and finalize when every line is done."""
        if not completed.batch_id:
            return
        key = _batch_key(completed.batch_id)
        if await self._redis.exists(batch_cancel_key(completed.batch_id)):
            return
        if not await self._redis.exists(key) or await self._redis.exists(f"{key}:finalized"):
            return
        line = {
            "id": completed.task_id,
            "custom_id": completed.custom_id,
            "response": completed.result,
        }
        await self._redis.rpush(f"{key}:output", dumps(line))
        done = int(await self._redis.hincrby(key, "completed", 1))
        counts = await self._redis.hmget(key, ["total", "failed", "status"])
        total, failed = int(counts[0] or 0), int(counts[1] or 0)
        if counts[2] == "in_progress" and done + failed >= total:
            await self._finalize(completed.batch_id, "completed")

    async def expire_due(self) -> int:
        """Finalize as ``expired`` every batch whose completion window has passed."""
        due = texts(
            await self._redis.zrangebyscore(
                _BATCH_EXPIRY, "-inf", self._store.now_ms(), start=0, num=100
            )
        )
        expired = 0
        for batch_id in due:
            if await self._redis.zrem(_BATCH_EXPIRY, batch_id):
                expired += int(await self._finalize(batch_id, "expired"))
        return expired

    async def _finalize(self, batch_id: str, status: str) -> bool:
        key = _batch_key(batch_id)
        if not await self._redis.set(f"{key}:finalized", status, nx=True):
            return False
        now = self._store.now_ms()
        await self._redis.hset(key, "finalizing_at", str(now))
        output = texts(await self._redis.lrange(f"{key}:output", 0, -1))
        errors = texts(await self._redis.lrange(f"{key}:errors", 0, -1))
        fields: dict[Any, Any] = {"status": status, f"{status}_at": str(now)}
        out_file = await self._files.save(
            "".join(f"{line}\n" for line in output).encode(),
            filename=f"{batch_id}_output.jsonl",
            purpose="batch_output",
        )
        fields["output_file_id"] = out_file["id"]
        if errors:
            err_file = await self._files.save(
                "".join(f"{line}\n" for line in errors).encode(),
                filename=f"{batch_id}_error.jsonl",
                purpose="batch_output",
            )
            fields["error_file_id"] = err_file["id"]
        await self._redis.hset(key, mapping=fields)
        await self._redis.zrem(_BATCH_EXPIRY, batch_id)
        logger.info("batch %s %s with %d output lines", batch_id, status, len(output))
        return True


def _parse_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """``(custom_id, body)`` of one input line, or None when it cannot be parsed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict):
        return None
    custom_id = obj.get("custom_id")
    return ("" if custom_id is None else str(custom_id)), obj["body"]
