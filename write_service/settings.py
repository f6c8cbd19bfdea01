"""Configuration of the write service and its migrate command, read from the environment."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared_kernel.platform.settings import CommonSettings, DatabaseSettings, GrpcServerSettings


class WriteServiceSettings(CommonSettings, DatabaseSettings, GrpcServerSettings):
    """Everything `python -m write_service` reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    database_startup_wait_s: float = Field(
        default=30.0, ge=0, le=600, description="How long start-up keeps retrying an unreachable Postgres."
    )
    command_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Most time one command may spend, whatever deadline the caller set (or none).",
    )
    command_max_attempts: int = Field(
        default=3, ge=1, le=10, description="Attempts for a command that hits a serialization failure or deadlock."
    )
    command_retry_backoff_ms: int = Field(
        default=20, ge=0, le=5000, description="First retry delay; doubles per attempt, with ±50% jitter."
    )
    idempotency_retention_s: int = Field(
        default=86400,
        ge=1,
        le=30 * 86400,
        description="How long the reply to a command sent with an idempotency key is kept for its retries.",
    )
    idempotency_cleanup_interval_s: float = Field(
        default=60.0, gt=0, le=86400, description="How often expired idempotency keys are deleted."
    )
    idempotency_cleanup_batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Expired idempotency keys deleted per transaction."
    )
    write_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Worker processes serving one port (SO_REUSEPORT); each is a full write service with its own "
        "pool. Above 1, `python -m write_service` supervises them (shared_kernel/platform/worker_group.py).",
    )
    write_worker_restart_max_backoff_s: float = Field(
        default=10.0, gt=0, le=300, description="Longest pause before a crashed worker is started again."
    )
    write_worker_max_crashes: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Crashes in a row, without becoming ready in between, after which the group exits 1.",
    )
    write_worker_control_fd: int | None = Field(default=None, ge=0, description="Internal: the parent's socket.")
    write_worker_index: int = Field(default=0, ge=0, description="Internal: this worker's number in its group.")
    argon2_time_cost: int = Field(default=3, ge=1, le=50, description="argon2id iterations.")
    argon2_memory_cost_kib: int = Field(
        default=65536, ge=8, le=4 * 1024 * 1024, description="argon2id memory per hash, in KiB."
    )
    argon2_parallelism: int = Field(default=4, ge=1, le=64, description="argon2id lanes (threads) per hash.")
    argon2_max_concurrent: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Hashes computed at once by the whole service (a worker group divides it among its workers, "
        "at least one each); peak hashing memory is this times ARGON2_MEMORY_COST_KIB.",
    )

    @model_validator(mode="after")
    def _check_argon2(self) -> Self:
        # argon2 refuses less than 8 KiB of memory per lane.
        if self.argon2_memory_cost_kib < 8 * self.argon2_parallelism:
            raise ValueError("argon2_memory_cost_kib must be at least 8 * argon2_parallelism")
        return self


class MigrateSettings(CommonSettings, DatabaseSettings):
    """Everything `python -m write_service.migrate` reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    migrate_wait_s: float = Field(
        default=60.0, ge=0, le=3600, description="How long migrate keeps retrying an unreachable Postgres."
    )


class AuditSettings(CommonSettings, DatabaseSettings):
    """Everything `python -m write_service.audit` reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)
