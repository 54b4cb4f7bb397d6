"""The event bus: online task events into Redis Streams (protocol §4).

The Redis writer, the caller-side batcher, and the per-node publisher Ray actor.
"""
