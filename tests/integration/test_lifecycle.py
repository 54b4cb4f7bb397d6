"""Stops and deaths of an LLM replica end every task in one answer, or leave it for redelivery.

A dead engine (the simulated engine's ``kill_engine``, as a CUDA error or a SIGKILL of vLLM's
EngineCore): the replica refuses new tasks and reports no capacity; the tasks it ran that had
not begun answering run on the other replica; a stream cut mid-way ends in one 503.

A stop lets answers finish within the stop budget and never leaves one unanswered.

Real redis-server, the emulator, local Ray Serve and the simulated engine (20 tokens/s per
sequence, so a task's length is its running time). The stop budget (``poller.drain_timeout_s``)
is 2 s here. Each stop meets short tasks (1 s: they fit) and long ones (10 s: they do not):
a downscale (2 replicas to 1), a redeploy of a changed config, and the app's deletion (what
Ctrl-C to ``serve run`` and ``serve shutdown`` do to every replica). The short tasks finish
200; a long one is answered 503 once when its producer waits online or at level 0, and left
for redelivery at level 1 (then answered once, 200, by the replica the server redelivers it
to). Every answer is counted where it lands: completion events in the Redis stream, HTTP
completes at the callback receiver. A last app runs on a Redis without keyspace events
(Bella-Queue's redelivery timer never fires): its stop answers level 1 503 instead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import PutRequest, ResponseMode
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.event_stream import completions_after, last_entry_id
from ray_worker.testing.redis_server import RedisServer
from ray_worker.testing.serve_run import deploy_worker, deployed_worker, worker_running
from ray_worker.testing.waiting import wait_for
from ray_worker.testing.worker_args import sim_worker_args

MODEL = "sim-model"
APP = "worker-stop"
BUDGET_S = 2.0
SHORT, LONG = 20, 200  # tokens: 1 s and 10 s at 20 tokens/s
# A long task must still run when the stop begins: a redeploy under load took over 5 s to apply.
PROCESS_TIMEOUT_S = 14  # above a long task's run: a redelivered one ends before the next


def _app_args(queue_url: str, queue: str, *, replicas: int, ttft_s: float) -> dict[str, Any]:
    return sim_worker_args(
        queue_url,
        queue,
        model=MODEL,
        replicas=replicas,
        sim={"max_num_seqs": 32, "ttft_s": ttft_s, "tokens_per_s": 20, "max_model_len": 8192},
        poller={
            "drain_timeout_s": BUDGET_S,
            "process_timeout_s": PROCESS_TIMEOUT_S,
            "process_max_retries": 2,
        },
    )


@pytest.fixture(scope="module")
def worker(ray_serve: Any, emulator: EmulatorServer, queue: str) -> Iterator[Any]:
    args = _app_args(emulator.url, queue, replicas=2, ttft_s=0.05)
    with deployed_worker(args, APP, EMULATOR_APIKEY) as handle:
        yield handle


def _put(queue: str, mode: ResponseMode, tokens: int, *, level: int = 0, **kw: Any) -> PutRequest:
    data = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    return PutRequest(
        endpoint="/v1/chat/completions",
        queue=queue,
        response_mode=mode,
        data=data,
        level=level,
        timeout=120,
        **kw,
    )


async def _events(client: QueueClient, request: PutRequest) -> list[Any]:
    return [event async for event in client.put_streaming(request)]


@dataclass
class Load:
    """Tasks of every kind put while the worker runs, short (they fit) and long."""

    blocking: dict[int, list[asyncio.Task[Any]]] = field(default_factory=dict)
    streams: dict[int, list[asyncio.Task[Any]]] = field(default_factory=dict)
    callbacks: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    """(tokens, level) -> task ids."""

    @property
    def online(self) -> int:
        return sum(len(v) for v in [*self.blocking.values(), *self.streams.values()])

    @property
    def count(self) -> int:
        return self.online + sum(len(v) for v in self.callbacks.values())


async def _put_load(
    client: QueueClient, queue: str, receiver: CallbackReceiver, *, long_online: int
) -> Load:
    load = Load()
    # Callbacks first: a put returns at once, while the online puts hold their connections.
    for tokens, level, n in ((SHORT, 1, 1), (LONG, 0, 1), (LONG, 1, 2)):
        load.callbacks[(tokens, level)] = [
            await client.put(
                _put(
                    queue,
                    ResponseMode.CALLBACK,
                    tokens,
                    level=level,
                    callback_url=receiver.url,
                )
            )
            for _ in range(n)
        ]
    for tokens, n in ((SHORT, 2), (LONG, long_online)):
        load.blocking[tokens] = [
            asyncio.create_task(client.put_blocking(_put(queue, ResponseMode.BLOCKING, tokens)))
            for _ in range(n)
        ]
        load.streams[tokens] = [
            asyncio.create_task(_events(client, _put(queue, ResponseMode.STREAMING, tokens)))
            for _ in range(n)
        ]
    return load


async def _running_load(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    redis_server: RedisServer,
    emulator: EmulatorServer,
    *,
    long_online: int,
) -> tuple[str, Load]:
    """Put a ``Load`` on the running worker and wait until all of it generates; returns the
    event stream's last entry id from before the puts, and the load."""
    await worker_running(worker)
    start = await last_entry_id(redis_server.url, emulator.topic + emulator.instance_id)
    answered = await _answered(worker)
    load = await _put_load(client, queue, receiver, long_online=long_online)
    await _all_running(worker, load.count, answered)
    return start, load


async def _short_ones_finish(load: Load) -> None:
    """The short online tasks of ``load`` fit in the stop budget: 200, whole streams."""
    blocking = await asyncio.wait_for(asyncio.gather(*load.blocking[SHORT]), 60)
    assert [r.status_code for r in blocking] == [200, 200]
    for events in await asyncio.wait_for(asyncio.gather(*load.streams[SHORT]), 60):
        assert _stream_ok(events)


def _answered_in(status: dict[str, Any]) -> int:
    """Tasks the worker had answered (every status) when it gave ``status``."""
    return sum(int(v) for v in status["answered"].values())


async def _answered(worker: Any) -> int:
    """Tasks the worker has answered so far."""
    return _answered_in(await worker.status.remote())


async def _all_running(worker: Any, n: int, answered_before: int = 0) -> None:
    """Wait until the ``n`` tasks put since ``answered_before`` all started: running in the
    engines, or (a short one, on a slow machine) already answered."""

    async def running() -> bool:
        status = await worker.status.remote()
        answered = _answered_in(status) - answered_before
        return bool(status["pools"][0]["capacity"]["engine_running"] + answered >= n)

    await wait_for(running, timeout=60, interval=0.05, message=f"{n} tasks generating")


def _stream_ok(events: list[Any]) -> bool:
    """A whole stream: eventIds 0..n-1 with no hole, ending in [DONE]."""
    return (
        bool(events)
        and events[-1].data == "[DONE]"
        and [int(e.id) for e in events[:-1]] == list(range(len(events) - 1))
    )


def _stream_cut_503(events: list[Any]) -> bool:
    """A stream cut by the stop: its chunks without a hole, then one error chunk (503)."""
    *chunks, last = events
    return (
        [int(e.id) for e in chunks] == list(range(len(chunks)))
        and int(last.id) == len(chunks)
        and '"overloaded"' in last.data
        and "shutting down" in last.data
    )


async def _exactly_once(
    redis_server: RedisServer, emulator: EmulatorServer, start: str, *, online: int
) -> None:
    """One completion event per online task put since ``start``, none twice."""
    completions = await completions_after(
        redis_server.url, emulator.topic + emulator.instance_id, start
    )
    assert len(completions) == online, completions
    assert set(completions.values()) == {1}, completions


async def _replicas(worker: Any, n: int, timeout_s: float = 120) -> None:
    async def reporting() -> bool:
        try:
            status = await worker.status.remote()
        except Exception:  # the poller restarts
            return False
        return bool(status["pools"][0]["capacity"]["replicas"] == n)

    await wait_for(reporting, timeout=timeout_s, interval=0.25, message=f"{n} replicas")


async def test_a_dead_engine_hands_unanswered_tasks_to_the_other_replica(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    await worker_running(worker)
    await _replicas(worker, 2)
    start = await last_entry_id(redis_server.url, emulator.topic + emulator.instance_id)
    tokens = 60  # 3 s: every task runs when the engine dies, 1 s in
    blocking = [
        asyncio.create_task(client.put_blocking(_put(queue, ResponseMode.BLOCKING, tokens)))
        for _ in range(4)
    ]
    streams = [
        asyncio.create_task(_events(client, _put(queue, ResponseMode.STREAMING, tokens)))
        for _ in range(4)
    ]
    callbacks = [
        await client.put(
            _put(queue, ResponseMode.CALLBACK, tokens, level=level, callback_url=receiver.url)
        )
        for level in (0, 1)
    ]
    await _all_running(worker, 10)
    killer = _put(queue, ResponseMode.STREAMING, tokens)
    killer.data["sim_fail"] = {"after_tokens": 20, "kill_engine": True}
    killed = await asyncio.wait_for(_events(client, killer), 60)
    assert '"engine_failed"' in killed[-1].data  # its events were out: one 503, never rerun

    for answer in await asyncio.wait_for(asyncio.gather(*blocking), 90):
        assert answer.status_code == 200  # those of the dead engine ran again elsewhere
    cut = 0
    for events in await asyncio.wait_for(asyncio.gather(*streams), 90):
        if not _stream_ok(events):
            *chunks, last = events
            assert [int(e.id) for e in chunks] == list(range(len(chunks)))
            assert '"engine_failed"' in last.data
            cut += 1
    for task_id in callbacks:
        answers = await wait_for(lambda t=task_id: receiver.answers(t), timeout=60)
        assert [a["status_code"] for a in answers] == [200]
    # The dead replica takes nothing more: a new task is served by the live one at once.
    after = await asyncio.wait_for(
        client.put_blocking(_put(queue, ResponseMode.BLOCKING, SHORT)), 30
    )
    assert after.status_code == 200
    # 4 blocking, 4 streams, the killer and the one after: one completion each.
    await _exactly_once(redis_server, emulator, start, online=10)
    await asyncio.sleep(1.0)
    for task_id in callbacks:
        assert len(receiver.answers(task_id)) == 1
    # Serve replaces the replica (its health check fails): two replicas report again.
    await _replicas(worker, 2, timeout_s=120)


async def test_a_downscale_lets_short_tasks_finish_and_answers_the_rest_once(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    await _replicas(worker, 2)
    start, load = await _running_load(
        worker, client, queue, receiver, redis_server, emulator, long_online=4
    )

    args = _app_args(emulator.url, queue, replicas=1, ttft_s=0.05)
    redeploy = asyncio.create_task(asyncio.to_thread(deploy_worker, args, APP, EMULATOR_APIKEY))

    await _short_ones_finish(load)
    # The long ones: the surviving replica finishes its own (200); the stopped replica's are
    # cut at the end of the budget (503): one answer each either way, never a hole.
    cut = 0
    for answer in await asyncio.wait_for(asyncio.gather(*load.blocking[LONG]), 90):
        assert answer.status_code in (200, 503)
        cut += answer.status_code == 503
    for events in await asyncio.wait_for(asyncio.gather(*load.streams[LONG]), 90):
        assert _stream_ok(events) or _stream_cut_503(events), events[-3:]
        cut += not _stream_ok(events)
    assert cut >= 1, "no task ran on the stopped replica"
    for key, ids in load.callbacks.items():
        for task_id in ids:
            answers = await wait_for(lambda t=task_id: receiver.answers(t), timeout=90)
            expected = {200, 503} if key == (LONG, 0) else {200}  # level 1: redelivered
            assert answers[0]["status_code"] in expected, (key, answers)
    await redeploy
    await _exactly_once(redis_server, emulator, start, online=load.online)
    await asyncio.sleep(1.0)  # a late second complete would have arrived by now
    for ids in load.callbacks.values():
        for task_id in ids:
            assert len(receiver.answers(task_id)) == 1, task_id
    status = await worker_running(worker)
    assert status["pools"][0]["capacity"]["replicas"] == 1


async def test_a_redeploy_cuts_long_tasks_at_the_budget_and_redelivers_level_1(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    start, load = await _running_load(
        worker, client, queue, receiver, redis_server, emulator, long_online=2
    )

    # A changed engine setting: every replica of the old version stops.
    args = _app_args(emulator.url, queue, replicas=1, ttft_s=0.06)
    redeploy = asyncio.create_task(asyncio.to_thread(deploy_worker, args, APP, EMULATOR_APIKEY))

    await _short_ones_finish(load)
    long_blocking = await asyncio.wait_for(asyncio.gather(*load.blocking[LONG]), 60)
    assert [r.status_code for r in long_blocking] == [503, 503]
    assert all("shutting down" in r.body["error"]["message"] for r in long_blocking)
    for events in await asyncio.wait_for(asyncio.gather(*load.streams[LONG]), 60):
        assert _stream_cut_503(events), events[-3:]
        assert len(events) > 5  # it streamed until the budget's end
    (short_offline,) = load.callbacks[(SHORT, 1)]
    (online_callback,) = load.callbacks[(LONG, 0)]
    answers = await wait_for(lambda: receiver.answers(short_offline), timeout=60)
    assert answers[0]["status_code"] == 200
    answers = await wait_for(lambda: receiver.answers(online_callback), timeout=60)
    assert answers[0]["status_code"] == 503
    # Level 1: no answer at the stop; the server redelivers them after process_timeout and the
    # new replica answers each once.
    await asyncio.sleep(2.0)
    for task_id in load.callbacks[(LONG, 1)]:
        assert receiver.answers(task_id) == []
    for task_id in load.callbacks[(LONG, 1)]:
        answers = await wait_for(lambda t=task_id: receiver.answers(t), timeout=90)
        assert [a["status_code"] for a in answers] == [200]
    await redeploy
    await _exactly_once(redis_server, emulator, start, online=load.online)
    for ids in load.callbacks.values():
        for task_id in ids:
            assert len(receiver.answers(task_id)) == 1, task_id


async def test_answers_held_at_a_redeploy_in_an_outage_are_handed_on_and_delivered_once(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
) -> None:
    await worker_running(worker)
    # A gateway in front of Bella-Queue answers every complete 503 for now: the answers wait
    # in the replica's outbox while the redeploy stops that replica and the poller.
    emulator.fail_completes(503, "<html>maintenance</html>", {"Retry-After": "1"})
    try:
        ids = [
            await client.put(
                _put(queue, ResponseMode.CALLBACK, SHORT, level=level, callback_url=receiver.url)
            )
            for level in (0, 1, 0, 1)
        ]

        async def held() -> bool:
            status = await worker.status.remote()
            return bool(status["pools"][0]["outbox"].get("outbox_entries", 0) >= 4)

        await wait_for(held, timeout=60, interval=0.2, message="answers held in the outbox")
        old = set((await worker.status.remote())["pools"][0]["outbox"]["replicas"])
        args = _app_args(emulator.url, queue, replicas=1, ttft_s=0.07)
        await asyncio.to_thread(deploy_worker, args, APP, EMULATOR_APIKEY)

        async def old_replica_gone() -> bool:
            try:
                status = await worker.status.remote()
            except Exception:  # the poller restarts
                return False
            reporting = set(status["pools"][0]["outbox"]["replicas"])
            return bool(reporting) and not reporting & old

        await wait_for(old_replica_gone, timeout=90, interval=0.5, message="the old replica gone")
        await asyncio.sleep(PROCESS_TIMEOUT_S + 1)  # the old poller gone too; no redelivery
        assert all(receiver.answers(task_id) == [] for task_id in ids)
    finally:
        emulator.heal_completes()
    for task_id in ids:
        answers = await wait_for(lambda t=task_id: receiver.answers(t), timeout=60)
        assert [a["status_code"] for a in answers] == [200]
    await asyncio.sleep(1.0)
    for task_id in ids:
        assert len(receiver.answers(task_id)) == 1, task_id


async def test_deleting_the_app_answers_online_503_and_leaves_level_1(
    worker: Any,
    client: QueueClient,
    queue: str,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    from ray import serve

    start, load = await _running_load(
        worker, client, queue, receiver, redis_server, emulator, long_online=2
    )

    # What Ctrl-C to `serve run` and `serve shutdown` do: every replica stops gracefully.
    deleting = asyncio.create_task(asyncio.to_thread(serve.delete, APP))

    blocking = await asyncio.wait_for(asyncio.gather(*load.blocking[SHORT]), 60)
    assert [r.status_code for r in blocking] == [200, 200]
    long_blocking = await asyncio.wait_for(asyncio.gather(*load.blocking[LONG]), 60)
    assert [r.status_code for r in long_blocking] == [503, 503]
    for events in await asyncio.wait_for(asyncio.gather(*load.streams[LONG]), 60):
        assert _stream_cut_503(events), events[-3:]
    await asyncio.wait_for(deleting, 90)
    (short_offline,) = load.callbacks[(SHORT, 1)]
    assert [a["status_code"] for a in receiver.answers(short_offline)] == [200]
    (online_callback,) = load.callbacks[(LONG, 0)]
    assert [a["status_code"] for a in receiver.answers(online_callback)] == [503]
    for task_id in load.callbacks[(LONG, 1)]:
        assert receiver.answers(task_id) == []  # left for redelivery (no worker runs now)
    await _exactly_once(redis_server, emulator, start, online=load.online)


async def test_a_stop_answers_level_1_503_when_bella_queues_redis_cannot_redeliver(
    ray_serve: Any,
    client: QueueClient,
    receiver: CallbackReceiver,
    emulator: EmulatorServer,
    redis_server: RedisServer,
) -> None:
    """Bella-Queue's Redis without keyspace events never fires the redelivery timer: a
    level-1 task the stop cuts short is answered 503, not left to a redelivery that never
    comes. The worker reads the setting itself (the poller at its start, each replica at its
    start and its stop)."""
    import redis
    from ray import serve

    queue = f"bare-{uuid.uuid4().hex[:8]}"
    app = f"{APP}-bare"
    setting = "notify-keyspace-events"
    redis_client = redis.Redis.from_url(redis_server.url)
    before = redis_client.config_get(setting)[setting]
    redis_client.config_set(setting, "")
    try:
        args = _app_args(emulator.url, queue, replicas=1, ttft_s=0.05)
        with deployed_worker(args, app, EMULATOR_APIKEY) as handle:
            await worker_running(handle)
            assert (await handle.status.remote())["redelivers"] is False
            ids = [
                await client.put(
                    _put(queue, ResponseMode.CALLBACK, LONG, level=1, callback_url=receiver.url)
                )
                for _ in range(2)
            ]
            await _all_running(handle, 2)
            await asyncio.wait_for(asyncio.to_thread(serve.delete, app), 90)
    finally:
        redis_client.config_set(setting, before)
        redis_client.close()
    for task_id in ids:
        answers = await wait_for(lambda t=task_id: receiver.answers(t), timeout=30)
        assert [a["status_code"] for a in answers] == [503]
    await asyncio.sleep(1.0)
    assert all(len(receiver.answers(t)) == 1 for t in ids)
