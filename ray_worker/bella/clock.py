"""The server's clock as the worker sees it: the offset of Bella-Queue's clock from ours.

Task deadlines (``start_time``, ``expire_time``) are the server's timestamps; comparing them
with a skewed local clock answers every online task 408 at once (local clock fast) or keeps
expired work running (slow). ``ServerClock`` estimates the offset from the ``Date`` header of
each HTTP answer (one-second resolution, so skews under ``min_skew_ms`` are taken as none)
and gives ``now_ms()`` on the server's clock. No I/O of its own; no Ray.
"""

from __future__ import annotations

import time
from collections import deque
from email.utils import parsedate_to_datetime
from statistics import median

__all__ = ["ServerClock"]


class ServerClock:
    """The server's ``now`` from the local clock and the offset its ``Date`` headers show."""

    def __init__(self, *, min_skew_ms: int = 2000, window: int = 5) -> None:
        self.min_skew_ms = min_skew_ms
        self.offset_ms = 0
        """Server clock minus local clock, 0 while within ``min_skew_ms``."""
        self._samples: deque[float] = deque(maxlen=window)

    def observe(self, date_header: str | None, sent_s: float, received_s: float) -> None:
        """Take one answer's ``Date`` header; ``sent_s``/``received_s`` are ``time.time()``
        around the request. Unreadable headers are ignored."""
        if not date_header:
            return
        try:
            server_s = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        # The header truncates to the second: the server's time lies in [date, date + 1).
        sample = (server_s + 0.5 - (sent_s + received_s) / 2) * 1000
        self._samples.append(sample)
        offset = median(self._samples)
        self.offset_ms = int(offset) if abs(offset) >= self.min_skew_ms else 0

    def now_ms(self) -> int:
        """Epoch milliseconds on the server's clock."""
        return time.time_ns() // 1_000_000 + self.offset_ms

    def now_s(self) -> float:
        """Epoch seconds on the server's clock (``time.time()`` moved by the offset)."""
        return time.time() + self.offset_ms / 1000
