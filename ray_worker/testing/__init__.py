"""Test harness shipped with the package: a Bella-Queue emulator, a simulated LLM engine and a
throwaway redis-server. Tests, ``make demo``, benchmarks and notebooks import these; the worker
itself never does.
"""
