"""The Bella-Queue emulator: a development tool (``python -m ray_worker.emulator``).

Serves the protocol over HTTP on a real Redis; the worker itself never imports it.
"""
