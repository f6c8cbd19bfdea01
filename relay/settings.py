"""The relay's settings: the shared pieces plus the relay's own knobs, read from the environment."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared_kernel.platform.settings import CommonSettings, DatabaseSettings, RedisSettings

# Any constant works as long as every relay of a deployment uses the same one and nothing
# else takes it; it differs from the migrations' lock so a relay never waits on a migration.
DEFAULT_LOCK_KEY = 0x7E55E2A1


class RelaySettings(CommonSettings, DatabaseSettings, RedisSettings):
    """Everything `python -m relay` reads from the environment (names are case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    relay_batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Outbox rows positioned and published per batch; a full batch is followed at once by the next.",
    )
    relay_max_batch_size: int = Field(
        default=4000,
        ge=1,
        le=10_000,
        description=(
            "Largest batch while a backlog drains: each full batch doubles the next, from relay_batch_size up to this."
        ),
    )
    relay_poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=300,
        description="Fallback poll interval; NOTIFY normally wakes the relay sooner.",
    )
    relay_heartbeat_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=300,
        description="How often the active relay publishes a StreamHead and re-checks that it holds the lock.",
    )
    relay_lock_key: int = Field(
        default=DEFAULT_LOCK_KEY,
        ge=0,
        le=2**63 - 1,
        description="Postgres advisory lock id that elects the one active relay.",
    )
    relay_standby_retry_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often a standby retries the lock; bounds the takeover time after the active relay dies.",
    )
    relay_lock_idle_timeout_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="Postgres ends the lock session after this long without a query from the relay "
        "(idle_session_timeout, Postgres 14+), so a frozen relay hands the lock over; 0 disables.",
    )
    relay_shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="How long SIGTERM waits for the batch in flight before cancelling it (it is re-published later).",
    )

    @model_validator(mode="after")
    def _idle_timeout_above_the_session_rhythm(self) -> Self:
        # A healthy session queries every heartbeat (active) or standby retry: the timeout
        # must leave room for a slow check, or healthy relays would lose the lock.
        rhythm = max(self.relay_heartbeat_interval_s, self.relay_standby_retry_s)
        if self.relay_lock_idle_timeout_s and self.relay_lock_idle_timeout_s < 3 * rhythm:
            raise ValueError(
                "relay_lock_idle_timeout_s must be 0 or at least 3 x max(relay_heartbeat_interval_s, "
                "relay_standby_retry_s)"
            )
        return self
