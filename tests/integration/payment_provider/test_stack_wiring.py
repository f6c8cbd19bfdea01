"""The development stack runs the payment provider and the saga workers, wired to each other."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from devstack.databases import create_database, drop_database
from devstack.processes import wait_gone
from devstack.supervisor import ServiceError, Stack, StackConfig
from shared_kernel.platform.healthcheck import check_serving
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
async def fresh_database(postgres_admin_url: str) -> AsyncIterator[str]:
    url = await create_database(postgres_admin_url)
    try:
        yield url
    finally:
        await drop_database(postgres_admin_url, url)


def _config(database_url: str, redis_url: str, logs: Path, **overrides: object) -> StackConfig:
    config = StackConfig(
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=f"wiring:{secrets.token_hex(4)}:",
        relays=0,
        read_ports=(),
        log_dir=logs,
        migrate=False,
        stop_grace=5.0,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


async def test_provider_and_saga_workers_start_wired_and_stop(
    fresh_database: str, redis_server_url: str, tmp_path: Path
):
    config = _config(
        fresh_database,
        redis_server_url,
        tmp_path / "logs",
        saga_workers=2,
        provider_env={"PAYMENT_DECLINE_ABOVE_MINOR": "500"},
        saga_env={"SAGA_POLL_INTERVAL_S": "0.5"},
    )
    stack = await Stack(config).start_async()
    try:
        assert stack.provider is not None
        assert [worker.name for worker in stack.saga_workers] == ["saga-1", "saga-2"]
        assert check_serving(stack.provider_address)
        assert all(check_serving(address) for address in stack.saga_addresses)
        for worker in stack.saga_workers:
            assert worker.env["PAYMENT_PROVIDER_ADDRESS"] == stack.provider_address
            assert worker.env["SAGA_POLL_INTERVAL_S"] == "0.5"
        assert stack.provider_state_file() == ":memory:"
        async with grpc.aio.insecure_channel(stack.provider_address) as channel:
            admin = admin_grpc.PaymentProviderAdminServiceStub(channel)
            reply = await admin.GetConfiguration(admin_pb.GetConfigurationRequest(), timeout=5)
            assert reply.configuration.decline_above_minor == 500

        # kill -9 one worker and bring it back on the same port, as the crash-recovery tests do.
        victim = stack.saga_workers[0]
        port = victim.port
        victim.kill()
        stack.check()  # a kill asked for is not a failure
        victim.start()
        await victim.wait_healthy_async(30)
        assert victim.port == port
        extra = stack.add_saga_worker()
        assert extra.name == "saga-3" and check_serving(extra.address)
        pids = [process.pid or 0 for process in stack.processes]
    finally:
        await stack.stop_async()
    assert wait_gone(pids, 5.0) == []
    for name in ("provider", "saga-1", "saga-2", "saga-3"):
        assert (tmp_path / "logs" / f"{name}.log").exists()
    # SIGTERM, not SIGKILL: each worker logged its orderly stop.
    assert "saga worker stopped" in (tmp_path / "logs" / "saga-2.log").read_text()


async def test_without_a_provider_the_workers_use_the_configured_address(
    fresh_database: str, redis_server_url: str, tmp_path: Path
):
    config = _config(
        fresh_database,
        redis_server_url,
        tmp_path / "logs",
        payment_provider=False,
        saga_workers=1,
        saga_env={"PAYMENT_PROVIDER_ADDRESS": "127.0.0.1:1"},
    )
    stack = await Stack(config).start_async()
    try:
        assert stack.provider is None
        with pytest.raises(ServiceError, match="no payment provider"):
            _ = stack.provider_address
        assert stack.saga_workers[0].env["PAYMENT_PROVIDER_ADDRESS"] == "127.0.0.1:1"
    finally:
        await stack.stop_async()


def test_provider_keeps_payments_under_the_data_dir(tmp_path: Path):
    stack = Stack(StackConfig(data_dir=tmp_path))
    assert stack.provider_state_file() == str(tmp_path / "payment-provider.sqlite3")
    chosen = Stack(StackConfig(data_dir=tmp_path, provider_env={"PAYMENT_STATE_FILE": "/elsewhere.db"}))
    assert chosen.provider_state_file() == "/elsewhere.db"
