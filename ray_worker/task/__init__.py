"""The per-task runner that lives in each LLM replica: deadline, priority, engine call,
events and the one answer (``runner``, ``answers``). Plain asyncio: no Ray import."""
