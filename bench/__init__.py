"""Benchmarks: each module prints JSON figures measured side by side in one run."""
