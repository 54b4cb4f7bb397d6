"""Bella-Queue's wire protocol (``protocol``) and the worker's HTTP client (``client``).

Runs anywhere; imports neither Ray nor Redis.
"""
