"""Caller-side event batcher: coalesces events for a remote publisher, one send in flight.

Runs in the callers (an LLM replica's task runner, the poller), never in the publisher actor.
This module owns ``EventBatcher``, which ``client.EventBusClient`` (or a test, or a benchmark)
uses to ship encoded stream entries without one remote call per token. It must not import
Ray or redis-py, or know where its batches go: the ``send`` function it is given decides.

At most one ``send`` is in flight; the first event after an idle period leaves at once,
later events gather into the next batch, sent once the in-flight call returned and
``min_interval_s`` has passed since the previous send began (each send costs a remote call,
so coalescing saves far more than it delays). An urgent entry (a stream's first chunk, a
completion) does not wait for the interval. One
send in flight ⇒ per-task order holds across the hop. Each batch carries a sequence number
(1, 2, ... per client, the same on every retry of that batch), so a receiver can
acknowledge a resent batch without applying it twice (``send_seq``). Each entry carries its
task id and event id beside its fields (``shared.Entry``), so the receiver never parses a
payload. Failed sends are retried with backoff (``aio.Backoff``) for ``send_timeout_s``,
then surfaced to whoever awaits that batch (``completion()``, ``flush()``) and counted;
never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ray_worker.aio import Backoff
from ray_worker.bella.protocol import completion_fields, progress_fields, stream_key
from ray_worker.errors import EventBusUnavailableError
from ray_worker.eventbus.shared import Batch, Entry, describe

logger = logging.getLogger(__name__)

__all__ = [
    "EventBatcher",
    "EventBatcherStats",
    "SendFn",
    "SeqSendFn",
]

SendFn = Callable[[Batch], Awaitable[object]]
"""What ``EventBatcher`` calls to ship a batch, e.g. ``handle.publish.remote``."""

SeqSendFn = Callable[[int, Batch], Awaitable[object]]
"""Like ``SendFn`` with the batch's sequence number first (the same on every retry)."""


def _unsequenced(send: SendFn) -> SeqSendFn:
    async def send_seq(_seq: int, batch: Batch) -> object:
        return await send(batch)

    return send_seq


@dataclass
class EventBatcherStats:
    """Counters of an ``EventBatcher``."""

    sent_batches: int = 0
    sent_events: int = 0
    send_retries: int = 0
    failed_batches: int = 0
    failed_events: int = 0
    pending: int = 0
    largest_batch: int = 0
    last_error: str | None = None


class _Batch:
    __slots__ = ("done", "entries", "error", "urgent")

    def __init__(self) -> None:
        self.entries: Batch = []
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        self.urgent = False


class EventBatcher:
    """Coalesces events into batches for a remote publisher, one ``send`` in flight.

    Give exactly one of ``send(batch)``, which ships a list of entries (``shared.Entry``:
    ``(stream_key, fields, task_id, event_id)``; e.g. ``lambda b: handle.publish.remote(b)``),
    or ``send_seq(seq, batch)``, which also gets the batch's sequence number (1, 2, ...;
    unchanged when a batch is retried).
    ``topic`` is the event-bus topic used by ``progress``/``completion`` to build stream keys.
    """

    def __init__(
        self,
        send: SendFn | None = None,
        *,
        send_seq: SeqSendFn | None = None,
        topic: str = "",
        max_pending: int = 2000,
        send_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 1.0,
        min_interval_s: float = 0.0,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if send is not None and send_seq is None:
            send_seq = _unsequenced(send)
        elif send_seq is None or send is not None:
            raise ValueError("give exactly one of send and send_seq")
        self.topic = topic
        self._send = send_seq
        self._batch_seq = 0
        self._max_pending = max_pending
        self._send_timeout_s = send_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._next = _Batch()
        self._inflight: _Batch | None = None
        self._sender: asyncio.Task[None] | None = None
        self._space = asyncio.Event()
        self._closed = False
        self._stats = EventBatcherStats()
        self._min_interval_s = min_interval_s
        self._last_send = -min_interval_s
        self._wake = asyncio.Event()

    async def emit(
        self, key: str, fields: dict[str, str], task_id: str = "", event_id: str = ""
    ) -> None:
        """Queue one already encoded entry of task ``task_id`` (event ``event_id``; "" for a
        completion); starts a send at once if none is in flight.

        Waits only while ``max_pending`` entries are already waiting for the next send.
        """
        await self._enqueue((key, fields, task_id, event_id))

    async def progress(
        self, instance_id: str, task_id: str, event_id: str, event_name: str, event_data: Any
    ) -> int:
        """Encode and queue a progress event (hot path: one per token chunk); returns the
        sequence number of the batch it goes out with.

        A stream's first event (``event_id`` "0") leaves without waiting for the interval.
        """
        await self._enqueue(
            (
                stream_key(self.topic, instance_id),
                progress_fields(task_id, event_id, event_name, event_data),
                task_id,
                event_id,
            ),
            urgent=event_id == "0",
        )
        return self.next_seq  # nothing ran since it was queued: it is in the gathering batch

    async def completion(
        self,
        instance_id: str,
        task_id: str,
        result: Mapping[str, Any],
        on_queued: Callable[[int], None] | None = None,
    ) -> None:
        """Queue a completion event and wait until its batch was handed over.

        ``on_queued`` is called with the sequence number of that batch as soon as the event
        is queued. Raises ``EventBusUnavailableError`` if the batch could not be sent.
        """
        batch = await self._enqueue(
            (stream_key(self.topic, instance_id), completion_fields(task_id, result), task_id, ""),
            urgent=True,
        )
        if on_queued is not None:
            on_queued(self.next_seq)
        await self._wait(batch)

    async def flush(self) -> None:
        """Wait until every entry queued so far was sent; raise if any such batch failed."""
        batches = [b for b in (self._inflight, self._next) if b is not None and b.entries]
        self._next.urgent = True
        self._wake.set()
        errors = []
        for batch in batches:
            try:
                await self._wait(batch)
            except EventBusUnavailableError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def aclose(self) -> None:
        """Flush, then refuse further events."""
        try:
            await self.flush()
        finally:
            self._closed = True

    def stats(self) -> dict[str, Any]:
        """Counters as a plain dict."""
        self._stats.pending = len(self._next.entries)
        return asdict(self._stats)

    @property
    def next_seq(self) -> int:
        """The sequence number the batch now gathering will be sent with."""
        return self._batch_seq + 1

    @property
    def sent_seq(self) -> int:
        """The sequence number of the last batch taken for sending (in flight or sent)."""
        return self._batch_seq

    def discard(self, task_ids: Collection[str]) -> int:
        """Drop the not yet acknowledged entries (in flight and gathering) of ``task_ids``;
        returns how many. An in-flight batch that is resent goes without them."""
        dropped = 0
        for batch in (self._inflight, self._next):
            if batch is None or batch.done.is_set():
                continue
            kept = [e for e in batch.entries if e[2] not in task_ids]
            dropped += len(batch.entries) - len(kept)
            batch.entries[:] = kept
        return dropped

    def push(self, entries: Batch) -> int:
        """Queue ``entries`` at once, urgent, not waiting for ``max_pending`` (for a few
        entries the caller must not block on, e.g. answers written on a send path); returns
        the sequence number of the batch they go out with."""
        if self._closed:
            raise EventBusUnavailableError("event batcher is closed")
        if not entries:
            return self.next_seq
        self._next.entries.extend(entries)
        self._next.urgent = True
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name="event-bus-client-sender"
            )
            self._sender.add_done_callback(self._sender_done)
        return self.next_seq

    # ---------------------------------------------------------------- internals

    async def _enqueue(self, entry: Entry, urgent: bool = False) -> _Batch:
        if self._closed:
            raise EventBusUnavailableError("event batcher is closed")
        while len(self._next.entries) >= self._max_pending:
            self._space.clear()
            await self._space.wait()
        batch = self._next
        batch.entries.append(entry)
        if urgent:
            batch.urgent = True
            self._wake.set()
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name="event-bus-client-sender"
            )
            self._sender.add_done_callback(self._sender_done)
        return batch

    async def _wait(self, batch: _Batch) -> None:
        await batch.done.wait()
        if batch.error is not None:
            raise EventBusUnavailableError(
                f"event batch not delivered to the publisher: {describe(batch.error)}"
            ) from batch.error

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next.entries:
            wait = self._last_send + self._min_interval_s - loop.time()
            if wait > 0 and not self._next.urgent:
                # Gather more: the interval since the previous send has not passed yet.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            self._last_send = loop.time()
            batch, self._next = self._next, _Batch()
            self._inflight = batch
            self._space.set()
            self._batch_seq += 1
            try:
                await self._send_with_retry(self._batch_seq, batch.entries)
            except asyncio.CancelledError:
                batch.error = EventBusUnavailableError("event batcher sender was cancelled")
                raise
            except Exception as exc:
                batch.error = exc
                self._stats.failed_batches += 1
                self._stats.failed_events += len(batch.entries)
                self._stats.last_error = describe(exc)
                logger.error(
                    "could not hand %d events to the event-bus publisher: %s",
                    len(batch.entries),
                    describe(exc),
                )
            else:
                self._stats.sent_batches += 1
                self._stats.sent_events += len(batch.entries)
                self._stats.largest_batch = max(self._stats.largest_batch, len(batch.entries))
            finally:
                self._inflight = None
                batch.done.set()
        self._sender = None

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        # The loop catches send errors; reaching here with an exception (or a cancel) means
        # nobody will send the pending batch: fail it so no awaiter hangs.
        if self._sender is task:
            self._sender = None
        error: BaseException
        if task.cancelled():
            error = EventBusUnavailableError("event batcher sender was cancelled")
        elif task.exception() is not None:
            error = task.exception()  # type: ignore[assignment]
            logger.error("event batcher sender died", exc_info=error)
        else:
            return
        for batch in (self._inflight, self._next):
            if batch is not None and not batch.done.is_set() and batch.entries:
                batch.error = error
                batch.done.set()
        self._next = _Batch()
        self._space.set()

    async def _send_with_retry(self, seq: int, entries: Batch) -> None:
        deadline = time.monotonic() + self._send_timeout_s
        backoff = Backoff(self._backoff_initial_s, self._backoff_max_s)
        attempt = 1
        while True:
            try:
                await self._send(seq, entries)
                return
            except Exception as exc:
                pause = backoff.next_s()
                if time.monotonic() + pause > deadline:
                    raise
                self._stats.send_retries += 1
                self._stats.last_error = describe(exc)
                logger.warning(
                    "event-bus publisher call failed (attempt %d), retrying: %s",
                    attempt,
                    describe(exc),
                )
                await asyncio.sleep(pause)
                attempt += 1
