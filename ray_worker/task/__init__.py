"""The per-task code: the runner and its cancellation watch run in each LLM replica
(``runner``, ``cancel_watch``); ``answers``, ``outbox`` and ``limits`` are helpers both sides of
the hop use (``tests/unit/test_layout.py`` lists each module's side). Plain asyncio: no Ray
import."""
