"""Integration tier: real redis-server, the emulator over real HTTP, local Ray Serve with the
simulated engine. The session's Ray (``ray_serve``) and emulator come from ``tests/conftest.py``;
modules deploy their apps once and share them between their tests.
"""
