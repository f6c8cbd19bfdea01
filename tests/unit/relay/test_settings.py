"""RelaySettings: names, defaults and limits of the environment the relay reads."""

from __future__ import annotations

import pydantic
import pytest

from relay.settings import DEFAULT_LOCK_KEY, RelaySettings
from shared_kernel.platform import migrations


def test_defaults() -> None:
    settings = RelaySettings()
    assert settings.relay_batch_size == 500
    assert settings.relay_poll_interval_s == 1.0
    assert settings.relay_heartbeat_interval_s == 1.0
    assert settings.relay_lock_key == DEFAULT_LOCK_KEY
    assert settings.relay_standby_retry_s == 0.5
    assert settings.relay_shutdown_grace_s == 10.0
    assert settings.relay_lock_idle_timeout_s == 10.0


def test_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_BATCH_SIZE", "7")
    monkeypatch.setenv("RELAY_POLL_INTERVAL_S", "0.25")
    monkeypatch.setenv("RELAY_HEARTBEAT_INTERVAL_S", "2")
    monkeypatch.setenv("RELAY_LOCK_KEY", "42")
    monkeypatch.setenv("RELAY_STANDBY_RETRY_S", "0.1")
    monkeypatch.setenv("RELAY_SHUTDOWN_GRACE_S", "3")
    monkeypatch.setenv("REDIS_KEY_PREFIX", "other:")
    settings = RelaySettings()
    assert (
        settings.relay_batch_size,
        settings.relay_poll_interval_s,
        settings.relay_heartbeat_interval_s,
        settings.relay_lock_key,
        settings.relay_standby_retry_s,
        settings.relay_shutdown_grace_s,
        settings.redis_key_prefix,
    ) == (7, 0.25, 2.0, 42, 0.1, 3.0, "other:")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_BATCH_SIZE", "0"),
        ("RELAY_POLL_INTERVAL_S", "0"),
        ("RELAY_HEARTBEAT_INTERVAL_S", "-1"),
        ("RELAY_LOCK_KEY", "-5"),
        ("RELAY_STANDBY_RETRY_S", "0"),
    ],
)
def test_rejects_values_outside_the_limits(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(pydantic.ValidationError):
        RelaySettings()


@pytest.mark.parametrize(("idle_timeout", "valid"), [("0", True), ("3", True), ("2.9", False), ("-1", False)])
def test_the_idle_timeout_leaves_room_for_the_session_rhythm(
    monkeypatch: pytest.MonkeyPatch, idle_timeout: str, valid: bool
) -> None:
    monkeypatch.setenv("RELAY_HEARTBEAT_INTERVAL_S", "1")
    monkeypatch.setenv("RELAY_LOCK_IDLE_TIMEOUT_S", idle_timeout)
    if valid:
        assert RelaySettings().relay_lock_idle_timeout_s == float(idle_timeout)
    else:
        with pytest.raises(pydantic.ValidationError):
            RelaySettings()


def test_the_lock_is_not_the_migrations_lock() -> None:
    assert DEFAULT_LOCK_KEY != migrations._LOCK_KEY
