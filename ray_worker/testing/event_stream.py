"""Reading a worker's event stream back from Redis, as tests count answers where they land."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from redis.asyncio import Redis

from ray_worker.bella.protocol import CompletionEvent, decode_event

__all__ = ["completions_after", "last_entry_id"]


async def last_entry_id(redis_url: str, stream: str) -> str:
    """The id of ``stream``'s newest entry (``"0-0"`` when it has none)."""
    redis = Redis.from_url(redis_url)
    try:
        last = cast("list[Any]", await redis.xrevrange(stream, count=1))
    finally:
        await redis.aclose()
    return _id(last[0][0]) if last else "0-0"


async def completions_after(redis_url: str, stream: str, after: str) -> Counter[str]:
    """Completion events per task id written to ``stream`` after entry ``after`` (paged)."""
    redis = Redis.from_url(redis_url)
    counts: Counter[str] = Counter()
    cursor = f"({after}"
    try:
        while True:
            entries = cast("list[Any]", await redis.xrange(stream, min=cursor, count=10_000))
            if not entries:
                break
            for _, fields in entries:
                event = decode_event(fields)
                if isinstance(event, CompletionEvent):
                    counts[event.task_id] += 1
            cursor = f"({_id(entries[-1][0])}"
    finally:
        await redis.aclose()
    return counts


def _id(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
