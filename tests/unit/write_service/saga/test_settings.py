"""The saga worker's settings: names, defaults and the checks between them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from write_service.saga.settings import SagaWorkerSettings


def test_saga_worker_port_wins_over_grpc_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_PORT", "7001")
    assert SagaWorkerSettings().grpc_port == 7001
    monkeypatch.setenv("SAGA_WORKER_PORT", "0")
    assert SagaWorkerSettings().grpc_port == 0


def test_reads_the_saga_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "PAYMENT_PROVIDER_ADDRESS": "provider:50060",
        "SAGA_LEASE_S": "12",
        "SAGA_MAX_ATTEMPTS": "4",
        "SAGA_BACKOFF_BASE_MS": "50",
        "SAGA_BACKOFF_CAP_MS": "800",
        "SAGA_CONCURRENCY": "3",
        "SAGA_BREAKER_FAILURE_THRESHOLD": "9",
        "SAGA_BREAKER_COOLDOWN_S": "1.5",
    }.items():
        monkeypatch.setenv(name, value)
    settings = SagaWorkerSettings()
    assert settings.payment_provider_address == "provider:50060"
    assert (settings.saga_lease_s, settings.saga_max_attempts, settings.saga_concurrency) == (12, 4, 3)
    assert (settings.saga_backoff_base_ms, settings.saga_backoff_cap_ms) == (50, 800)
    assert (settings.saga_breaker_failure_threshold, settings.saga_breaker_cooldown_s) == (9, 1.5)


@pytest.mark.parametrize(
    "env",
    [
        {"SAGA_BACKOFF_BASE_MS": "500", "SAGA_BACKOFF_CAP_MS": "100"},
        {"SAGA_LEASE_S": "2", "PAYMENT_PROVIDER_TIMEOUT_S": "1"},
        {"SAGA_MAX_ATTEMPTS": "0"},
        {"SAGA_CONCURRENCY": "0"},
    ],
)
def test_rejects_inconsistent_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        SagaWorkerSettings()
