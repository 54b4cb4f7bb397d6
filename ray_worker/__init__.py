"""bella-ray-worker: a Bella-Queue GPU inference worker on Ray Serve and vLLM."""

from ray_worker import errors, protocol

__version__ = "0.1.0"

__all__ = ["__version__", "errors", "protocol"]
