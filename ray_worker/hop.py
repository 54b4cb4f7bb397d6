"""What crosses the poller-to-replica hop: the run call, its messages, the load report.

The poller (``ray_worker.worker``, in the ``QueuePoller`` replica) and the LLM replicas
(``ray_worker.task``, ``ray_worker.serve.llm_server``) talk through Ray in two calls, and this
module is the one home of what those calls carry and of the rules both sides apply:

- ``run(task)``: the poller gives a replica one whole task (``Task.model_dump(mode="json")``);
  the replica answers it itself and streams back small messages, in this order:
  ``{"phase": "accepted", "replica_id": ...}`` once the task runs there (from then on only
  that replica answers it, unless it dies), ``{"phase": "answering"}`` right before the
  task's first event or answer leaves, then ``{"phase": "done", "outcome": Outcome}``. A
  replica that does not run the task (a duplicate, a dead engine) sends ``done`` alone.
- ``report_load(report)``: every replica pushes its ``ReplicaLoad`` (as a plain dict) to the
  ``POLLER_DEPLOYMENT`` when it changes (read every ``load_report_interval_s``) and at least
  every ``load_heartbeat_s``; the answer carries its model's backlog (``{"backlog": n}``).
- The rules both sides read: ``deadline_ms`` (when a task stops mattering), the vLLM
  priorities, the task endpoints served.

It must stay plain: no Ray, no I/O, nothing of either side's logic (``tests/unit/test_layout.py``
checks it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ray_worker.bella.protocol import ONLINE_MAX_WAIT_S, Task, now_ms

__all__ = [
    "ACCEPTED",
    "ANSWERING",
    "DONE",
    "POLLER_DEPLOYMENT",
    "PRIORITY_OFFLINE",
    "PRIORITY_ONLINE",
    "SUPPORTED_ENDPOINTS",
    "Outcome",
    "ReplicaLoad",
    "accepted",
    "answering",
    "counted_replicas",
    "deadline_ms",
    "done",
    "outcome",
]

POLLER_DEPLOYMENT = "QueuePoller"
"""Name of the poller deployment the LLM replicas call (same Serve app): their load reports,
and the answers a stopping replica hands over."""

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
"""Task endpoints a replica serves."""

PRIORITY_ONLINE = 0
"""vLLM priority of level-0 (online) tasks: a lower value is scheduled first."""
PRIORITY_OFFLINE = 1
"""vLLM priority of level-1 (offline) tasks."""

# -- run: the messages a replica streams back ---------------------------------------------

ACCEPTED = "accepted"
"""Phase a replica reports once it started the task and owns it."""
ANSWERING = "answering"
"""Phase a replica reports right before the task's first event or answer leaves it."""
DONE = "done"
"""Phase of the last message of a run; it carries the ``Outcome``."""


class Outcome(TypedDict):
    """What a run reports to the poller (small: no token, no body)."""

    task_id: str
    status_code: int
    """The answer's status; 0 when the task was left for the server's redelivery."""
    answered: bool
    """An answer was sent (or its delivery was attempted and failed, see ``delivered``)."""
    delivered: bool
    """The event bus or Bella-Queue accepted the answer."""
    duplicate: bool
    """The task already ran here; this call started nothing."""
    cancelled: bool
    """Bella-Queue cancelled the task (or its batch) while it ran: aborted, not answered."""
    retry: bool
    """The replica's engine died before the task began answering: not answered, the poller
    runs it on another replica."""
    events: int
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float | None
    """From the task's put (``start_time``) to the run's start on the replica."""
    ttft_s: float | None
    """From the run's start to the task's first event or answer."""
    duration_s: float


def outcome(task_id: str, **fields: Any) -> Outcome:
    """An ``Outcome`` of ``task_id``: nothing answered, nothing counted, but for ``fields``."""
    out = Outcome(
        task_id=task_id,
        status_code=0,
        answered=False,
        delivered=False,
        duplicate=False,
        cancelled=False,
        retry=False,
        events=0,
        prompt_tokens=0,
        completion_tokens=0,
        queue_wait_s=None,
        ttft_s=None,
        duration_s=0.0,
    )
    out.update(fields)  # type: ignore[typeddict-item]
    return out


def accepted(replica_id: str) -> dict[str, Any]:
    """The message of a replica that started the task and owns it."""
    return {"phase": ACCEPTED, "replica_id": replica_id}


def answering() -> dict[str, Any]:
    """The message sent right before the task's first event or answer leaves the replica."""
    return {"phase": ANSWERING}


def done(result: Outcome) -> dict[str, Any]:
    """The last message of a run."""
    return {"phase": DONE, "outcome": result}


# -- report_load: what a replica pushes ---------------------------------------------------

_OUTBOX_KEYS = ("outbox_", "complete_")
"""Keys of a report that are the replica's outbox figures (``Outbox.stats``)."""


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One LLM replica's load report. It travels as a plain dict (``as_report``,
    ``from_report``): readers ignore keys they do not know, so either side may add one."""

    replica_id: str
    model_id: str
    running: int = 0
    """Requests the engine runs."""
    waiting: int = 0
    """Requests waiting in the engine."""
    kv_cache_usage: float = 0.0
    max_num_seqs: int = 1
    draining: bool = False
    """The replica is stopping (or its engine died): it finishes what it holds and takes
    nothing new."""
    held_ids: frozenset[str] = frozenset()
    """The tasks the replica runs (a restarted poller counts them as in flight)."""
    held_online: int = 0
    held_offline: int = 0
    offline_width: int = 0
    """Seats offline work may hold: the configured ``max_num_seqs`` (0: the replica keeps no
    online seats; its whole ``max_num_seqs`` is the width)."""
    online_seats: int = 0
    """Engine seats above the width, kept for online work (``ray_worker.task.seats``)."""
    seats_online_in_use: int = 0
    seats_offline_in_use: int = 0
    preemptions: int = 0
    """Offline runs preempted for online work since the replica started."""
    gang_id: str | None = None
    """Its data-parallel group (Serve's ``gang_context.gang_id``); None: not data-parallel."""
    dp_rank: int = 0
    """Its rank in the group."""
    dp_size: int = 1
    """Ranks of its group (``data_parallel_size``)."""
    in_flight: int = 0
    """Engine requests running in the replica."""
    engine: str = "vllm"
    ts: float = 0.0
    """Epoch seconds when the replica made the report."""
    outbox: Mapping[str, Any] = field(default_factory=dict)
    """The replica's outbox figures (``Outbox.stats``: entries, bytes, give-ups)."""

    @property
    def width(self) -> int:
        """Seats offline work may hold."""
        return self.offline_width or max(1, self.max_num_seqs - self.online_seats)

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> ReplicaLoad:
        """Read a report as a replica sent it (``as_report``)."""
        held = report.get("held_ids")
        return cls(
            replica_id=str(report["replica_id"]),
            model_id=str(report["model_id"]),
            running=int(report.get("running", 0)),
            waiting=int(report.get("waiting", 0)),
            kv_cache_usage=float(report.get("kv_cache_usage", 0.0)),
            max_num_seqs=max(1, int(report.get("max_num_seqs", 1))),
            draining=bool(report.get("draining", False)),
            held_ids=frozenset(str(i) for i in held)
            if isinstance(held, list | tuple)
            else frozenset(),
            held_online=int(report.get("held_online", 0)),
            held_offline=int(report.get("held_offline", 0)),
            offline_width=int(report.get("offline_width", 0)),
            online_seats=int(report.get("online_seats", 0)),
            seats_online_in_use=int(report.get("seats_online_in_use", 0)),
            seats_offline_in_use=int(report.get("seats_offline_in_use", 0)),
            preemptions=int(report.get("preemptions", 0)),
            gang_id=None if report.get("gang_id") is None else str(report["gang_id"]),
            dp_rank=int(report.get("dp_rank", 0)),
            dp_size=max(1, int(report.get("dp_size", 1))),
            in_flight=int(report.get("in_flight", 0)),
            engine=str(report.get("engine", "vllm")),
            ts=float(report.get("ts", 0.0)),
            outbox={k: v for k, v in report.items() if k.startswith(_OUTBOX_KEYS)},
        )

    def as_report(self) -> dict[str, Any]:
        """The plain dict that crosses the hop (the outbox figures flat, under their keys)."""
        return {
            "replica_id": self.replica_id,
            "model_id": self.model_id,
            "running": self.running,
            "waiting": self.waiting,
            "kv_cache_usage": self.kv_cache_usage,
            "max_num_seqs": self.max_num_seqs,
            "draining": self.draining,
            "held_ids": sorted(self.held_ids),
            "held_online": self.held_online,
            "held_offline": self.held_offline,
            "offline_width": self.offline_width,
            "online_seats": self.online_seats,
            "seats_online_in_use": self.seats_online_in_use,
            "seats_offline_in_use": self.seats_offline_in_use,
            "preemptions": self.preemptions,
            "gang_id": self.gang_id,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "in_flight": self.in_flight,
            "engine": self.engine,
            "ts": self.ts,
            **self.outbox,
        }


def counted_replicas(loads: Iterable[ReplicaLoad]) -> frozenset[str]:
    """The replicas whose seats count toward a model's capacity.

    A replica outside any data-parallel group counts alone. A DP group counts whole or not at
    all: only while every one of its ``dp_size`` ranks reports and none drains. Its ranks step
    together (expert parallelism exchanges tokens between all of them every step), start only
    once all have joined, and Serve restarts the whole gang when one rank fails: the seats of a
    group with a dead, stopping or missing rank would take tasks that cannot run.
    """
    counted: set[str] = set()
    groups: dict[str, list[ReplicaLoad]] = defaultdict(list)
    for load in loads:
        if load.gang_id is None:
            counted.add(load.replica_id)
        else:
            groups[load.gang_id].append(load)
    for members in groups.values():
        size = max(m.dp_size for m in members)
        ranks = {m.dp_rank for m in members}
        if ranks >= set(range(size)) and not any(m.draining for m in members):
            counted.update(m.replica_id for m in members)
    return frozenset(counted)


# -- the rules both sides apply -----------------------------------------------------------


def deadline_ms(
    task: Task,
    max_task_time_s: float,
    *,
    now: int | None = None,
    redelivery_window_s: float = 0.0,
) -> int:
    """When ``task`` stops mattering, on the server's clock (``now``: its current time).

    Its ``expire_time``; online, at most ``ONLINE_MAX_WAIT_S`` after its put (the producer
    waits no longer, §1.3). A level-1 offline task taken with redelivery is answered 408 by
    the server itself ``process_timeout * (process_max_retries + 1)`` after the take
    (``redelivery_window_s``), so it stops mattering by then too.
    """
    now = now_ms() if now is None else now
    start = task.start_time or now
    if task.expire_time > 0:
        deadline = task.expire_time
        if task.is_online:
            deadline = min(deadline, start + ONLINE_MAX_WAIT_S * 1000)
    else:
        cap_s = min(max_task_time_s, ONLINE_MAX_WAIT_S) if task.is_online else max_task_time_s
        deadline = start + int(cap_s * 1000)
    if redelivery_window_s > 0 and task.level != 0 and not task.is_online:
        deadline = min(deadline, now + int(redelivery_window_s * 1000))
    return deadline
