"""bella-ray-worker: a Bella-Queue GPU inference worker on Ray Serve and vLLM.

Folders follow where code runs and what it may import (``tests/unit/test_layout.py``
enforces it):

- ``bella/``: the wire protocol and the worker's Bella-Queue client (no Ray);
- ``worker/``: the control plane, poller, capacity and routing (plain asyncio, no Ray);
- ``task/``: the per-task runner that lives in an LLM replica (no Ray);
- ``eventbus/``: the Redis writer, the caller-side batcher and the per-node publisher actor;
- ``serve/``: the app builder, the Serve deployments and the engines (the only place that
  imports ``ray.serve`` or vLLM);
- ``emulator/``, ``dev/``, ``testing/``: development tools, never imported by the above.
"""

from ray_worker import errors
from ray_worker.bella import protocol

__version__ = "0.1.0"

__all__ = ["__version__", "errors", "protocol"]
