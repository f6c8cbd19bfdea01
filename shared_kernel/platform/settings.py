"""Settings shared by every process. Each process defines its own model on top of these."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, FilePath, PostgresDsn, RedisDsn, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# HMAC-SHA256 keys shorter than the hash output weaken it; 32 bytes is the floor RFC 7518 sets for HS256.
MIN_SIGNING_KEY_BYTES = 32


class CommonSettings(BaseSettings):
    """Logging and identity settings every process reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Minimum level of log records written to stderr."
    )
    log_format: Literal["text", "json"] = Field(default="text", description="`json` writes one JSON object per line.")


class MetricsSettings(BaseSettings):
    """Where a process's OpenTelemetry metrics go: a Prometheus scrape endpoint and/or OTLP (OTEL_METRICS_EXPORTER)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics over HTTP at /metrics on this port (0 picks a free one, logged); "
        "unset: no endpoint.",
    )
    metrics_host: str = Field(default="127.0.0.1", min_length=1, description="Interface the metrics endpoint binds.")
    metrics_sample_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="How often database-backed gauges (backlog, saga states) are sampled."
    )

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port_is_unset(cls, value: object) -> object:
        return None if value == "" else value


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


class AuthSettings(BaseSettings):
    """How callers authenticate: bearer tokens from an issuer's JWKS or signed with a shared HMAC key, or nothing."""

    # A secret that fails validation must not be echoed into the error (and from there into logs).
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    auth_mode: Literal["required", "insecure"] = Field(
        default="required",
        description="`required`: every call but health and reflection needs a valid bearer token. "
        "`insecure`: no checks at all, for development only (logged as a warning).",
    )
    auth_signing_key: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key that signs and verifies bearer tokens; at least 32 bytes. "
        "Required when AUTH_MODE=required.",
    )
    auth_previous_signing_key: SecretStr | None = Field(
        default=None,
        description="A second key that still verifies (never signs) tokens, for rotating AUTH_SIGNING_KEY.",
    )
    auth_issuer: str | None = Field(
        default=None, min_length=1, max_length=256, description="When set, tokens must carry this `iss`."
    )
    auth_audience: str | None = Field(
        default=None, min_length=1, max_length=256, description="When set, tokens must carry this `aud`."
    )
    auth_clock_skew_s: float = Field(
        default=30.0, ge=0, le=600, description="Leeway for `exp` and `iat` between the minting and checking clocks."
    )
    auth_jwks: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="The issuer's JSON Web Key Set (an https:// URL or a file path): RS256, ES256 and EdDSA "
        "tokens are verified against it (shared_kernel.platform.security.jwks). May be combined with AUTH_SIGNING_KEY.",
    )
    auth_jwks_refresh_s: float = Field(
        default=300.0, ge=1, le=86400, description="How often the key set is loaded again in the background."
    )

    @field_validator(
        "auth_signing_key", "auth_previous_signing_key", "auth_issuer", "auth_audience", "auth_jwks", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose and shell scripts often pass an empty string for "not configured".
        return None if value == "" else value

    @field_validator("auth_signing_key", "auth_previous_signing_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value().encode()) < MIN_SIGNING_KEY_BYTES:
            raise ValueError(f"a signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes")
        return key

    def verification_keys(self) -> list[bytes]:
        """The keys that verify tokens: the signing key first, then the previous one."""
        keys = [self.auth_signing_key, self.auth_previous_signing_key]
        return [key.get_secret_value().encode() for key in keys if key is not None]


class GrpcServerSettings(AuthSettings):
    """Where and how a gRPC server listens, who may call it, and the limits it enforces."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    grpc_host: str = Field(default="0.0.0.0", description="Interface to bind.")  # noqa: S104
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    grpc_reflection: bool = Field(default=True, description="Serve gRPC server reflection.")
    grpc_shutdown_grace_s: float = Field(
        default=10.0, ge=0, le=300, description="How long in-flight calls may run after SIGTERM."
    )
    grpc_so_reuseport: bool = Field(
        default=False,
        description="Let several processes bind the same port (SO_REUSEPORT) to share its load; "
        "off by default so that a port already taken is an error.",
    )
    grpc_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    grpc_tls_cert_file: FilePath | None = Field(
        default=None, description="PEM certificate chain of the server; with the key, the port serves TLS only."
    )
    grpc_tls_key_file: FilePath | None = Field(default=None, description="PEM private key of the server.")
    grpc_tls_client_ca_file: FilePath | None = Field(
        default=None,
        description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).",
    )
    grpc_max_concurrent_rpcs: int = Field(
        default=1000,
        ge=0,
        le=1_000_000,
        description="Calls one process runs at once (health checks included); more are refused with "
        "RESOURCE_EXHAUSTED. 0 means no limit.",
    )
    grpc_keepalive_time_s: float = Field(
        default=60.0, gt=0, le=7200, description="The server pings a connection idle this long, to find dead peers."
    )
    grpc_keepalive_timeout_s: float = Field(
        default=20.0, gt=0, le=600, description="How long the server waits for a ping's answer before closing."
    )
    grpc_min_client_ping_interval_s: float = Field(
        default=10.0,
        ge=0,
        le=7200,
        description="Closest interval between client pings the server tolerates; closer ones earn strikes.",
    )
    grpc_max_ping_strikes: int = Field(
        default=2, ge=0, le=100, description="Strikes before the server closes a pinging client's connection (0: none)."
    )
    grpc_keepalive_permit_without_calls: bool = Field(
        default=True, description="Accept (and send) keepalive pings on connections without calls in flight."
    )
    grpc_max_connection_age_s: float = Field(
        default=300.0,
        ge=0,
        le=30 * 24 * 3600,
        description="Connections are asked to reconnect after this long (±10 %), so clients rebalance "
        "over new replicas. 0 means never.",
    )
    grpc_max_connection_age_grace_s: float = Field(
        default=30.0, ge=0, le=3600, description="How long calls in flight may finish on a connection past its age."
    )

    @field_validator("grpc_tls_cert_file", "grpc_tls_key_file", "grpc_tls_client_ca_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _tls_files_together(self) -> Self:
        if (self.grpc_tls_cert_file is None) != (self.grpc_tls_key_file is None):
            raise ValueError("GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE must be set together")
        if self.grpc_tls_client_ca_file is not None and self.grpc_tls_cert_file is None:
            raise ValueError("GRPC_TLS_CLIENT_CA_FILE (mutual TLS) needs GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE")
        return self

    @property
    def grpc_tls_enabled(self) -> bool:
        """Whether the server listens with TLS."""
        return self.grpc_tls_cert_file is not None
