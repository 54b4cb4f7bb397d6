"""A poller rig for unit tests: a ``Poller`` over a fake taker, a real ``Dispatcher`` on fake
replicas (real task runners on a fake engine) and a ``CapacityTracker``, plus ``tasks_of``.

This module owns ``PollRig`` and its backoff settings (``IDLE_0``/``IDLE_MAX``,
``ERR_0``/``ERR_MAX``), shared by ``test_poller.py`` and ``test_autoscaling.py`` through the
``make`` and ``rigs`` fixtures of ``tests/unit/conftest.py``. Like ``fakes.py`` it must not touch
the network, Ray or the wall clock beyond ``asyncio.sleep``.
"""

from __future__ import annotations

import math
from typing import Any

from ray_worker.bella.protocol import TakeRequest, Task
from ray_worker.config import CapacityConfig, DispatcherConfig, PollerConfig, QueueSpec
from ray_worker.worker.capacity import CapacityTracker
from ray_worker.worker.dispatcher import Dispatcher
from ray_worker.worker.poller import Poller, Pool, make_pools
from tests.unit.fakes import (
    FakeCompleter,
    FakeEngine,
    FakeEventSink,
    FakeReplicas,
    FakeTaker,
    by_queue,
    make_task,
    until,
)

__all__ = ["ERR_0", "ERR_MAX", "IDLE_0", "IDLE_MAX", "PollRig", "tasks_of"]

IDLE_0, IDLE_MAX = 0.001, 0.004
ERR_0, ERR_MAX = 0.001, 0.004


class PollRig:
    """A poller over a fake taker, a real dispatcher on fake replicas (real task runners on a
    fake engine), and a capacity tracker."""

    def __init__(
        self,
        queues: list[str | QueueSpec] | None = None,
        *,
        models: tuple[str, ...] = ("m",),
        max_num_seqs: int | None = 8,
        engine_default: list[Any] | None = None,
        **config: Any,
    ) -> None:
        specs = [
            q if isinstance(q, QueueSpec) else QueueSpec(name=q) for q in (queues or ["q:0", "q:1"])
        ]
        settings: dict[str, Any] = {
            "idle_backoff_initial_s": IDLE_0,
            "idle_backoff_max_s": IDLE_MAX,
            "error_backoff_initial_s": ERR_0,
            "error_backoff_max_s": ERR_MAX,
            **config,
        }
        self.capacity = CapacityTracker(CapacityConfig(target_ratio=1.0), list(models))
        if max_num_seqs is not None:
            for model in models:
                self.report(model, max_num_seqs)
        self.engine = FakeEngine(default=engine_default)
        self.events = FakeEventSink()
        self.completer = FakeCompleter()
        self.replicas = FakeReplicas(models, self.events, self.completer, engine=self.engine)
        self.dispatcher = Dispatcher(
            replicas=self.replicas,
            events=self.events,
            completer=self.completer,
            capacity=self.capacity,
            queues=specs,
            served_models=list(models),
            config=DispatcherConfig(),
        )
        self.taker = FakeTaker()
        self.pools = make_pools(specs, {q.name: q.model or models[0] for q in specs})
        self.poller = Poller(
            taker=self.taker,
            dispatcher=self.dispatcher,
            capacity=self.capacity,
            pools=self.pools,
            config=PollerConfig(**settings),
        )
        self.backoffs: list[float] = []
        """``pool.backoff_s`` as each take began: the wait that preceded it."""
        self.states: list[str] = []
        """``pool.state`` as each take began."""
        self.taker.on_take = lambda _: self._snapshot()

    def _snapshot(self) -> None:
        self.backoffs.append(self.pools[0].backoff_s)
        self.states.append(self.pools[0].state)

    def report(self, model: str = "m", max_num_seqs: int = 8) -> None:
        """One replica of ``model`` whose engine runs ``max_num_seqs``, a quarter of them
        (rounded up) online seats: 8 seqs are a width of 6 and 2 seats."""
        seats = math.ceil(max_num_seqs * 0.25)
        self.capacity.report(
            {
                "replica_id": f"r-{model}",
                "model_id": model,
                "max_num_seqs": max_num_seqs,
                "offline_width": max_num_seqs - seats,
                "online_seats": seats,
            }
        )

    @property
    def engines(self) -> FakeEngine:
        """The engine under the name ``test_autoscaling`` still uses."""
        return self.engine

    @property
    def pool(self) -> Pool:
        return self.pools[0]

    @property
    def requests(self) -> list[TakeRequest]:
        return self.taker.requests

    async def takes(self, n: int) -> None:
        """Wait until ``n`` takes were made."""
        await until(lambda: len(self.taker.requests) >= n)

    async def close(self) -> None:
        await self.poller.stop()
        await self.dispatcher.drain(0)
        for runner in self.replicas.runners.values():
            await runner.drain(0)


def tasks_of(n: int, queue: str = "q", level: int = 1) -> dict[str, list[Task]]:
    return by_queue(*(make_task("callback", queue=queue, level=level) for _ in range(n)))
