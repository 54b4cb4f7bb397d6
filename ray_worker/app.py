"""``import_path: ray_worker.app:build_app``: the stable entry point of every Serve config.

The app itself lives in ``ray_worker.serve.app``; configs and running clusters name this path.
"""

from ray_worker.serve.app import build_app

__all__ = ["build_app"]
