"""Whether Bella-Queue will redeliver a level-1 task the worker leaves unanswered.

This module owns the one question both hosts of a task runner (the poller and each LLM
replica) ask of the Redis that holds Bella-Queue's queues: does its ``notify-keyspace-events``
let the server's redelivery timer fire (protocol §2.5)? Leaving a level-1 task for
redelivery (at a stop, or when no replica could run it) is right only if the server will
send it again; otherwise the task is never answered. So a host asks when it starts and again
when it stops, and answers 503 instead of leaving a task when the setting is known to be
wrong. A Redis that does not answer ``CONFIG GET`` (a managed Redis, an ACL) leaves the
configured behaviour as it is: ``ray-worker check`` says what to verify by hand.

It must not decide what happens to a task (``ray_worker.task.runner`` and
``ray_worker.worker.dispatcher`` do, from the flag set here).
"""

from __future__ import annotations

import logging

from ray_worker.bella.protocol import (
    KEYSPACE_EVENTS_SETTING,
    keyspace_events_redeliver,
    redact_url,
)

logger = logging.getLogger(__name__)

__all__ = ["redelivery_missing"]

CHECK_TIMEOUT_S = 3.0
"""How long a host waits for the Redis's answer (it is asked off the task path)."""


async def redelivery_missing(url: str, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """Why Bella-Queue cannot redeliver a level-1 task left unanswered, per the Redis at
    ``url`` (the event bus Bella-Queue reports: the Redis of its queues), or None when it can
    or when that is unknown (CONFIG refused, Redis away)."""
    from ray_worker.eventbus.redis_check import config_value

    flags, why = await config_value(url, KEYSPACE_EVENTS_SETTING, timeout_s)
    if flags is None:
        logger.debug("redelivery setting of %s unknown: %s", redact_url(url), why)
        return None
    if keyspace_events_redeliver(flags):
        return None
    return (
        f"{redact_url(url)} has {KEYSPACE_EVENTS_SETTING} {flags!r} (needs E and x, e.g. Ex): "
        "Bella-Queue never sees a task's process timeout expire, so a level-1 task left "
        "unanswered would never be redelivered; such tasks are answered 503 instead"
    )
