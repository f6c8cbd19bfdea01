"""Configuration of the saga worker, read from the environment."""

from __future__ import annotations

from typing import Self

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared_kernel.platform.settings import CommonSettings, DatabaseSettings, GrpcServerSettings


class SagaSettings(CommonSettings, DatabaseSettings):
    """How sagas are driven: leases, retries, the provider and its circuit breaker."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    payment_provider_address: str = Field(
        default="127.0.0.1:50060", min_length=1, description="host:port of the payment provider's gRPC API."
    )
    payment_provider_secondary_address: str = Field(
        default="",
        description="host:port of a second payment provider; empty for none. A saga authorizes through it when "
        "the primary's circuit breaker is open, and then captures, voids and refunds that payment there too.",
    )
    payment_provider_timeout_s: float = Field(
        default=2.0, gt=0, le=120, description="Deadline of one call to the payment provider."
    )
    saga_lease_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a claimed saga stays with its worker; a saga whose lease ran out (its worker "
        "died) is stale and any worker resumes it at its current step.",
    )
    saga_max_attempts: int = Field(
        default=8, ge=1, le=1000, description="Failed attempts of one step before the saga is parked as failed."
    )
    saga_backoff_base_ms: int = Field(default=200, ge=1, le=600_000, description="Delay before the first retry.")
    saga_backoff_cap_ms: int = Field(default=10_000, ge=1, le=3_600_000, description="Longest delay between retries.")
    saga_concurrency: int = Field(default=16, ge=1, le=1000, description="Sagas one worker drives at once.")
    saga_poll_interval_s: float = Field(
        default=1.0, gt=0, le=300, description="Fallback polling interval when no NOTIFY arrives."
    )
    saga_breaker_failure_threshold: int = Field(
        default=5, ge=1, le=1000, description="Consecutive transient provider failures that open the breaker."
    )
    saga_breaker_cooldown_s: float = Field(
        default=2.0, gt=0, le=3600, description="How long the open breaker fails calls fast before one probe."
    )
    saga_worker_id: str = Field(
        default="", max_length=200, description="Name of this worker in the lease columns (default: host:pid)."
    )
    database_pool_max_size: int = Field(
        default=20, ge=1, le=500, description="Pool size; keep it above SAGA_CONCURRENCY so sagas do not queue."
    )
    database_startup_wait_s: float = Field(
        default=30.0, ge=0, le=600, description="How long start-up keeps retrying an unreachable Postgres."
    )

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> Self:
        if self.saga_backoff_cap_ms < self.saga_backoff_base_ms:
            raise ValueError("saga_backoff_cap_ms must not be below saga_backoff_base_ms")
        # A step makes up to two provider calls while it holds the lease; a lease shorter than
        # that would hand a saga to a second worker in the middle of every slow step.
        if self.saga_lease_s < 3 * self.payment_provider_timeout_s:
            raise ValueError("saga_lease_s must be at least 3 x payment_provider_timeout_s")
        return self


class SagaWorkerSettings(SagaSettings, GrpcServerSettings):
    """Everything `python -m write_service.saga` reads: the saga settings plus its health port."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    grpc_port: int = Field(
        default=50061,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("SAGA_WORKER_PORT", "GRPC_PORT"),
        description="Port of the worker's grpc.health.v1 service (0 picks a free one).",
    )


class SagaAdminSettings(CommonSettings, DatabaseSettings):
    """Everything `python -m write_service.saga.admin` reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)
