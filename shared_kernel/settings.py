"""Settings shared by every process. Each process defines its own model on top of these."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PostgresDsn, RedisDsn
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Logging and identity settings every process reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Minimum level of log records written to stderr."
    )
    log_format: Literal["text", "json"] = Field(default="text", description="`json` writes one JSON object per line.")


class DatabaseSettings(BaseSettings):
    """Connection to the primary Postgres."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    database_url: PostgresDsn = Field(
        default=PostgresDsn("postgresql://postgres@127.0.0.1:5432/tessera"),
        description="asyncpg DSN of the primary Postgres.",
    )
    database_pool_min_size: int = Field(default=2, ge=0, le=100)
    database_pool_max_size: int = Field(default=10, ge=1, le=500)
    database_connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    database_statement_timeout_ms: int = Field(
        default=10_000, ge=0, description="Server-side cap on any statement (0 disables)."
    )


class RedisSettings(BaseSettings):
    """Connection to Redis and the key space this deployment uses in it."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    redis_url: RedisDsn = Field(default=RedisDsn("redis://127.0.0.1:6379/0"), description="Redis URL.")
    redis_key_prefix: str = Field(
        default="tessera:",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of every key and pub/sub channel, so deployments can share a server.",
    )
    redis_socket_timeout_s: float = Field(default=5.0, gt=0, le=120)


class GrpcServerSettings(BaseSettings):
    """Where and how a gRPC server listens."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    grpc_host: str = Field(default="0.0.0.0", description="Interface to bind.")  # noqa: S104
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    grpc_reflection: bool = Field(default=True, description="Serve gRPC server reflection.")
    grpc_shutdown_grace_s: float = Field(
        default=10.0, ge=0, le=300, description="How long in-flight calls may run after SIGTERM."
    )
    grpc_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
