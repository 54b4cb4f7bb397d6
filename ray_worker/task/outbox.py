"""The outbox: HTTP completes kept and retried until their task can no longer matter.

This module owns what happens to an answer after the runner handed it over: ``complete``
admits it (waiting while the outbox is full: backpressure, never a silent drop) and returns;
a background delivery retries it with capped, jittered backoff (never sooner than an answer's
``Retry-After``) until Bella-Queue accepts it, Bella-Queue itself refuses it as malformed (a
4xx with its error body), the task's ``expire_time`` passes (a late complete is a no-op on the
server, §2.5), or the replica's stop runs out of drain time. Everything else is retried: a
3xx/4xx from a gateway, WAF or key rotation in front of Bella-Queue says nothing about the
answer. Every answer given up is logged at ERROR with its task id and counted. The outbox is
bounded by entries and by bytes (the JSON size of the results). :meth:`Outbox.hand_over` and
:meth:`Outbox.adopt` move the undelivered answers of a stopping replica to another outbox.

It must not import Ray or httpx: it wraps a ``Completer`` (a ``QueueClient`` making one
attempt per call) and is one itself, so the runner uses it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ray_worker.aio import BELOW, jittered
from ray_worker.bella.protocol import Task
from ray_worker.config import DispatcherConfig
from ray_worker.errors import (
    AuthenticationError,
    BadRequestError,
    QueueGatewayError,
    QueueUnavailableError,
)
from ray_worker.metrics import WorkerMetrics
from ray_worker.task.answers import Completer

logger = logging.getLogger(__name__)

__all__ = ["HandedOverAnswer", "Outbox", "OutboxCounters", "OutboxEntry"]

_REMEMBERED_DEADLINES = 65_536
"""Most task deadlines kept for answers that have not come yet (oldest forgotten first)."""
_DRAIN_BACKOFF_MAX_S = 1.0
"""Longest wait between attempts while the replica stops (its drain time is short)."""


@dataclass(frozen=True)
class _Expectation:
    deadline: float
    """Wall-clock seconds after which the answer no longer matters."""
    level: int


class HandedOverAnswer(TypedDict):
    """One undelivered answer as :meth:`Outbox.hand_over` returns it and :meth:`Outbox.adopt`
    takes it: plain values only, so it pickles across actors."""

    task_id: str
    result: dict[str, Any]
    deadline: float
    """Epoch seconds on the server's clock after which the answer no longer matters."""
    level: int | None
    attempts: int


@dataclass
class OutboxEntry:
    """One answer waiting for Bella-Queue."""

    task_id: str
    result: Mapping[str, Any]
    size: int
    """Bytes of the result as JSON (what the byte bound counts)."""
    deadline: float
    """Wall-clock seconds (``time.time()``) after which it is given up."""
    level: int | None
    """The task's level when known (the log of a give-up says what follows)."""
    attempts: int = 0
    last_error: str = ""


@dataclass
class OutboxCounters:
    """Plain counters, only ever incremented (status JSON and tests read them)."""

    admitted: int = 0
    delivered: int = 0
    retries: int = 0
    """Attempts after the first one of an answer."""
    expired: int = 0
    """Answers given up because their task's expire_time passed."""
    rejected: int = 0
    """Answers Bella-Queue itself refused as malformed (a 4xx with its error body):
    retrying cannot help."""
    undelivered_at_stop: int = 0
    """Answers still undelivered when the replica's drain time ran out."""
    backpressured: int = 0
    """Answers that had to wait for room in the outbox."""
    handed_over: int = 0
    """Undelivered answers given to another outbox by :meth:`Outbox.hand_over`."""
    adopted: int = 0
    """Answers taken over from another outbox by :meth:`Outbox.adopt`."""
    by_reason: dict[str, int] = field(default_factory=dict)
    failed_attempts: dict[str, int] = field(default_factory=dict)
    """Failed attempts by cause: ``gateway_<status>`` (a 3xx/4xx from in front of
    Bella-Queue), ``http_<status>`` (its 5xx), ``unauthorized`` (401), ``unreachable``
    (no answer), or the error's class name."""


class Outbox:
    """A ``Completer`` that keeps every answer until Bella-Queue takes it or it stops
    mattering. Call :meth:`expect` with the task before its answer comes, so the deadline is
    the task's own ``expire_time``."""

    def __init__(
        self,
        completer: Completer,
        config: DispatcherConfig | None = None,
        *,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.completer = completer
        self.config = config or DispatcherConfig()
        self.metrics = metrics or WorkerMetrics(use_ray=False)
        self.counters = OutboxCounters()
        self._clock = clock
        self._rng = rng or random.Random()
        self._entries: dict[str, OutboxEntry] = {}
        self._admitted_at: dict[str, float] = {}
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._bytes = 0
        self._expected: OrderedDict[str, _Expectation] = OrderedDict()
        self._room = asyncio.Event()
        """Set (and replaced) whenever an answer leaves the outbox or the outbox closes."""
        self._wake = asyncio.Event()
        """Set to cut every backoff wait short (a delivery succeeded after failures, or the
        replica stops); replaced after each use."""
        self._failing = False
        self._draining = False
        self._closed = False

    # -- figures --------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        """Answers waiting (admitted, not delivered nor given up)."""
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Their size as JSON."""
        return self._bytes

    def stats(self) -> dict[str, Any]:
        """The outbox for the status JSON and the load report."""
        c = self.counters
        return {
            "outbox_entries": self.entries,
            "outbox_bytes": self._bytes,
            "outbox_max_entries": self.config.outbox_max_entries,
            "outbox_max_bytes": self.config.outbox_max_bytes,
            "outbox_oldest_age_s": self._oldest_age_s(),
            "complete_delivered": c.delivered,
            "complete_retries": c.retries,
            "complete_given_up": c.expired + c.rejected + c.undelivered_at_stop,
            "complete_expired": c.expired,
            "complete_rejected": c.rejected,
            "complete_undelivered_at_stop": c.undelivered_at_stop,
            "outbox_backpressured": c.backpressured,
            "complete_handed_over": c.handed_over,
            "complete_adopted": c.adopted,
        }

    def _oldest_age_s(self) -> float | None:
        if not self._admitted_at:
            return None
        return round(time.monotonic() - min(self._admitted_at.values()), 3)

    # -- the Completer --------------------------------------------------------------------

    def expect(self, task: Task) -> None:
        """Remember when ``task`` stops mattering: its ``expire_time``, or
        ``complete_max_retry_s`` from now when it has none."""
        if task.expire_time > 0:
            deadline = task.expire_time / 1000
        else:
            deadline = self._clock() + self.config.complete_max_retry_s
        self._expected[task.task_id] = _Expectation(deadline, int(task.level))
        self._expected.move_to_end(task.task_id)
        while len(self._expected) > _REMEMBERED_DEADLINES:
            self._expected.popitem(last=False)

    async def complete(self, task_id: str, result: Mapping[str, Any]) -> None:
        """Admit ``result`` for delivery and return; wait while the outbox is full.

        Raises ``QueueUnavailableError`` when the answer could not even be admitted: its task
        expired while it waited for room, or the replica stopped meanwhile (logged and
        counted either way). An answer already waiting for ``task_id`` is replaced.
        """
        expected = self._expected.pop(task_id, None)
        deadline = (
            expected.deadline
            if expected is not None
            else self._clock() + self.config.complete_max_retry_s
        )
        level = None if expected is None else expected.level
        body = dict(result)
        size = len(json.dumps(body, separators=(",", ":"), default=str).encode())
        entry = OutboxEntry(task_id, body, size, deadline, level)
        await self._admit(entry)
        self.counters.admitted += 1
        self._enqueue(entry)

    def _enqueue(self, entry: OutboxEntry) -> None:
        """Start delivering ``entry``; an answer waiting for the same task is replaced."""
        task_id = entry.task_id
        previous = self._jobs.pop(task_id, None)
        if previous is not None:
            previous.cancel()
            self._drop(task_id)
        self._entries[task_id] = entry
        self._admitted_at[task_id] = time.monotonic()
        self._bytes += entry.size
        self._gauges()
        job = asyncio.get_running_loop().create_task(
            self._deliver(entry), name=f"complete-{task_id}"
        )
        self._jobs[task_id] = job
        job.add_done_callback(lambda j: self._finished(task_id, j))

    def _fits(self, size: int) -> bool:
        if not self._entries:
            return True  # one answer larger than the byte bound still goes, alone
        cfg = self.config
        if len(self._entries) >= cfg.outbox_max_entries:
            return False
        return self._bytes + size <= cfg.outbox_max_bytes

    async def _admit(self, entry: OutboxEntry) -> None:
        if self._fits(entry.size) and not self._closed:
            return
        self.counters.backpressured += 1
        self.metrics.inc("outbox_backpressure")
        logger.warning(
            "the outbox is full (%d answers, %d bytes): the answer waits for room",
            len(self._entries),
            self._bytes,
            extra={"task_id": entry.task_id},
        )
        while not self._closed and not self._fits(entry.size):
            left = entry.deadline - self._clock()
            if left <= 0:
                break
            room = self._room
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room.wait(), min(left, 60.0))
        if self._closed:
            self._give_up(entry, "undelivered_at_stop", "the replica stopped")
            raise QueueUnavailableError("the replica stopped before the answer could be sent")
        if not self._fits(entry.size):
            self._give_up(entry, "expired", "the outbox stayed full")
            raise QueueUnavailableError("the task expired while its answer waited for room")

    # -- delivery -------------------------------------------------------------------------

    def _backoff_s(self, retry: int) -> float:
        cfg = self.config
        cap = cfg.complete_backoff_max_s
        if self._draining:
            cap = min(cap, _DRAIN_BACKOFF_MAX_S)
        base = min(cap, cfg.complete_backoff_initial_s * 2.0 ** max(0, retry - 1))
        # Answers of one outage do not retry in lock step.
        return jittered(base, BELOW, self._rng)

    async def _deliver(self, entry: OutboxEntry) -> None:
        while True:
            if self._clock() >= entry.deadline:
                self._give_up(entry, "expired", entry.last_error or "the task expired")
                return
            if entry.attempts:
                self.counters.retries += 1
                self.metrics.inc("complete_retries")
            entry.attempts += 1
            retry_after_s: float | None = None
            try:
                await self.completer.complete(entry.task_id, entry.result)
            except BadRequestError as err:
                # Bella-Queue's own answer (a 4xx with its error body): the complete itself
                # is malformed, and the same request fails the same way.
                self._give_up(entry, "rejected", f"Bella-Queue refused it: {err}")
                return
            except Exception as err:
                # Anything else may pass later: an outage, a 5xx, and every 3xx/4xx from a
                # gateway, WAF or proxy in front of Bella-Queue. A 401 too: Bella-Queue's own
                # has no body to tell it from a gateway's, it comes from a key check that
                # asks another service (whose outage or a key rotation rejects good keys for
                # a while), and with a really wrong key the takes fail too, so nothing new
                # comes in; retrying costs a request per backoff, giving up loses the answer.
                entry.last_error = f"{type(err).__name__}: {err}"
                retry_after_s = getattr(err, "retry_after_s", None)
                cause = _cause(err)
                failed = self.counters.failed_attempts
                failed[cause] = failed.get(cause, 0) + 1
                self._failing = True
            else:
                self.counters.delivered += 1
                if entry.attempts > 1:
                    logger.info(
                        "complete of %s delivered after %d attempts",
                        entry.task_id,
                        entry.attempts,
                        extra={"task_id": entry.task_id, "attempt": entry.attempts},
                    )
                if self._failing:
                    # Bella-Queue is back: the others need not wait out their backoff.
                    self._failing = False
                    self._wake_all()
                return
            backoff_s = self._backoff_s(entry.attempts)
            if retry_after_s is not None:
                backoff_s = max(backoff_s, retry_after_s)
            left_s = max(0.0, entry.deadline - self._clock())
            delay_s = min(backoff_s, left_s)
            # One warning per answer, then one every tenth attempt: an outage must not flood.
            loud = entry.attempts == 1 or entry.attempts % 10 == 0
            log = logger.warning if loud else logger.debug
            log(
                "complete of %s failed (attempt %d): %s; retrying in %.2f s%s",
                entry.task_id,
                entry.attempts,
                entry.last_error,
                delay_s,
                "" if retry_after_s is None else f" (Retry-After {retry_after_s:g} s)",
                extra={"task_id": entry.task_id, "attempt": entry.attempts},
            )
            await self._pause(delay_s, min(retry_after_s or 0.0, left_s))

    async def _pause(self, delay_s: float, floor_s: float) -> None:
        """Wait ``delay_s``. A wake-up (another answer got through, or the replica stops)
        cuts the wait short, but never below ``floor_s``: the ``Retry-After`` the answer
        asked for (a rate-limiting gateway that let one answer through has not lifted its
        limit for the others)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        until = started + delay_s
        while True:
            left_s = until - loop.time()
            if left_s <= 0:
                return
            wake = self._wake
            try:
                await asyncio.wait_for(wake.wait(), left_s)
            except TimeoutError:
                return
            until = min(until, started + floor_s)

    def _wake_all(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    # -- hand-over ------------------------------------------------------------------------

    def hand_over(self) -> list[HandedOverAnswer]:
        """Stop delivering and return every answer not yet delivered nor given up, oldest
        first, as plain picklable dicts for another replica's :meth:`adopt`.

        The outbox is closed afterwards: a later :meth:`complete`, or one waiting for room
        now, is refused with ``QueueUnavailableError`` (logged, counted undelivered_at_stop),
        as after :meth:`drain`; so hand over after the runners have answered. An attempt in
        flight is abandoned: if it did reach Bella-Queue, the adopter's repeat of it is a
        no-op there (complete is idempotent, §1.5). Call it on the outbox's event loop.
        """
        self._closed = True
        handed: list[HandedOverAnswer] = []
        for task_id, entry in list(self._entries.items()):  # in order of admission
            job = self._jobs.pop(task_id, None)
            self._drop(task_id)
            if job is not None:
                if job.done() and not job.cancelled() and job.exception() is None:
                    continue  # delivered or given up just now (counted there)
                job.cancel()
            handed.append(
                HandedOverAnswer(
                    task_id=task_id,
                    result=dict(entry.result),
                    deadline=entry.deadline,
                    level=entry.level,
                    attempts=entry.attempts,
                )
            )
        self.counters.handed_over += len(handed)
        self._gauges()
        self._signal_room()
        if handed:
            logger.info(
                "outbox handed over %d undelivered answers: %s",
                len(handed),
                _some_ids(a["task_id"] for a in handed),
            )
        return handed

    def adopt(self, answers: Iterable[Mapping[str, Any]]) -> int:
        """Deliver answers another outbox handed over (:meth:`hand_over`), keeping their
        deadlines and attempt counts; returns how many were taken.

        An answer for a task already waiting here replaces it, as :meth:`complete` does, so
        one task never has two deliveries. One past its deadline is given up at once (logged
        at ERROR, counted expired). The bounds do not apply: these answers exist already and
        refusing them would lose them; the figures show the overshoot until they go.
        Raises ``QueueUnavailableError`` (taking none) when this outbox is closed, so the
        caller can try another one, and ``ValueError`` (taking none) for a malformed entry.
        Call it on the outbox's event loop.
        """
        entries = [_entry_of(answer) for answer in answers]
        if self._closed:
            raise QueueUnavailableError("this outbox is closed: it cannot adopt answers")
        for entry in entries:
            self.counters.adopted += 1
            self._enqueue(entry)
        if entries:
            logger.info(
                "outbox adopted %d undelivered answers: %s",
                len(entries),
                _some_ids(e.task_id for e in entries),
            )
        return len(entries)

    def _give_up(self, entry: OutboxEntry, reason: str, detail: str) -> None:
        if reason == "expired":
            self.counters.expired += 1
        elif reason == "rejected":
            self.counters.rejected += 1
        else:
            self.counters.undelivered_at_stop += 1
        self.counters.by_reason[reason] = self.counters.by_reason.get(reason, 0) + 1
        self.metrics.inc("complete_given_up", reason=reason)
        if entry.level == 1:
            follows = (
                "a level-1 task: the server redelivers it after its process_timeout when the "
                "take set one, otherwise it stays unanswered"
            )
        elif entry.level == 0:
            follows = "a level-0 task: the server never redelivers it, this answer is lost"
        else:
            follows = "level unknown"
        logger.error(
            "complete of %s given up (%s) after %d attempts: %s; %s",
            entry.task_id,
            reason,
            entry.attempts,
            detail,
            follows,
            extra={"task_id": entry.task_id, "attempt": entry.attempts},
        )

    def _drop(self, task_id: str) -> None:
        entry = self._entries.pop(task_id, None)
        self._admitted_at.pop(task_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def _finished(self, task_id: str, job: asyncio.Task[None]) -> None:
        if self._jobs.get(task_id) is job:
            del self._jobs[task_id]
            self._drop(task_id)
        if not job.cancelled() and job.exception() is not None:
            logger.error(
                "complete delivery crashed", exc_info=job.exception(), extra={"task_id": task_id}
            )
        self._gauges()
        self._signal_room()

    def _signal_room(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    def _gauges(self) -> None:
        self.metrics.set("outbox_entries", float(len(self._entries)))
        self.metrics.set("outbox_bytes", float(self._bytes))

    # -- stop -----------------------------------------------------------------------------

    async def settle(self, timeout_s: float) -> int:
        """Deliver what is waiting within ``timeout_s`` (backoff capped short meanwhile) and
        keep what is left, for :meth:`hand_over` or :meth:`drain`. Returns how many are left."""
        self._draining = True
        self._wake_all()
        jobs = list(self._jobs.values())
        if jobs:
            await asyncio.wait(jobs, timeout=max(0.0, timeout_s))
        return len(self._entries)

    async def drain(self, timeout_s: float) -> int:
        """Deliver what is waiting within ``timeout_s`` (:meth:`settle`); give up the rest,
        each logged at ERROR with its task id. Returns how many were given up."""
        await self.settle(timeout_s)
        self._closed = True
        self._signal_room()
        pending = [job for job in self._jobs.values() if not job.done()]
        left = 0
        for job in pending:
            task_id = job.get_name().removeprefix("complete-")
            entry = self._entries.get(task_id)
            job.cancel()
            if entry is not None:
                left += 1
                self._give_up(
                    entry,
                    "undelivered_at_stop",
                    f"the replica's drain time ran out ({entry.last_error or 'no answer yet'})",
                )
        if pending:
            await asyncio.wait(pending, timeout=5)
        return left

    def lost(self, answers: Iterable[Mapping[str, Any]], detail: str) -> None:
        """Give up answers :meth:`hand_over` returned that no other outbox took (logged at
        ERROR per task id, counted undelivered_at_stop)."""
        for answer in answers:
            entry = _entry_of(answer)
            self._give_up(entry, "undelivered_at_stop", detail)


def _some_ids(task_ids: Iterable[str], shown: int = 20) -> str:
    """The first ``shown`` task ids, for a log line that must stay short."""
    ids = list(task_ids)
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _cause(err: Exception) -> str:
    """A short name for why an attempt failed (the ``failed_attempts`` counter)."""
    if isinstance(err, QueueGatewayError):
        return f"gateway_{err.status_code}"
    if isinstance(err, AuthenticationError):
        return "unauthorized"
    if isinstance(err, QueueUnavailableError):
        return "unreachable" if err.status_code is None else f"http_{err.status_code}"
    return type(err).__name__


def _entry_of(answer: Mapping[str, Any]) -> OutboxEntry:
    """An :class:`OutboxEntry` from a handed-over answer; ``ValueError`` if malformed."""
    try:
        task_id = answer["task_id"]
        result = answer["result"]
        deadline = float(answer["deadline"])
        level = answer.get("level")
        attempts = int(answer.get("attempts", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a handed-over answer: {exc!r}") from None
    if not isinstance(task_id, str) or not task_id or not isinstance(result, Mapping):
        raise ValueError("a handed-over answer needs a task_id string and a result mapping")
    if level is not None and not isinstance(level, int):
        raise ValueError(f"a handed-over answer's level must be an int, got {level!r}")
    body = dict(result)
    size = len(json.dumps(body, separators=(",", ":"), default=str).encode())
    return OutboxEntry(task_id, body, size, deadline, level, attempts=max(0, attempts))
