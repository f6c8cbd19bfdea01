"""Settings of the read service process, read from the environment."""

from __future__ import annotations

import socket
from typing import Self

from pydantic import Field, RedisDsn, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from read_service.context import ParkingMode
from read_service.lease import ApplyMode
from shared_kernel.platform.settings import CommonSettings, DatabaseSettings, GrpcServerSettings, RedisSettings

# Used only when PAGE_TOKEN_SECRET is unset, so a development stack works out of the box.
# It is public, so anyone can forge page tokens where it is in use; bootstrap warns loudly.
# It is fixed rather than random so that replicas behind one balancer accept each other's tokens.
# On by default: it is exact (docs/decisions/0018), and a replica load-tested as it comes should show
# the hit path. About half a kilobyte per entry for a typical view: some 5 MB per view type when full.
DEFAULT_NEAR_CACHE_SIZE = 10_000

DEV_PAGE_TOKEN_SECRET = "tessera-development-page-token-secret-do-not-use-in-production"  # noqa: S105


class ReadServiceSettings(CommonSettings, DatabaseSettings, RedisSettings, GrpcServerSettings):
    """Everything `python -m read_service` can be configured with."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    grpc_port: int = Field(default=50052, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    redis_events_url: RedisDsn | None = Field(
        default=None,
        description="Redis server the relays publish the event stream to, when this replica keeps its views in "
        "a Redis server of its own (REDIS_URL); unset: the stream is read from REDIS_URL.",
    )
    page_token_secret: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="HMAC key that signs page tokens (users, products, orders); the same on every replica. "
        "Unset: a public development key is used and a warning is logged.",
    )
    catchup_batch_size: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Events read from the event log and applied per batch "
        "(a catch-up far behind the head reads pages of 5,000).",
    )
    list_page_size_default: int = Field(
        default=20, ge=1, le=1000, description="Page size of every list query when the request says 0."
    )
    list_page_size_max: int = Field(default=100, ge=1, le=1000, description="Largest page size a list query accepts.")
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
        description="Most index entries one list or search call reads while filtering; "
        "beyond it the page is returned short, with a token to continue.",
    )
    read_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Worker processes serving one port (SO_REUSEPORT); each is a full read service. "
        "Above 1, `python -m read_service` supervises them (see read_service/workers.py).",
    )
    read_replica_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=100,
        pattern=r"^[!-~]+$",
        description="Name of this replica in the x-tessera-replica response header (default: the host name).",
    )
    read_worker_restart_max_backoff_s: float = Field(
        default=10.0, gt=0, le=300, description="Longest pause before a crashed worker is started again."
    )
    read_worker_max_crashes: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Crashes in a row, without becoming ready in between, after which the group exits 1.",
    )
    read_apply_mode: ApplyMode = Field(
        default=ApplyMode.LEASE,
        description="`lease`: of the replicas (and workers) sharing a key space, the one holding the applying "
        "lease applies events and the others follow it (right for every topology); `always`: every "
        "replica applies every event itself (see docs/scaling.md).",
    )
    parking_mode: ParkingMode = Field(
        default=ParkingMode.AGGREGATE,
        description="`aggregate`: an event a projection cannot apply parks that aggregate's events and the rest "
        "goes on; `projection`: it stops the whole projection until an operator skips it (decision 0029).",
    )
    read_lease_ttl_ms: int = Field(
        default=2000,
        ge=100,
        le=60_000,
        description="Lifetime of the applying lease: a dead holder is replaced within about this "
        "plus the renew interval.",
    )
    read_lease_renew_ms: int = Field(
        default=500, ge=10, le=30_000, description="How often the holder renews the lease (at most half its TTL)."
    )
    near_cache_size: int = Field(
        default=DEFAULT_NEAR_CACHE_SIZE,
        ge=0,
        le=10_000_000,
        description="Single views (users, products, orders by id) kept in memory per view type, least recently "
        "used out first, and kept exact by the event stream (a hit answers without Redis); 0 turns the near "
        "cache off.",
    )
    watch_queue_max: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Changes a Watch stream may fall behind by before it is ended with RESOURCE_EXHAUSTED.",
    )
    watch_max_streams: int = Field(
        default=1000,
        ge=0,
        le=1_000_000,
        description="Watch streams one process serves at once; more are refused with RESOURCE_EXHAUSTED.",
    )
    redis_policy_check_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often a serving replica checks that Redis's maxmemory-policy cannot evict views "
        "(read_service/eviction.py).",
    )
    near_cache_log_interval_s: float = Field(
        default=60.0, gt=0, le=86_400, description="How often each near cache logs its hit ratio."
    )
    # Set by the worker group parent for its children only.
    read_worker_control_fd: int | None = Field(default=None, ge=0, description="Internal: the parent's socket.")
    read_worker_index: int = Field(default=0, ge=0, description="Internal: this worker's number in its group.")

    @model_validator(mode="after")
    def _default_within_max(self) -> Self:
        if self.list_page_size_default > self.list_page_size_max:
            raise ValueError("list_page_size_default must not exceed list_page_size_max")
        if self.read_lease_renew_ms * 2 > self.read_lease_ttl_ms:
            raise ValueError("read_lease_renew_ms must be at most half of read_lease_ttl_ms")
        return self

    def page_token_key(self) -> tuple[bytes, bool]:
        """The page token key, and whether it is the public development default."""
        if self.page_token_secret is None:
            return DEV_PAGE_TOKEN_SECRET.encode(), True
        return self.page_token_secret.get_secret_value().encode(), False
