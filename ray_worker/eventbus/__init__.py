"""The event bus: online task events into Redis Streams (protocol §4).

``writer`` (the Redis writer, no Ray), ``batcher`` (the caller-side batcher, no Ray, no
Redis) and ``actor`` (the per-node publisher Ray actor and ``EventBusClient``). Import from
those modules: this package re-exports nothing, so ``import ray_worker.eventbus.writer``
(e.g. ``ray-worker check``) never imports Ray.
"""
