"""Something in front of Bella-Queue refuses the completes for a while: every answer still
arrives, exactly once; Bella-Queue's own refusal is given up at once.

The session's emulator over real HTTP (its completes made to answer 429 with an HTML page and
``Retry-After: 1``, as a rate-limiting gateway would, then healed), a real ``QueueClient``
making one attempt per call (as a replica's does) behind a real ``Outbox``, and a
``CallbackReceiver``: the emulator POSTs a task's callback on its first complete only
(a repeated complete is a no-op, §1.5), so one body per task there means one complete took
effect and none was lost. No Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ray_worker.bella.client import QueueClient, RetryPolicy
from ray_worker.bella.protocol import PutRequest, ResponseMode, TakeRequest, Task, result_body
from ray_worker.config import DispatcherConfig
from ray_worker.emulator.server import EmulatorServer
from ray_worker.task.outbox import Outbox
from ray_worker.testing.callback_receiver import CallbackReceiver
from ray_worker.testing.emulator import EMULATOR_APIKEY
from ray_worker.testing.waiting import wait_for

ENDPOINT = "/v1/chat/completions"
TASKS = 5
HTML_429 = "<html><head><title>429 Too Many Requests</title></head><body>slow down</body></html>"
# Backoff far below the gateway's Retry-After: the waits between attempts are the gateway's.
OUTBOX = DispatcherConfig(complete_backoff_initial_s=0.05, complete_backoff_max_s=0.2)


@pytest.fixture
def gateway(emulator: EmulatorServer) -> Iterator[EmulatorServer]:
    """The session's emulator, its completes healed again whatever the test did."""
    try:
        yield emulator
    finally:
        emulator.heal_completes()


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[QueueClient]:
    async with QueueClient(
        emulator.url, EMULATOR_APIKEY, complete_retry=RetryPolicy(attempts=1)
    ) as queue_client:
        yield queue_client


async def _taken(client: QueueClient, queue: str, callback_url: str, count: int) -> list[Task]:
    """Put ``count`` level-1 callback tasks and take them all."""
    assert await client.register(queue, ENDPOINT) == queue
    ids = set()
    for _ in range(count):
        request = PutRequest(
            endpoint=ENDPOINT,
            queue=queue,
            level=1,
            response_mode=ResponseMode.CALLBACK,
            callback_url=callback_url,
            data={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=600,
        )
        ids.add(await client.put(request))
    taken: list[Task] = []

    async def all_taken() -> bool:
        request = TakeRequest(queues=[f"{queue}:1"], size=count)
        taken.extend((await client.take(request)).all_tasks())
        return len(taken) >= count

    await wait_for(all_taken, 10, interval=0.05, message="every task taken")
    assert {t.task_id for t in taken} == ids
    return taken


async def test_answers_refused_by_a_gateway_are_delivered_once_it_lets_them_through(
    gateway: EmulatorServer, client: QueueClient, receiver: CallbackReceiver, unique_queue: str
) -> None:
    tasks = await _taken(client, unique_queue, receiver.url, TASKS)
    outbox = Outbox(client, OUTBOX, clock=client.clock.now_s)
    faults = gateway.complete_faults
    refused_before = faults.answered
    gateway.fail_completes(429, HTML_429, {"Content-Type": "text/html", "Retry-After": "1"})
    for task in tasks:
        outbox.expect(task)
        await outbox.complete(task.task_id, result_body(200, task.task_id, {"choices": []}))

    def refused_twice() -> bool:
        # Every answer came back for a second 429 after waiting out the first one's
        # Retry-After: none was given up on the first.
        assert outbox.counters.rejected == 0, "an answer was given up on a gateway's 429"
        return faults.answered - refused_before >= 2 * TASKS

    await wait_for(refused_twice, 15, interval=0.05, message="each answer refused twice")
    assert outbox.entries == TASKS
    assert outbox.counters.rejected == 0
    assert receiver.bodies() == []

    gateway.heal_completes()

    async def delivered() -> bool:
        return outbox.entries == 0

    await wait_for(delivered, 15, interval=0.05, message="every answer delivered")
    assert outbox.counters.delivered == TASKS
    assert outbox.stats()["complete_given_up"] == 0
    assert outbox.counters.failed_attempts.get("gateway_429", 0) >= 2 * TASKS
    await wait_for(
        lambda: len(receiver.bodies()) >= TASKS, 10, interval=0.05, message="every callback"
    )
    for task in tasks:
        [answer] = receiver.answers(task.task_id)
        assert answer["status_code"] == 200
        assert (await client.get_task(task.task_id)).status == "succeeded"


async def test_bella_queues_own_refusal_is_given_up_at_once(
    gateway: EmulatorServer, client: QueueClient
) -> None:
    # A malformed task id: Bella-Queue itself answers 400 with its {code, message, timestamp}.
    outbox = Outbox(client, OUTBOX, clock=client.clock.now_s)
    await outbox.complete("TASK-not-a-number", {"status_code": 200})

    async def settled() -> bool:
        return outbox.entries == 0

    await wait_for(settled, 10, interval=0.02, message="the answer settled")
    assert outbox.counters.rejected == 1
    assert outbox.counters.retries == 0
    assert outbox.counters.delivered == 0
