"""One-shot checks of the event-bus Redis: ``ping`` and ``config_value``.

Runs where an operator or the poller checks the set-up (``ray-worker check``, the
redelivery check), never in the publisher actor or on a task's path. This module owns those
short-lived connections and translates their redis-py errors (``ping`` into
``errors.EventBusUnavailableError``, ``config_value`` into an "unknown" answer). It must not
write events (that is ``redis_writer``) or import Ray.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ray_worker.bella.protocol import redact_url
from ray_worker.errors import EventBusUnavailableError
from ray_worker.eventbus.shared import describe

__all__ = ["config_value", "ping"]

_FAILURES = (RedisError, OSError)


def _check_client(url: str, timeout_s: float) -> Redis:
    """A one-shot client for a check (``ping``, ``keyspace_events``): no retries, short
    timeouts, RESP2. Raises ``ValueError`` for a malformed URL."""
    client: Redis = Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        client_name="bella-ray-worker-check",
        protocol=2,
    )
    return client


async def ping(url: str, timeout_s: float = 5.0) -> None:
    """PING the Redis at ``url`` once (a reachability check, e.g. ``ray-worker check``).

    Raises ``EventBusUnavailableError`` when the URL is malformed, Redis cannot be reached,
    refuses the password, or does not answer within ``timeout_s``. Messages show the URL
    with its password hidden (``protocol.redact_url``).
    """
    shown = redact_url(url)
    try:
        client = _check_client(url, timeout_s)
    except ValueError as exc:
        raise EventBusUnavailableError(f"invalid event-bus URL {shown}: {exc}") from None
    try:
        await client.ping()
    except (*_FAILURES, TimeoutError) as exc:
        raise EventBusUnavailableError(
            f"event-bus Redis at {shown} did not answer PING: {describe(exc)}"
        ) from None
    finally:
        await client.aclose()


async def config_value(url: str, setting: str, timeout_s: float = 5.0) -> tuple[str | None, str]:
    """``CONFIG GET setting`` of the Redis at ``url``: (its value, "") or (None, why it is
    unknown). A Redis that refuses CONFIG (ACL, a renamed command on a managed Redis) is
    common: that answers "unknown", never an error."""
    try:
        client = _check_client(url, timeout_s)
    except ValueError as exc:
        return None, f"invalid URL: {exc}"
    try:
        reply = await client.config_get(setting)
    except (*_FAILURES, TimeoutError) as exc:
        return None, f"CONFIG GET {setting} failed: {describe(exc)}"
    finally:
        await client.aclose()
    value: Any = None
    if isinstance(reply, dict):  # keys are bytes: the client does not decode replies
        value = next((v for k, v in reply.items() if k in (setting, setting.encode())), None)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        return None, f"CONFIG GET {setting} answered no value"
    return value, ""
