"""Event-bus caller side: ``EventBusClient`` and ``node_publisher``.

Runs in the callers (every LLM replica's task host, the poller), never in the publisher
actor. This module owns a caller's side of the hop to its node's ``RedisPublisher``
(``publisher_actor``): finding or creating that actor by name (``node_publisher``), its lease,
sending batches, confirming completions, and settling open tasks when the actor dies. It
must not talk to Redis (``redis_writer``, in the actor), batch events itself (``batching``),
or import ``ray.serve``; of the actor side it imports only the actor class, to create it.

``EventBusClient``
    Wraps a ``batching.EventBatcher`` (one send in flight, so per-task order holds) whose
    send calls this node's actor. Entries go tagged with their task and event ids
    (``shared.Entry``) to an actor whose ``target()`` says it takes them, bare ``(key,
    fields)`` pairs to an actor of the previous version. ``ActorUnavailableError`` and call
    timeouts are transient: the same batch seq is resent to the same handle. A dead actor
    is re-resolved by name
    (get-or-create: never two live actors of one name), leased again, and the same batch seq
    is resent. What a dead actor had buffered but not yet written to Redis is lost, and a
    batch it had written whose reply never came back is written again by its successor
    (the successor does not know the dead one's sequence marks): exactly-once holds across
    transient failures, not across an actor's death.

    Written mark. The actor reports the client's mark N: every batch of that client up to
    seq N is acknowledged by Redis (see ``publisher_actor``). It comes with every
    ``publish`` reply and every lease renewal, so it also advances while the client's
    streams are idle; the client keeps the highest mark heard from the actor in use.
    Replies without a mark (an actor of an older version) leave it where it was: every
    batch then counts as unwritten.
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
    ``redis_writer``), this second answer is dropped by the server (§4.4), and one it had not
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
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from ray_worker.bella.clock import ServerClock
from ray_worker.bella.protocol import completion_fields, stream_key
from ray_worker.config import PublisherOptions
from ray_worker.errors import EventBusUnavailableError, EventsGivenUpError
from ray_worker.eventbus.batching import EventBatcher
from ray_worker.eventbus.shared import (
    DUPLICATE,
    EXITING,
    PUBLISHER_NAMESPACE,
    BareEntry,
    Batch,
    describe,
    lost_events_answer,
    publisher_name,
)

logger = logging.getLogger(__name__)

__all__ = ["EventBusClient", "node_publisher"]


def _bare(batch: Batch) -> list[BareEntry]:
    """``batch`` as an actor of the previous version takes it: ``(key, fields)`` pairs."""
    return [(key, fields) for key, fields, _, _ in batch]


@functools.cache
def _actor_class() -> Any:
    # The actor's code runs in its own process: imported here only to create it by class.
    from ray_worker.eventbus.publisher_actor import RedisPublisher

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
                + (f": {describe(error)}" if error else " (the old one is still exiting)")
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
        self._batcher: EventBatcher | None = None
        self._tagged = True
        """The actor in use takes tagged entries (an actor of the previous version: bare)."""
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
        self._batcher = EventBatcher(
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
                f"the event-bus publisher is unhealthy: {describe(exc)}"
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
                describe(exc),
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
                    logger.warning("could not release event-bus lease: %s", describe(exc))

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

    def _require(self) -> EventBatcher:
        if self._batcher is None:
            raise EventBusUnavailableError("event-bus client is not started")
        return self._batcher

    async def _send(self, seq: int, batch: Batch) -> None:
        """Ship batch ``seq``; raising makes the batcher back off and resend the same seq."""
        actor = self._actor
        for attempt in (1, 2):
            sent = batch if self._tagged else _bare(batch)
            try:
                reply = await asyncio.wait_for(
                    actor.publish.remote(self.session, seq, sent), self._call_timeout_s
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
                logger.warning("event-bus publisher lost while confirming: %s", describe(exc))
                try:
                    await self._attach(actor)
                except EventBusUnavailableError as attach_error:
                    logger.error("event-bus publisher lost: %s", describe(attach_error))
                    await asyncio.sleep(0.5)
                continue
            except Exception as exc:
                # Anything else: the fate cannot be learned.
                self._fail_waiters(
                    ids, f"the event-bus publisher could not confirm delivery: {describe(exc)}"
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
        batcher.discard(affected)
        now = time.monotonic()
        ended = resent = again = 0
        for task_id, track in affected.items():
            key = stream_key(self._topic, track.instance_id)
            entries: Batch
            if track.lost:
                # Its error answer went to the publisher that died and may be lost with it:
                # the same answer (the same eventId) again.
                entries = lost_events_answer(key, task_id, track.next_event_id - 1, LOST_MESSAGE)
                again += 1
            elif track.streaming:
                track.lost = True
                entries = lost_events_answer(key, task_id, track.next_event_id, LOST_MESSAGE)
                track.next_event_id += 1
                ended += 1
            else:
                assert track.result is not None
                entries = [(key, completion_fields(task_id, track.result), task_id, "")]
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
                    target = await asyncio.wait_for(handle.target.remote(), self._call_timeout_s)
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
                    logger.warning("event-bus publisher lease failed: %s", describe(exc))
                if granted:
                    self._actor = handle
                    self._tagged = bool(target.get("tagged_entries"))
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
                logger.warning("event-bus lease renewal failed: %s", describe(exc))
            except RayActorError:
                try:
                    await self._attach(actor)
                except EventBusUnavailableError as exc:
                    self._counters["lease_renew_failures"] += 1
                    logger.error("event-bus publisher lost: %s", describe(exc))
            except Exception as exc:
                # Keep renewing: a dead loop would let the lease lapse and the actor exit.
                self._counters["lease_renew_failures"] += 1
                logger.error("event-bus lease renewal failed: %s", describe(exc))

    def _renewer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("event-bus lease renewal loop died", exc_info=task.exception())
