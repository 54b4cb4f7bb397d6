"""Ray Serve: the app builder, the poller and LLM deployments, handles, and the engines.

The only folder that imports ``ray.serve`` or vLLM; the logic it runs lives in ``worker``,
``task`` and ``eventbus``.
"""
