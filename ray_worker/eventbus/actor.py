"""Event-bus Ray side: the per-node ``RedisPublisher`` actor and ``EventBusClient``.

This module owns where events cross a Ray hop: the ``RedisPublisher`` actor (one per node
and app, detached and named, around one ``writer.EventPublisher``), ``node_publisher``
(get-or-create the calling node's actor by name) and ``EventBusClient`` (the event sink an
LLM replica's task runner or the poller uses). It must not talk to Redis itself (that is
``writer``), batch events itself (``batcher``), or import ``ray.serve``.

``RedisPublisher``
    Not owned by whoever created it (``lifetime="detached"``), so it outlives a poller or
    replica restart. Clients take leases (``lease``/``release``, renewed in the background);
    once it has had a lease and none is alive any more, it waits ``exit_grace_s`` (a
    replacement replica may attach during a redeploy), drains within ``drain_timeout_s``
    and exits, so nothing is left running when the app is gone. ``publish(client_id,
    batch_seq, batch)`` returns once the batch is buffered; it remembers the last
    ``batch_seq`` applied per client and acknowledges a resent batch without buffering it
    again. One actor per node: two actors could reorder one task's consecutive batches.

``EventBusClient``
    Wraps a ``batcher.PublisherClient`` (one send in flight, so per-task order holds) whose
    send calls this node's actor. ``ActorUnavailableError`` and call timeouts are transient:
    the same batch seq is resent to the same handle. A dead actor is re-resolved by name
    (get-or-create: never two live actors of one name), leased again, and the same batch seq
    is resent. What a dead actor had buffered but not yet written to Redis is lost, and a
    batch it had written whose reply never came back is written again by its successor
    (the successor does not know the dead one's sequence marks): exactly-once holds across
    transient failures, not across an actor's death.

    Written mark. The actor remembers, per client, which writer entries each accepted batch
    became, and reports the client's mark N: every batch of that client up to seq N is
    acknowledged by Redis (``EventPublisher.written_upto``; an entry given up or rejected is
    not written and stops the mark below it for the rest of that writer's life, so after an
    outage's give-up, a rejection, or a replaced writer (``configure``) no later batch is
    reported written). The mark comes with every ``publish`` reply (``(status, mark)``;
    ``"exiting"`` stays a plain string) and every lease renewal (``(True, mark)``, every
    ``lease_ttl_s / 3``), so it also advances while the client's streams are idle; the
    client keeps the highest mark heard from the actor in use. Replies without a mark (an
    actor of an older version) leave it where it was: every batch then counts as unwritten.
    Per task the client keeps only the seq of the batch its last event went out with (and
    the one before, as that batch may still be gathering): O(1) per event.

    After a re-attach, each task still open is settled by the dead actor's mark M and the
    last batch sent to it S (in flight or acknowledged; a batch in flight may or may not
    have been applied, so it counts as unwritten):

    - its events sent are all in batches up to M: nothing of it was lost. A stream carries
      on through the new actor (its later events and completion go out as usual, and a
      gapless stream ends ``[DONE]`` + 200; ``stats()["streams_kept"]``); a completion
      already handed over was written, so it is not sent again and ``completion()``
      returns as delivered (``completions_written``).
    - it had an event in a batch in (M, S]: its events not yet acknowledged are withdrawn
      from the batcher; a task with progress events (a stream) gets an error chunk
      (``eventId`` after the last one it queued) and a 503 completion (``code:
      events_lost``) instead of whatever it had left, and its later events, its own
      completion included, are dropped (``events_lost``); a task without (blocking) whose
      completion was handed over gets that completion sent again (``completions_resent``;
      the server keeps the first completion of a task and drops a second one, §4.4). A
      stream already ended so whose error answer went to the dead actor unwritten gets the
      same answer again (``lost_answers_resent``).

    Everything up to S then counts as settled. Either way the caller's ``completion()``
    returns once the completion sent for the task is acknowledged. Every confirmation wait
    has a deadline (``confirm_timeout_s``). A task the dead actor gave up whole in a Redis
    outage always has an event above M (the mark stops at the first entry given up), so it
    is settled as above: if the dead actor had already written its own 503 answer (see
    ``writer``), this second answer is dropped by the server (§4.4), and one it had not
    written yet is not lost with it.

    The actor exits when its writer loop dies (a bug): clients see it gone, and
    ``node_publisher`` makes a fresh one by name.

    Clock: the client passes Bella-Queue's clock offset (``clock``, a
    ``bella.clock.ServerClock``) with each lease; the actor trims (``MINID``) by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from ray_worker.bella.clock import ServerClock
from ray_worker.bella.protocol import (
    completion_fields,
    now_ms,
    redact_url,
    stream_key,
)
from ray_worker.config import PublisherOptions
from ray_worker.errors import EventBusUnavailableError, EventsGivenUpError
from ray_worker.eventbus.batcher import (
    Batch,
    PublisherClient,
    entry_task_id,
    lost_events_answer,
)
from ray_worker.eventbus.writer import EventPublisher
from ray_worker.metrics import WorkerMetrics
from ray_worker.proc import tolerate_surrogates_in_output

logger = logging.getLogger(__name__)

__all__ = [
    "PUBLISHER_NAMESPACE",
    "EventBusClient",
    "RedisPublisher",
    "node_publisher",
    "publisher_name",
]

PUBLISHER_NAMESPACE = "bella-ray-worker"
"""Ray namespace of the named per-node publisher actors."""

ACCEPTED = "ok"
DUPLICATE = "duplicate"
EXITING = "exiting"
# What RedisPublisher.publish answers: buffered, already had it (each with the client's
# written mark: ``(status, mark)``), or going away (the plain string: resend to the node's
# next publisher).

_LEASE_CHECK_INTERVAL_S = 0.25


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def publisher_name(app_name: str, node_id: str) -> str:
    """The Ray actor name of ``app_name``'s publisher on node ``node_id``."""
    return f"event-publisher:{app_name}:{node_id}"


class RedisPublisher:
    """The Ray actor around one ``EventPublisher`` (see the module docstring).

    ``url``/``topic`` may come later through ``configure``. ``options`` is a
    ``PublisherOptions`` or its dict form. Get the node's one with ``node_publisher``.
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

    def _make(self, url: str) -> EventPublisher:
        return EventPublisher(
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
        logger.error("event-bus writer loop died (%s): the publisher actor exits", _describe(exc))
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
        """``{"url", "topic", "exiting"}``: where it writes, and whether it is going away."""
        url = self._publisher.url if self._publisher is not None else None
        return {"url": url, "topic": self._topic, "exiting": self._exiting}

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

    async def publish(self, client_id: str, batch_seq: int, batch: Batch) -> tuple[str, int] | str:
        """Buffer ``batch`` in order unless ``batch_seq`` was already applied for the client.

        Returns ``("ok", mark)`` (buffered), ``("duplicate", mark)`` (a resend, acknowledged,
        not buffered again) or ``"exiting"`` (not taken: resend to the node's next
        publisher); ``mark`` is the client's written mark (``EventBusClient``). Waits while
        the buffer is full.
        """
        if self._exiting:
            return EXITING
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
                last_entry = await publisher.publish(batch)
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
        given up), waiting up to ``timeout_s`` for a first one; see ``EventPublisher.delivery``."""
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
                f"publisher lease watchdog died: {_describe(self._watchdog_error)}"
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

    def _require(self) -> EventPublisher:
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


@functools.cache
def _actor_class() -> Any:
    return ray.remote(RedisPublisher)


def node_publisher(
    app_name: str,
    url: str,
    topic: str,
    options: PublisherOptions | None = None,
    *,
    drain_timeout_s: float = 20.0,
    exit_grace_s: float = 5.0,
    timeout_s: float = 30.0,
) -> Any:
    """Get or create the ``RedisPublisher`` of the calling process's node; returns its handle.

    Blocking (run it in a thread from async code). The actor is named
    ``publisher_name(app_name, node_id)`` in ``PUBLISHER_NAMESPACE``, detached, pinned to
    this node, takes no CPU slot (it only waits on Redis). An existing one writing elsewhere
    is reconfigured to ``url``/``topic``; one that is exiting is waited out (then a new one
    is created). Raises ``EventBusUnavailableError`` after ``timeout_s``.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    name = publisher_name(app_name, node_id)
    deadline = time.monotonic() + timeout_s
    while True:
        handle = (
            _actor_class()
            .options(
                name=name,
                namespace=PUBLISHER_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=1000,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(url, topic, options, drain_timeout_s, exit_grace_s)
        )
        left = max(deadline - time.monotonic(), 0.5)
        try:
            current = ray.get(handle.target.remote(), timeout=left)
            if not current["exiting"]:
                if (current["url"], current["topic"]) != (url, topic):
                    ray.get(handle.configure.remote(url, topic), timeout=left)
                return handle
            error: BaseException | None = None
        except (RayActorError, ray.exceptions.GetTimeoutError) as exc:
            error = exc  # died or exiting under us: the name frees once it is gone
        if time.monotonic() >= deadline:
            raise EventBusUnavailableError(
                f"no event-bus publisher on node {node_id} within {timeout_s} s"
                + (f": {_describe(error)}" if error else " (the old one is still exiting)")
            )
        time.sleep(0.1)


class _Track:
    """What an ``EventBusClient`` knows of one open task (see the module docstring)."""

    __slots__ = (
        "instance_id",
        "last_seq",
        "lost",
        "next_event_id",
        "prev_seq",
        "result",
        "streaming",
        "written",
    )

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.last_seq = 0
        """The batch sequence number its last event goes out with (0: none yet)."""
        self.prev_seq = 0
        """The one its events went out with before that batch (0: none)."""
        self.written = False
        """Its completion is known written (its batch was at or below the written mark of a
        publisher that died): nobody can be asked about it any more."""
        self.next_event_id = 0
        self.streaming = False
        """It had progress events (only streaming tasks do)."""
        self.result: Mapping[str, Any] | None = None
        """Its completion's result once handed to the batcher."""
        self.lost = False
        """Ended with an error answer: its events reached a publisher that died."""

    def went_with(self, seq: int) -> None:
        """An event of it was queued in batch ``seq``."""
        if seq != self.last_seq:
            self.prev_seq, self.last_seq = self.last_seq, seq

    def sent_upto(self, sent_seq: int) -> int:
        """The last batch up to ``sent_seq`` (the last one taken for sending) that held an
        event of it (0: none). Only the gathering batch comes after ``sent_seq``."""
        return self.last_seq if self.last_seq <= sent_seq else self.prev_seq


_TRACKS_MAX = 100_000
LOST_MESSAGE = "the worker's event-bus publisher was lost; some of this stream's events were lost"


class _Waiter:
    __slots__ = ("deadline", "future")

    def __init__(self, future: asyncio.Future[bool], deadline: float) -> None:
        self.future = future
        self.deadline = deadline


class EventBusClient:
    """The event sink of one task runner or poller: events to this node's publisher actor.

    ``client_id`` names the caller in logs and leases (e.g. the replica id); a random
    suffix is added per instance (``session``) so a restarted caller with the same id is
    never mistaken for a resend of the old one. ``progress`` only enqueues (no Ray call per
    event); ``completion`` waits until Redis acknowledged it, at most ``confirm_timeout_s``
    (default: the publisher's ``outage_timeout_s`` + 60 s). ``clock`` (Bella-Queue's clock
    as the caller sees it) makes the publisher trim by the server's time.
    """

    def __init__(
        self,
        app_name: str,
        client_id: str,
        options: PublisherOptions | None = None,
        *,
        call_timeout_s: float = 10.0,
        lease_ttl_s: float = 15.0,
        confirm_timeout_s: float | None = None,
        clock: ServerClock | None = None,
    ) -> None:
        self.app_name = app_name
        self.client_id = client_id
        self.options = options
        self.session = f"{client_id}#{uuid.uuid4().hex[:8]}"
        self._call_timeout_s = call_timeout_s
        self._lease_ttl_s = lease_ttl_s
        self._confirm_timeout_s = (
            confirm_timeout_s
            if confirm_timeout_s is not None
            else (options or PublisherOptions()).outage_timeout_s + 60.0
        )
        self._clock = clock
        self._url = ""
        self._topic = ""
        self._actor: Any = None
        self._batcher: PublisherClient | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._unconfirmed: dict[str, _Waiter] = {}
        """Completions handed over, waiting for Redis' acknowledgement (by task id)."""
        self._tracks: dict[str, _Track] = {}
        """Open tasks (an event queued, the completion not yet returned), oldest first."""
        self._confirmer: asyncio.Task[None] | None = None
        self._mark = 0
        """Written mark: every batch up to this sequence number is in Redis (or was settled
        at a re-attach); see the module docstring."""
        self._resolve_lock = asyncio.Lock()
        self._closed = False
        self._counters = {
            "transient_retries": 0,
            "reattached": 0,
            "duplicates_acked": 0,
            "lease_renew_failures": 0,
            "confirm_retries": 0,
            "confirm_timeouts": 0,
            "unconfirmed_lost": 0,
            "events_lost": 0,
            "completions_resent": 0,
            "completions_written": 0,
            "streams_kept": 0,
            "lost_answers_resent": 0,
            "dropped_after_loss": 0,
        }

    @property
    def started(self) -> bool:
        """True between a successful ``start`` and ``aclose``."""
        return self._batcher is not None and not self._closed

    @property
    def actor(self) -> Any:
        """The handle of the publisher actor in use (None before ``start``)."""
        return self._actor

    async def start(self, url: str, topic: str) -> None:
        """Resolve this node's publisher actor, take a lease, start renewing it.

        Raises ``EventBusUnavailableError`` if no publisher could be had in time.
        """
        if self._batcher is not None:
            raise RuntimeError("EventBusClient.start() was already called")
        self._url, self._topic = url, topic
        await self._attach(None)
        self._batcher = PublisherClient(
            send_seq=self._send,
            topic=topic,
            send_timeout_s=max(30.0, 3 * self._call_timeout_s),
            min_interval_s=(self.options or PublisherOptions()).send_interval_ms / 1000,
        )
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew_loop(), name="event-bus-lease-renew"
        )
        self._renewer.add_done_callback(self._renewer_done)

    async def progress(
        self, instance_id: str, task_id: str, event_id: str, event_name: str, event_data: Any
    ) -> None:
        """Queue a progress event (hot path: one per chunk; no Ray call here).

        Dropped when the task was already ended with an error answer (its events reached a
        publisher that died)."""
        batcher = self._require()
        track = self._tracks.get(task_id)
        if track is None:
            track = self._track(task_id, instance_id)
        elif track.lost:
            self._counters["dropped_after_loss"] += 1
            return
        track.streaming = True
        if event_id.isdigit() and int(event_id) >= track.next_event_id:
            track.next_event_id = int(event_id) + 1
        seq = await batcher.progress(instance_id, task_id, event_id, event_name, event_data)
        if not track.lost:  # ended by a re-attach while it waited for room: answer is queued
            track.went_with(seq)

    async def completion(self, instance_id: str, task_id: str, result: Mapping[str, Any]) -> None:
        """Queue a completion event; return once Redis acknowledged it.

        The answer counts as delivered only then: until Redis is back (or the publisher gives
        the task up) the caller holds the task, so the poller takes no more for that slot.
        Raises ``EventsGivenUpError`` if the publisher gave it up (counted there), and
        ``EventBusUnavailableError`` if it could not be handed over or no acknowledgement
        came within ``confirm_timeout_s``. A task whose events reached a publisher that died
        was answered 503 instead (module docstring): this returns once that answer was
        acknowledged (``stats()["events_lost"]`` counts them).
        """
        batcher = self._require()
        track = self._tracks.get(task_id)
        if track is None:
            track = self._track(task_id, instance_id)

        def queued(seq: int) -> None:
            track.result = result
            track.went_with(seq)

        try:
            if not track.lost:
                await batcher.completion(instance_id, task_id, result, on_queued=queued)
            if track.written:
                return
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._unconfirmed[task_id] = _Waiter(future, time.monotonic() + self._confirm_timeout_s)
            try:
                if self._confirmer is None or self._confirmer.done():
                    self._confirmer = asyncio.get_running_loop().create_task(
                        self._confirm_loop(), name="event-bus-confirm"
                    )
                delivered = await future
            finally:
                waiter = self._unconfirmed.get(task_id)
                if waiter is not None and waiter.future is future:
                    del self._unconfirmed[task_id]
        finally:
            if self._tracks.get(task_id) is track:
                del self._tracks[task_id]
        if not delivered:
            raise EventsGivenUpError(f"the publisher gave up the completion of task {task_id}")
        if track.lost:
            logger.warning(
                "task %s was answered 503 (events_lost) instead: its events reached a "
                "publisher that died",
                task_id,
            )

    async def check_health(self) -> None:
        """Raise ``EventBusUnavailableError`` if this node's publisher is unhealthy and none
        can replace it: a dead one is replaced first (re-attach), so a caller's health check
        does not fail, and its replica restart, for a publisher that is simply gone."""
        actor = self._actor
        if actor is None:
            raise EventBusUnavailableError("event-bus client is not started")
        try:
            await asyncio.wait_for(actor.check_health.remote(), self._call_timeout_s)
        except RayActorError:
            await self._attach(actor)
        except TimeoutError:
            raise EventBusUnavailableError(
                f"the event-bus publisher did not answer within {self._call_timeout_s} s"
            ) from None
        except Exception as exc:
            raise EventBusUnavailableError(
                f"the event-bus publisher is unhealthy: {_describe(exc)}"
            ) from None

    async def flush(self) -> None:
        """Wait until everything queued so far was accepted; raise if a batch failed."""
        await self._require().flush()

    async def aclose(self, drain_timeout_s: float = 10.0) -> None:
        """Flush (within ``drain_timeout_s``), stop renewing and release the lease."""
        if self._closed:
            return
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        try:
            if self._batcher is not None:
                async with asyncio.timeout(drain_timeout_s):
                    await self._batcher.aclose()
        except (TimeoutError, EventBusUnavailableError) as exc:
            logger.error(
                "event-bus client %s closing with undelivered events: %s",
                self.client_id,
                _describe(exc),
            )
        finally:
            await self._stop_confirming()
            if self._actor is not None:
                try:
                    await asyncio.wait_for(
                        self._actor.release.remote(self.session), self._call_timeout_s
                    )
                except (RayActorError, TimeoutError) as exc:
                    # The lease then expires on its own.
                    logger.warning("could not release event-bus lease: %s", _describe(exc))

    def stats(self) -> dict[str, Any]:
        """Batcher counters plus retries, re-attachments and acknowledged duplicates."""
        out: dict[str, Any] = {"client_id": self.client_id, "started": self.started}
        if self._batcher is not None:
            out.update(self._batcher.stats())
        out.update(self._counters)
        out["unconfirmed"] = len(self._unconfirmed)
        out["open_tasks"] = len(self._tracks)
        out["written_mark"] = self._mark
        return out

    # ---------------------------------------------------------------- internals

    def _require(self) -> PublisherClient:
        if self._batcher is None:
            raise EventBusUnavailableError("event-bus client is not started")
        return self._batcher

    async def _send(self, seq: int, batch: Batch) -> None:
        """Ship batch ``seq``; raising makes the batcher back off and resend the same seq."""
        actor = self._actor
        for attempt in (1, 2):
            try:
                reply = await asyncio.wait_for(
                    actor.publish.remote(self.session, seq, batch), self._call_timeout_s
                )
            except (ActorUnavailableError, TimeoutError):
                # Maybe applied, maybe not: resend the same seq to the same actor later.
                self._counters["transient_retries"] += 1
                raise
            except RayActorError:
                if attempt == 2:
                    raise
                actor = await self._attach(actor)
                continue
            status = self._take_reply(actor, reply)
            if status == EXITING:
                if attempt == 2:
                    raise EventBusUnavailableError("event-bus publisher actor is exiting")
                actor = await self._attach(actor)
                continue
            if status == DUPLICATE:
                self._counters["duplicates_acked"] += 1
            return

    def _take_reply(self, actor: Any, reply: Any) -> Any:
        """A publish or lease reply: its status (``publish``) or grant (``lease``), the
        written mark it carries (if any, and from the handle in use) taken in."""
        if not isinstance(reply, tuple | list) or len(reply) != 2:
            return reply  # "exiting", False, or an actor of a version without marks
        status, mark = reply
        if actor is self._actor and isinstance(mark, int) and mark > self._mark:
            self._mark = mark
        return status

    def _track(self, task_id: str, instance_id: str) -> _Track:
        track = self._tracks[task_id] = _Track(instance_id)
        if len(self._tracks) > _TRACKS_MAX:
            del self._tracks[next(iter(self._tracks))]
        return track

    async def _confirm_loop(self) -> None:
        """Ask the publisher, one call at a time for every waiting completion, which ones
        Redis acknowledged; resolve each caller once its fate is known, or fail it once its
        ``confirm_timeout_s`` passed.

        A call that times out or finds the actor unavailable is repeated. A publisher that
        died is replaced (``_attach``, which also resends or replaces what it held), and the
        same completions are asked of the new one.
        """
        wait_s = min(5.0, self._call_timeout_s / 2)
        while self._unconfirmed:
            self._expire_waiters()
            if not self._unconfirmed:
                break
            actor = self._actor
            ids = list(self._unconfirmed)
            left = min(w.deadline for w in self._unconfirmed.values()) - time.monotonic()
            try:
                fates = await asyncio.wait_for(
                    actor.delivery.remote(ids, max(0.0, min(wait_s, left))),
                    self._call_timeout_s,
                )
            except (ActorUnavailableError, TimeoutError):
                self._counters["confirm_retries"] += 1
                await asyncio.sleep(0.1)
                continue
            except RayActorError as exc:
                self._counters["confirm_retries"] += 1
                logger.warning("event-bus publisher lost while confirming: %s", _describe(exc))
                try:
                    await self._attach(actor)
                except EventBusUnavailableError as attach_error:
                    logger.error("event-bus publisher lost: %s", _describe(attach_error))
                    await asyncio.sleep(0.5)
                continue
            except Exception as exc:
                # Anything else: the fate cannot be learned.
                self._fail_waiters(
                    ids, f"the event-bus publisher could not confirm delivery: {_describe(exc)}"
                )
                continue
            for task_id, delivered in fates.items():
                waiter = self._unconfirmed.pop(task_id, None)
                if waiter is not None and not waiter.future.done():
                    waiter.future.set_result(delivered)

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        expired = [t for t, w in self._unconfirmed.items() if w.deadline <= now]
        if expired:
            self._counters["confirm_timeouts"] += len(expired)
            self._fail_waiters(
                expired,
                f"no acknowledgement from Redis within {self._confirm_timeout_s:.0f} s",
            )

    def _fail_waiters(self, task_ids: list[str], message: str) -> None:
        self._counters["unconfirmed_lost"] += len(task_ids)
        error = EventBusUnavailableError(message)
        for task_id in task_ids:
            waiter = self._unconfirmed.pop(task_id, None)
            if waiter is not None and not waiter.future.done():
                waiter.future.set_exception(error)

    def _settle_lost(self) -> None:
        """After a re-attach: settle every open task according to the written mark of the
        publisher that died (see the module docstring). Synchronous: nothing is sent in
        between."""
        batcher = self._batcher
        if batcher is None:
            return
        mark, upto = self._mark, batcher.sent_seq
        affected: dict[str, _Track] = {}
        kept = written = 0
        for task_id, track in self._tracks.items():
            if not (track.streaming or track.result is not None or track.lost):
                continue
            sent = track.sent_upto(upto)
            if sent > mark:
                affected[task_id] = track
            elif sent > 0 and not track.lost:
                if track.result is None or track.last_seq > upto:
                    kept += 1  # every event it sent is in Redis: it carries on
                    continue
                # Its completion is in Redis: done, though nobody can be asked any more.
                track.written = True
                written += 1
                waiter = self._unconfirmed.pop(task_id, None)
                if waiter is not None and not waiter.future.done():
                    waiter.future.set_result(True)
        # Everything up to ``upto`` is now settled: written, or answered again below.
        self._mark = max(mark, upto)
        self._counters["streams_kept"] += kept
        self._counters["completions_written"] += written
        if not affected:
            if kept or written:
                logger.warning(
                    "event-bus publisher lost: nothing of this client's open tasks was lost "
                    "(%d streams carry on, %d completions were written)",
                    kept,
                    written,
                )
            return
        batcher.discard(lambda _key, fields: entry_task_id(fields) not in affected)
        now = time.monotonic()
        ended = resent = again = 0
        for task_id, track in affected.items():
            key = stream_key(self._topic, track.instance_id)
            entries: Batch
            if track.lost:
                # Its error answer went to the publisher that died and may be lost with it:
                # the same answer (the same eventId) again.
                entries = [
                    (key, f)
                    for f in lost_events_answer(task_id, track.next_event_id - 1, LOST_MESSAGE)
                ]
                again += 1
            elif track.streaming:
                track.lost = True
                entries = [
                    (key, f) for f in lost_events_answer(task_id, track.next_event_id, LOST_MESSAGE)
                ]
                track.next_event_id += 1
                ended += 1
            else:
                assert track.result is not None
                entries = [(key, completion_fields(task_id, track.result))]
                resent += 1
            track.went_with(batcher.push(entries))
            waiter = self._unconfirmed.get(task_id)
            if waiter is not None:
                waiter.deadline = max(waiter.deadline, now + self._confirm_timeout_s)
        self._counters["events_lost"] += ended
        self._counters["completions_resent"] += resent
        self._counters["lost_answers_resent"] += again
        logger.warning(
            "event-bus publisher lost: %d streams end with an events_lost error, "
            "%d completions sent again, %d error answers sent again; %d streams carry on, "
            "%d completions were written",
            ended,
            resent,
            again,
            kept,
            written,
        )

    async def _stop_confirming(self) -> None:
        if self._confirmer is not None:
            self._confirmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._confirmer
        error = EventBusUnavailableError("event-bus client closed before Redis acknowledged")
        for waiter in self._unconfirmed.values():
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self._unconfirmed.clear()

    def _clock_offset_ms(self) -> int | None:
        return None if self._clock is None else self._clock.offset_ms

    async def _attach(self, dead: Any) -> Any:
        """Resolve the node's publisher and lease it; ``dead`` is the handle that failed.

        Several callers may notice one death: only the first re-resolves.
        """
        async with self._resolve_lock:
            if dead is not None and self._actor is not dead:
                return self._actor
            deadline = time.monotonic() + max(30.0, 3 * self._call_timeout_s)
            while True:
                handle = await asyncio.to_thread(
                    node_publisher,
                    self.app_name,
                    self._url,
                    self._topic,
                    self.options,
                    timeout_s=max(deadline - time.monotonic(), 1.0),
                )
                try:
                    # The new actor's mark is not taken in here: it is not in use yet.
                    granted = self._take_reply(
                        handle,
                        await asyncio.wait_for(
                            handle.lease.remote(
                                self.session, self._lease_ttl_s, self._clock_offset_ms()
                            ),
                            self._call_timeout_s,
                        ),
                    )
                except (RayActorError, TimeoutError) as exc:
                    granted = False
                    logger.warning("event-bus publisher lease failed: %s", _describe(exc))
                if granted:
                    self._actor = handle
                    if dead is not None:
                        self._counters["reattached"] += 1
                        logger.warning("event-bus client %s re-attached", self.client_id)
                        self._settle_lost()
                    return handle
                if time.monotonic() >= deadline:
                    raise EventBusUnavailableError("could not lease an event-bus publisher")
                await asyncio.sleep(0.1)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl_s / 3)
            actor = self._actor
            try:
                granted = self._take_reply(
                    actor,
                    await asyncio.wait_for(
                        actor.lease.remote(
                            self.session, self._lease_ttl_s, self._clock_offset_ms()
                        ),
                        self._call_timeout_s,
                    ),
                )
                if not granted:
                    await self._attach(actor)
            except (ActorUnavailableError, TimeoutError) as exc:
                self._counters["lease_renew_failures"] += 1
                logger.warning("event-bus lease renewal failed: %s", _describe(exc))
            except RayActorError:
                try:
                    await self._attach(actor)
                except EventBusUnavailableError as exc:
                    self._counters["lease_renew_failures"] += 1
                    logger.error("event-bus publisher lost: %s", _describe(exc))
            except Exception as exc:
                # Keep renewing: a dead loop would let the lease lapse and the actor exit.
                self._counters["lease_renew_failures"] += 1
                logger.error("event-bus lease renewal failed: %s", _describe(exc))

    def _renewer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("event-bus lease renewal loop died", exc_info=task.exception())
