"""The event bus: online task events into Redis Streams (protocol §4).

Modules by where their code runs. Callers (LLM replicas, the poller): ``client``
(``EventBusClient``, the callers' sink, and ``node_publisher``) and ``batching``
(``EventBatcher``, no Ray, no Redis). The per-node publisher actor: ``publisher_actor``
(``RedisPublisher``) and ``redis_writer`` (``StreamWriter``, no Ray). Both sides: ``shared``
(the entry and batch format, names, statuses; pure helpers). The CLI and the poller's checks:
``redis_check`` (``ping``, ``config_value``). Import from those modules: this package
re-exports nothing, so ``import ray_worker.eventbus.redis_check`` (e.g. ``ray-worker check``)
never imports Ray.
"""
