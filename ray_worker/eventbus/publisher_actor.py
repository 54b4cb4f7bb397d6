"""Event-bus publisher actor: the per-node ``RedisPublisher`` Ray actor.

Runs in the publisher actor's own process (one per node and app), never in a caller. This
module owns that actor: its leases, its per-client batch sequence marks and written marks,
and its exit once no client is left. It must not talk to Redis itself (that is
``redis_writer``), batch events (``batching``), or hold caller code (``client``, which
creates the actor by this class and calls it), or import ``ray.serve``.

``RedisPublisher``
    Not owned by whoever created it (``lifetime="detached"``), so it outlives a poller or
    replica restart. Clients take leases (``lease``/``release``, renewed in the background);
    once it has had a lease and none is alive any more, it waits ``exit_grace_s`` (a
    replacement replica may attach during a redeploy), drains within ``drain_timeout_s``
    and exits, so nothing is left running when the app is gone. ``publish(client_id,
    batch_seq, batch)`` returns once the batch is buffered; it remembers the last
    ``batch_seq`` applied per client and acknowledges a resent batch without buffering it
    again. One actor per node: two actors could reorder one task's consecutive batches.

    Entries. A batch holds ``shared.Entry`` items, each tagged with its task id and event id
    by the client, so neither the actor nor the writer reads a payload. ``target()`` says so
    (``"tagged_entries": True``), and a client only sends tagged entries to an actor that
    says it: one of the previous version (a detached actor outlives a redeploy) gets bare
    ``(key, fields)`` pairs. A bare batch from a client of the previous version is tagged
    here (``shared.tagged``, which reads the payload: that version's clients only).

    Written mark. The actor remembers, per client, which writer entries each accepted batch
    became, and reports the client's mark N: every batch of that client up to seq N is
    acknowledged by Redis (``StreamWriter.written_upto``; an entry given up or rejected is
    not written and stops the mark below it for the rest of that writer's life, so after an
    outage's give-up, a rejection, or a replaced writer (``configure``) no later batch is
    reported written). The mark comes with every ``publish`` reply (``(status, mark)``;
    ``"exiting"`` stays a plain string) and every lease renewal (``(True, mark)``, every
    ``lease_ttl_s / 3``), so it also advances while the client's streams are idle.

    The actor exits when its writer loop dies (a bug): clients see it gone, and
    ``client.node_publisher`` makes a fresh one by name.

    Clock: a client passes Bella-Queue's clock offset with each lease; the actor trims
    (``MINID``) by it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import ray

from ray_worker.bella.protocol import now_ms, redact_url
from ray_worker.config import PublisherOptions
from ray_worker.errors import EventBusUnavailableError
from ray_worker.eventbus.redis_writer import StreamWriter
from ray_worker.eventbus.shared import (
    ACCEPTED,
    DUPLICATE,
    EXITING,
    BareEntry,
    Batch,
    describe,
    tagged,
)
from ray_worker.metrics import WorkerMetrics
from ray_worker.proc import tolerate_surrogates_in_output

logger = logging.getLogger(__name__)

__all__ = ["RedisPublisher"]

_LEASE_CHECK_INTERVAL_S = 0.25


class RedisPublisher:
    """The Ray actor around one ``StreamWriter`` (see the module docstring).

    ``url``/``topic`` may come later through ``configure``. ``options`` is a
    ``PublisherOptions`` or its dict form. Get the node's one with ``client.node_publisher``.
    """

    def __init__(
        self,
        url: str | None = None,
        topic: str = "",
        options: PublisherOptions | Mapping[str, Any] | None = None,
        drain_timeout_s: float = 20.0,
        exit_grace_s: float = 5.0,
    ) -> None:
        tolerate_surrogates_in_output()
        self._options = (
            options
            if isinstance(options, PublisherOptions)
            else PublisherOptions.model_validate(dict(options or {}))
        )
        self._drain_timeout_s = drain_timeout_s
        self._exit_grace_s = exit_grace_s
        self._topic = topic
        self._metrics = WorkerMetrics()
        self._exported: dict[str, int] = {}
        self._publisher = self._make(url) if url else None
        self._leases: dict[str, float] = {}  # client id -> expiry (monotonic)
        self._lease_ttls: dict[str, float] = {}
        self._last_seq: dict[str, int] = {}
        self._unwritten: dict[str, deque[tuple[int, int]]] = {}
        """Per client, its batches not yet known written: (batch_seq, writer seq of its last
        entry), oldest first."""
        self._marks: dict[str, int] = {}
        """Per client, the written mark last computed (see ``EventBusClient``)."""
        self._marks_frozen = False
        """The writer was replaced (``configure``): marks no longer advance."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._idle_since: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._watchdog_error: BaseException | None = None
        self._exiting = False
        self._duplicates = 0
        self._clock_offset_ms = 0

    def _make(self, url: str) -> StreamWriter:
        return StreamWriter(
            url,
            self._options,
            on_acked=lambda s: self._metrics.observe("publish_latency_s", s),
            on_dead=self._writer_died,
            clock_ms=lambda: now_ms() + self._clock_offset_ms,
        )

    def _writer_died(self, exc: BaseException) -> None:
        """The writer loop died: what it buffered is lost, and a broken actor must not linger
        (clients would keep sending to it). Exit, so the next client makes a fresh one."""
        if self._exiting:
            return
        self._exiting = True
        logger.error("event-bus writer loop died (%s): the publisher actor exits", describe(exc))
        ray.get_runtime_context().current_actor._exit.remote()

    async def configure(self, url: str, topic: str) -> None:
        """Set (or replace) the Redis URL and topic; a previous publisher is drained first."""
        self._topic = topic
        if self._publisher is not None and self._publisher.url == url:
            return
        old, self._publisher = self._publisher, self._make(url)
        if old is not None:
            # The old writer's sequence numbers mean nothing to the new one, and what it
            # drains may be given up: no batch sent so far is ever reported written.
            self._marks_frozen = True
            self._unwritten.clear()
            await old.aclose(self._drain_timeout_s)
        logger.info("event-bus publisher configured for %s", redact_url(url))

    async def topic(self) -> str:
        """The event-bus topic (stream key prefix)."""
        return self._topic

    async def target(self) -> dict[str, Any]:
        """``{"url", "topic", "exiting", "tagged_entries"}``: where it writes, whether it is
        going away, and that it takes tagged entries (see the module docstring)."""
        url = self._publisher.url if self._publisher is not None else None
        return {"url": url, "topic": self._topic, "exiting": self._exiting, "tagged_entries": True}

    async def lease(
        self, client_id: str, ttl_s: float, clock_offset_ms: int | None = None
    ) -> tuple[bool, int] | bool:
        """Take or renew ``client_id``'s lease for ``ttl_s``: ``(True, written mark)``, or
        False once the actor is exiting.

        ``clock_offset_ms`` (Bella-Queue's clock minus ours, when the client knows it) sets the
        clock ``MINID`` trims by."""
        if clock_offset_ms is not None:
            self._clock_offset_ms = int(clock_offset_ms)
        if self._exiting:
            return False
        self._leases[client_id] = time.monotonic() + ttl_s
        self._lease_ttls[client_id] = ttl_s
        self._idle_since = None
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(), name="event-bus-publisher-leases"
            )
            self._watchdog.add_done_callback(self._watchdog_done)
        return True, self._written_mark(client_id)

    async def release(self, client_id: str) -> None:
        """Drop ``client_id``'s lease and its sequence mark (it sends nothing more)."""
        self._leases.pop(client_id, None)
        self._lease_ttls.pop(client_id, None)
        self._last_seq.pop(client_id, None)
        self._unwritten.pop(client_id, None)
        self._marks.pop(client_id, None)
        self._locks.pop(client_id, None)
        if not self._leases and self._idle_since is None:
            self._idle_since = time.monotonic()

    async def publish(
        self, client_id: str, batch_seq: int, batch: Batch | list[BareEntry]
    ) -> tuple[str, int] | str:
        """Buffer ``batch`` in order unless ``batch_seq`` was already applied for the client.

        ``batch`` holds tagged entries, or bare ``(key, fields)`` pairs from a client of the
        previous version (tagged here: see the module docstring).

        Returns ``("ok", mark)`` (buffered), ``("duplicate", mark)`` (a resend, acknowledged,
        not buffered again) or ``"exiting"`` (not taken: resend to the node's next
        publisher); ``mark`` is the client's written mark (``client.EventBusClient``). Waits
        while the buffer is full.
        """
        if self._exiting:
            return EXITING
        entries = cast("Batch", batch)
        if batch and len(batch[0]) == 2:
            entries = [tagged(key, fields) for key, fields in batch]
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
        # One send in flight per client, but a resend after a caller-side timeout can arrive
        # while the first call still waits for buffer space: the lock orders the two.
        async with lock:
            if batch_seq <= self._last_seq.get(client_id, 0):
                self._duplicates += 1
                return DUPLICATE, self._written_mark(client_id)
            publisher = self._require()
            try:
                last_entry = await publisher.publish(entries)
            except EventBusUnavailableError:
                if self._exiting:
                    return EXITING
                raise
            self._last_seq[client_id] = batch_seq
            if not self._marks_frozen and not publisher.lost_writes:
                # Once an entry was not written, no later batch is ever reported written
                # (the writer's mark stays below it), so none is remembered.
                self._unwritten.setdefault(client_id, deque()).append((batch_seq, last_entry))
        ttl = self._lease_ttls.get(client_id)
        if ttl is not None and client_id in self._leases:
            self._leases[client_id] = time.monotonic() + ttl  # a publish proves it is alive
        return ACCEPTED, self._written_mark(client_id)

    def _written_mark(self, client_id: str) -> int:
        """The highest ``batch_seq`` N of ``client_id`` such that Redis acknowledged every
        entry of every batch up to N that this actor buffered (0: none known)."""
        mark = self._marks.get(client_id, 0)
        pending = self._unwritten.get(client_id)
        if pending and self._publisher is not None and not self._marks_frozen:
            upto = self._publisher.written_upto()
            while pending and pending[0][1] <= upto:
                mark = pending.popleft()[0]
            self._marks[client_id] = mark
        return mark

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything buffered so far is acknowledged or given up."""
        return await self._require().flush(timeout_s)

    async def delivery(self, task_ids: list[str], timeout_s: float) -> dict[str, bool]:
        """The settled completions among ``task_ids`` (True: Redis acknowledged it; False:
        given up), waiting up to ``timeout_s`` for a first one; see ``StreamWriter.delivery``."""
        return await self._require().delivery(task_ids, timeout_s)

    async def stats(self) -> dict[str, Any]:
        """Counters, latency summary and leases (``configured`` False before configure)."""
        own = {
            "leases": len(self._leases),
            "duplicates": self._duplicates,
            "exiting": self._exiting,
        }
        if self._publisher is None:
            return {"configured": False, **own}
        return {"configured": True, **self._publisher.stats(), **own}

    async def check_health(self) -> None:
        """Raise if the writer loop or the lease watchdog died (not once the actor is exiting:
        it is going away, and its clients move to the next one)."""
        if self._exiting:
            return
        if self._watchdog_error is not None:
            raise EventBusUnavailableError(
                f"publisher lease watchdog died: {describe(self._watchdog_error)}"
            )
        if self._publisher is not None:
            self._publisher.check_health()

    async def aclose(self) -> None:
        """Drain what is buffered (up to ``drain_timeout_s``), then close the connection."""
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.aclose(self._drain_timeout_s)

    async def _exit(self) -> None:
        # Called through our own handle so exit_actor() raises inside an actor task, where
        # Ray turns it into a clean exit (raised in a background asyncio task it only logs
        # "Task exception was never retrieved").
        ray.actor.exit_actor()  # type: ignore[no-untyped-call]

    def _require(self) -> StreamWriter:
        if self._publisher is None:
            raise EventBusUnavailableError("event-bus publisher is not configured yet")
        return self._publisher

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(_LEASE_CHECK_INTERVAL_S, max(self._exit_grace_s, 0.01)))
            self._export_drops()
            now = time.monotonic()
            for client_id, expires in list(self._leases.items()):
                if expires <= now:
                    logger.warning("event-bus lease of %s expired without release", client_id)
                    del self._leases[client_id]
            if self._leases:
                continue
            if self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since >= self._exit_grace_s:
                break
        self._exiting = True
        logger.info(
            "event-bus publisher has no client left for %.1f s: draining and exiting",
            self._exit_grace_s,
        )
        await self.aclose()
        ray.get_runtime_context().current_actor._exit.remote()

    def _export_drops(self) -> None:
        """What the writer gave up, as counters operators see (``publish_failures`` by kind,
        ``tasks_given_up``)."""
        if self._publisher is None:
            return
        stats = self._publisher.stats()
        for name, kind in (
            ("dropped_progress", "progress"),
            ("dropped_completions", "completion"),
            ("dropped_tasks", None),
        ):
            delta = int(stats.get(name, 0)) - self._exported.get(name, 0)
            if delta <= 0:
                continue
            self._exported[name] = self._exported.get(name, 0) + delta
            if kind is None:
                self._metrics.inc("tasks_given_up", delta)
            else:
                self._metrics.inc("publish_failures", delta, kind=kind)

    def _watchdog_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._watchdog_error = task.exception()
            logger.error("event-bus publisher lease watchdog died", exc_info=self._watchdog_error)
