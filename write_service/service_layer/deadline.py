"""The time a command may still spend, shared by every call it makes."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point on the monotonic clock after which a command gives up."""

    expires_at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """A deadline `seconds` from now (never in the past)."""
        return cls(time.monotonic() + max(0.0, seconds))

    def remaining(self) -> float:
        """Seconds left, 0.0 once expired."""
        return max(0.0, self.expires_at - time.monotonic())

    @property
    def expired(self) -> bool:
        """True once no time is left."""
        return self.remaining() <= 0.0
