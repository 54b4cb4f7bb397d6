"""Polling helpers for tests, notebooks and benchmarks: wait for a condition, never sleep blind.

This module owns ``wait_for`` (async; the predicate may be sync or async) and
``wait_for_sync``. They poll until the predicate returns a truthy value and return it, or
raise ``TimeoutError`` naming what was awaited and the last value seen. They must not be
used on a worker's hot path.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["wait_for", "wait_for_sync"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 0.02


def _describe(predicate: object, message: str | None) -> str:
    return message or getattr(predicate, "__qualname__", None) or repr(predicate)


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T | None]],
    timeout: float = ...,  # noqa: ASYNC109
    *,
    interval: float = ...,
    message: str | None = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = ...,  # noqa: ASYNC109
    *,
    interval: float = ...,
    message: str | None = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def wait_for(
    predicate: Callable[[], Any],
    timeout: float = DEFAULT_TIMEOUT_S,  # noqa: ASYNC109 - the shared helper's documented API
    *,
    interval: float = DEFAULT_INTERVAL_S,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    Exceptions of the types in ``ignore`` count as "not yet" (handy while a server restarts);
    any other exception propagates at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if loop.time() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {_describe(predicate, message)}; "
                f"last value: {last!r}"
            )
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], T | None],
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    interval: float = DEFAULT_INTERVAL_S,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """The blocking variant of :func:`wait_for` for sync code."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {_describe(predicate, message)}; "
                f"last value: {last!r}"
            )
        time.sleep(interval)
