"""Settings for a read replica run inside the calling process (tests and measurements)."""

from __future__ import annotations

from typing import Any

from pydantic import PostgresDsn, RedisDsn

from read_service.settings import ReadServiceSettings


def replica_settings(database_url: str, redis_url: str, prefix: str, **overrides: Any) -> ReadServiceSettings:
    """A replica on loopback and a free port, with a one-second shutdown grace and a small pool;
    `overrides` set other ReadServiceSettings fields."""
    fields: dict[str, Any] = {
        "database_url": PostgresDsn(database_url),
        "redis_url": RedisDsn(redis_url),
        "redis_key_prefix": prefix,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "grpc_shutdown_grace_s": 1,
        "database_pool_min_size": 1,
    }
    return ReadServiceSettings(**(fields | overrides))
