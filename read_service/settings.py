"""Settings of the read service process, read from the environment."""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shared_kernel.settings import CommonSettings, DatabaseSettings, GrpcServerSettings, RedisSettings

# Used only when PAGE_TOKEN_SECRET is unset, so a development stack works out of the box.
# It is public, so anyone can forge page tokens where it is in use; bootstrap warns loudly.
# It is fixed rather than random so that replicas behind one balancer accept each other's tokens.
DEV_PAGE_TOKEN_SECRET = "tessera-development-page-token-secret-do-not-use-in-production"  # noqa: S105


class ReadServiceSettings(CommonSettings, DatabaseSettings, RedisSettings, GrpcServerSettings):
    """Everything `python -m read_service` can be configured with."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    grpc_port: int = Field(default=50052, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    page_token_secret: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="HMAC key that signs ListUsers page tokens; the same on every replica. "
        "Unset: a public development key is used and a warning is logged.",
    )
    catchup_batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Events read from the event log and applied per batch."
    )
    list_page_size_default: int = Field(
        default=20, ge=1, le=1000, description="ListUsers page size when the request says 0."
    )
    list_page_size_max: int = Field(default=100, ge=1, le=1000, description="Largest page size ListUsers accepts.")
    query_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Most time one query may wait for Redis, whatever deadline the caller set; "
        "running out of it answers UNAVAILABLE.",
    )
    consistency_max_wait_ms: int = Field(
        default=5000,
        ge=0,
        le=60_000,
        description="Most milliseconds a query waits for its consistency token to be reflected, "
        "whatever max_wait_ms asks; past it the answer is marked stale.",
    )
    list_scan_limit: int = Field(
        default=5000,
        ge=1,
        le=1_000_000,
        description="Most index entries one ListUsers call reads while filtering by a search; "
        "beyond it the page is returned short, with a token to continue.",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> Self:
        if self.list_page_size_default > self.list_page_size_max:
            raise ValueError("list_page_size_default must not exceed list_page_size_max")
        return self

    def page_token_key(self) -> tuple[bytes, bool]:
        """The page token key, and whether it is the public development default."""
        if self.page_token_secret is None:
            return DEV_PAGE_TOKEN_SECRET.encode(), True
        return self.page_token_secret.get_secret_value().encode(), False
