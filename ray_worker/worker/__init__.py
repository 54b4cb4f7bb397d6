"""The control plane, inside the poller replica: take, capacity, routing, supervision.

Plain asyncio: no Ray import (``ray_worker.serve`` wraps it in the ``QueuePoller`` deployment).
"""
