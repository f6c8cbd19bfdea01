"""The write service's settings: defaults, environment overrides and cross-field checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from write_service.settings import MigrateSettings, WriteServiceSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("GRPC_PORT", "COMMAND_TIMEOUT_S", "ARGON2_MEMORY_COST_KIB", "ARGON2_PARALLELISM", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    settings = WriteServiceSettings()
    assert settings.grpc_port == 50051
    assert settings.command_timeout_s == 10.0
    assert settings.command_max_attempts == 3
    assert (settings.argon2_time_cost, settings.argon2_memory_cost_kib, settings.argon2_parallelism) == (3, 65536, 4)
    assert settings.log_level == "INFO"
    assert MigrateSettings().migrate_wait_s == 60.0


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("GRPC_PORT", "6000")
    monkeypatch.setenv("COMMAND_TIMEOUT_S", "2.5")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/tessera")
    settings = WriteServiceSettings()
    assert settings.grpc_port == 6000
    assert settings.command_timeout_s == 2.5
    assert str(settings.database_url) == "postgresql://u@db:5432/tessera"


def test_argon2_memory_must_cover_its_lanes(monkeypatch):
    monkeypatch.setenv("ARGON2_PARALLELISM", "4")
    monkeypatch.setenv("ARGON2_MEMORY_COST_KIB", "16")
    with pytest.raises(ValidationError, match="8 \\* argon2_parallelism"):
        WriteServiceSettings()
