"""Test harnesses shipped with the package: a throwaway redis-server, a local Ray cluster,
``serve run`` in a subprocess, a callback receiver and ``wait_for``. Tests, ``make demo``,
benchmarks and notebooks import these; the worker itself never does.
"""
