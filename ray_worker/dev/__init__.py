"""Developer tools: ``make demo``, the tiny test model, the configuration reference.

Never imported by the worker itself.
"""
