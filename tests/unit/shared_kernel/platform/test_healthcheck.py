"""The health probe's URL handling: one host, several hosts (a replicated Postgres), defaults."""

from __future__ import annotations

import socket

import pytest

from shared_kernel.platform.healthcheck import check_reachable, main, url_hosts


def test_url_hosts_names_every_host_of_a_multi_host_url() -> None:
    assert url_hosts("postgresql://u:p@pg-a:5433,pg-b/db?target_session_attrs=read-write") == [
        ("pg-a", 5433),
        ("pg-b", 5432),
    ]
    assert url_hosts("redis://cache:6380/0") == [("cache", 6380)]
    assert url_hosts("rediss://cache/0") == [("cache", 6379)]
    assert url_hosts("postgresql://[::1]:6543/db") == [("::1", 6543)]
    assert url_hosts("") == []
    assert url_hosts("unknown://host/x") == []


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_multi_host_url_is_reachable_when_one_host_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        up = server.getsockname()[1]
        down = _closed_port()
        assert check_reachable(f"postgresql://u@127.0.0.1:{down},127.0.0.1:{up}/db")
        monkeypatch.setenv("DATABASE_URL", f"postgresql://u@127.0.0.1:{down},127.0.0.1:{up}/db")
        assert main(["--reach-env", "DATABASE_URL"]) == 0
    assert not check_reachable(f"postgresql://u@127.0.0.1:{down},127.0.0.1:{up}/db")
    assert main(["--reach-env", "DATABASE_URL"]) == 1
