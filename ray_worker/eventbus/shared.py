"""What both sides of the event-bus hop agree on: pure helpers, no Ray, no Redis, no I/O.

This module owns the format of what crosses from a caller (``client``, ``batching``) to the
node's publisher actor (``publisher_actor``, ``redis_writer``): the entry and batch types,
the actor's name and namespace, the statuses ``RedisPublisher.publish`` answers, and the one
answer the event bus writes of its own (``lost_events_answer``). It must not import Ray or
redis-py, hold state, or run anything: code that runs on one side lives in that side's module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ray_worker.bella.protocol import completion_fields, progress_fields, result_body

__all__ = [
    "ACCEPTED",
    "DUPLICATE",
    "EVENTS_LOST_CODE",
    "EVENTS_LOST_STATUS",
    "EXITING",
    "PUBLISHER_NAMESPACE",
    "BareEntry",
    "Batch",
    "Entry",
    "describe",
    "lost_events_answer",
    "publisher_name",
    "tagged",
]

Entry = tuple[str, dict[str, str], str, str]
"""One stream entry and whose it is: ``(stream_key, fields, task_id, event_id)``.

``fields`` is what goes to Redis (every value a ``str``, §4.2); ``task_id`` is the task it
belongs to and ``event_id`` the ``eventId`` of a progress event ("" for a completion). Both
are carried beside the fields so the writer never reads them back out of the JSON payload."""

Batch = list[Entry]
"""What one send ships to the publisher actor: entries, in order."""

BareEntry = tuple[str, Mapping[str, str]]
"""``(stream_key, fields)`` without its task: what a client of the previous version sends
(``tagged`` makes an ``Entry`` of it), and what the writer takes as an entry of no task."""

PUBLISHER_NAMESPACE = "bella-ray-worker"
"""Ray namespace of the named per-node publisher actors."""

ACCEPTED = "ok"
DUPLICATE = "duplicate"
EXITING = "exiting"
# What RedisPublisher.publish answers: buffered, already had it (each with the client's
# written mark: ``(status, mark)``), or going away (the plain string: resend to the node's
# next publisher).

EVENTS_LOST_CODE = "events_lost"
"""``error.code`` of the answer to a task whose events the event bus may have lost."""

EVENTS_LOST_STATUS = 503
"""Its ``status_code``: the producer may retry the request."""


def publisher_name(app_name: str, node_id: str) -> str:
    """The Ray actor name of ``app_name``'s publisher on node ``node_id``."""
    return f"event-publisher:{app_name}:{node_id}"


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, for logs and error messages."""
    return f"{type(exc).__name__}: {exc}"


def lost_events_answer(key: str, task_id: str, event_id: int, message: str) -> Batch:
    """The entries ending a task whose events may have been lost, for stream ``key``: an
    error chunk (``eventId`` = ``event_id``, after every event it had; a blocking task's
    producer ignores it) then a 503 completion with the same OpenAI error body (§4.5)."""
    body = {"error": {"message": message, "type": "server_error", "code": EVENTS_LOST_CODE}}
    chunk_id = str(event_id)
    result = result_body(EVENTS_LOST_STATUS, task_id, body)
    return [
        (key, progress_fields(task_id, chunk_id, "message", body), task_id, chunk_id),
        (key, completion_fields(task_id, result), task_id, ""),
    ]


def tagged(key: str, fields: Mapping[str, str]) -> Entry:
    """An ``Entry`` for a bare ``(key, fields)`` pair, its task and event ids read from the
    JSON payload ("" where unreadable). Only for batches of a client of the previous version
    (``RedisPublisher.publish``); current clients tag each entry as they build it."""
    try:
        payload = json.loads(fields.get("payload") or "{}")
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return key, dict(fields), "", ""
    task_id, event_id = payload.get("taskId"), payload.get("eventId")
    return (
        key,
        dict(fields),
        task_id if isinstance(task_id, str) else "",
        event_id if isinstance(event_id, str) else "",
    )
