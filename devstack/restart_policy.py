"""When a crashed service is started again, and when the supervisor gives up on it.

Pure bookkeeping, no processes: `RestartPolicy` holds the parameters, `RestartTracker` the
state of one service. A crash shortly after a start counts towards giving up; a run longer
than `stable_after_s` proves the service healthy, so its next crash starts a new count.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ServiceState(enum.Enum):
    """Where a supervised service stands."""

    RUNNING = "up"
    BACKOFF = "restarting"  # crashed; waiting for its backoff delay before the next start
    FAILED = "FAILED"  # crashed too often in a row; left down until the stack restarts


@dataclass(frozen=True)
class RestartPolicy:
    """Capped exponential backoff, and a limit on crashes in a row."""

    backoff_s: float = 0.5  # wait before the first restart; doubled for each further crash in a row
    max_backoff_s: float = 10.0
    max_crashes: int = 5  # the crash that makes this many in a row marks the service failed
    stable_after_s: float = 30.0  # a run at least this long resets the count

    def __post_init__(self) -> None:
        """Refuse parameters that cannot work."""
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s")
        if self.max_crashes < 1:
            raise ValueError("max_crashes must be at least 1")
        if self.stable_after_s <= 0:
            raise ValueError("stable_after_s must be positive")

    def delay(self, crashes: int) -> float:
        """Seconds to wait before restarting after the `crashes`-th crash in a row (1-based)."""
        return min(self.backoff_s * 2.0 ** max(crashes - 1, 0), self.max_backoff_s)


@dataclass
class RestartTracker:
    """The restart state of one service, driven by the supervisor's observations."""

    policy: RestartPolicy
    state: ServiceState = ServiceState.RUNNING
    crashes: int = 0  # crashes in a row, without a stable run in between
    restarts: int = 0  # starts after a crash, over the stack's life
    restart_at: float | None = None  # monotonic time of the next start while in BACKOFF

    def crashed(self, now: float, uptime_s: float) -> float | None:
        """Record an unexpected exit after `uptime_s` of running; the delay before restarting, or None: give up."""
        if uptime_s >= self.policy.stable_after_s:
            self.crashes = 0
        self.crashes += 1
        if self.crashes >= self.policy.max_crashes:
            self.state = ServiceState.FAILED
            self.restart_at = None
            return None
        delay = self.policy.delay(self.crashes)
        self.state = ServiceState.BACKOFF
        self.restart_at = now + delay
        return delay

    def due(self, now: float) -> bool:
        """Whether a service in backoff should be started now."""
        return self.state is ServiceState.BACKOFF and self.restart_at is not None and now >= self.restart_at

    def restarted(self) -> None:
        """Record that the service was started again."""
        self.state = ServiceState.RUNNING
        self.restart_at = None
        self.restarts += 1
