"""Settings of `python -m payment_provider`, read from the environment at start."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared_kernel.platform.settings import CommonSettings, GrpcServerSettings

DEFAULT_PORT = 50060
TimeoutEffectName = Literal["applied", "not_applied", "random"]


class PaymentProviderSettings(CommonSettings, GrpcServerSettings):
    """Where the provider listens, where it keeps payments, and the failures it starts with.

    The failure settings are only the initial configuration: PaymentProviderAdminService/Configure
    replaces them while the process runs.
    """

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    grpc_port: int = Field(default=DEFAULT_PORT, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    payment_state_file: str = Field(
        default=":memory:",
        min_length=1,
        description="SQLite file that keeps payments and idempotency records across restarts; "
        "`:memory:` keeps them for the life of the process only.",
    )
    payment_latency_ms: int = Field(default=0, ge=0, le=60_000, description="Added to every state-changing call.")
    payment_decline_rate: float = Field(default=0.0, ge=0, le=1, description="Share of authorizations declined.")
    payment_timeout_rate: float = Field(default=0.0, ge=0, le=1, description="Share of calls that time out.")
    payment_unavailable_rate: float = Field(default=0.0, ge=0, le=1, description="Share of calls refused UNAVAILABLE.")
    payment_seed: int = Field(default=0, ge=0, le=2**64 - 1, description="Seed of the failure generator (0: random).")
    payment_decline_above_minor: int = Field(
        default=0, ge=0, description="Authorizations above this many minor units are declined (0: no limit)."
    )
    payment_timeout_effect: TimeoutEffectName = Field(
        default="applied", description="Whether a timed-out call has its effect: applied, not_applied or random."
    )
    payment_timeout_hang_ms: int = Field(
        default=30_000, ge=1, le=600_000, description="Longest hang of a timed-out call whose caller set no deadline."
    )
    payment_decline_customer_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated customer ids whose authorizations are declined."
    )

    @field_validator("payment_decline_customer_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
