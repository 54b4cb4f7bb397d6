"""How one emulator instance runs: its Redis, keys, address, profile and timings.

This module owns :class:`EmulatorConfig` and the event-bus topic it derives (§1.2). It must not
do I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TOPIC_PREFIX", "EmulatorConfig"]


TOPIC_PREFIX = "redis-mesh:private-stream:"


@dataclass(frozen=True)
class EmulatorConfig:
    """How an emulator instance runs. Durations carry their unit in the name."""

    redis_url: str
    """The Redis holding the queues; ``GET /v1/queue/eventbus`` returns it verbatim."""
    apikeys: tuple[str, ...] = ("test-key",)
    """Accepted Bearer keys; anything else gets 401."""
    profile: str = "local"
    """The Spring profile in the event-bus topic ``redis-mesh:private-stream:<profile>:``."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port when EmulatorServer binds; ``create_app`` needs the real port."""
    instance_id: str | None = None
    """The ``instance_id`` of online tasks and the event stream suffix; ``"<host>:<port>"``."""
    data_dir: Path | None = None
    """Where the file store keeps files; a fresh temporary directory when None."""
    lazy_offline_loading: bool = False
    """Emulate §2.4: the first take after a level-1 put returns ``{}``."""
    callback_retry_delays_s: tuple[float, ...] = (2.0, 5.0, 10.0)
    """Waits between callback attempts on IO errors (4 attempts with the default)."""
    callback_timeout_s: float = 30.0
    redelivery_check_interval_s: float = 0.2
    """How often process_timeout timers and batch expiry are checked."""
    routes: Mapping[str, str] = field(default_factory=dict)
    """Model → queue, for puts and batches that name no queue."""
    clock_offset_s: float = 0.0
    """How far this server's clock is from the machine's (task timestamps, expiry, redelivery
    timers, the ``Date`` header): a skewed Bella-Queue for clock-skew tests."""

    def __post_init__(self) -> None:
        if not self.apikeys:
            raise ValueError("EmulatorConfig needs at least one API key")

    @property
    def resolved_instance_id(self) -> str:
        """``instance_id``, or ``"<host>:<port>"``."""
        return self.instance_id or f"{self.host}:{self.port}"

    @property
    def topic(self) -> str:
        """``redis-mesh:private-stream:<profile>:`` (§1.2)."""
        return f"{TOPIC_PREFIX}{self.profile}:"
