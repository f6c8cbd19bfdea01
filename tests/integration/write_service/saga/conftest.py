"""A real payment provider process for the saga's integration tests, reset before each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from devstack.supervisor import ServiceProcess
from tests.integration.write_service.saga.support import configure_provider


def provider_processes(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[ServiceProcess]:
    """`python -m payment_provider` on a free port with its own in-memory ledger, as `name`."""
    logs = tmp_path_factory.mktemp(name)
    with ServiceProcess.python_module(
        name,
        "payment_provider",
        grpc_port=0,
        env={"LOG_LEVEL": "WARNING", "GRPC_SHUTDOWN_GRACE_S": "1"},
        log_path=logs / "provider.log",
    ) as process:
        yield process


async def configured_channels(process: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a provider, with every injected failure switched off."""
    async with grpc.aio.insecure_channel(process.address) as channel:
        await configure_provider(channel)
        yield channel


@pytest.fixture(scope="module")
def provider_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`python -m payment_provider` on a free port, payments in memory."""
    yield from provider_processes(tmp_path_factory, "payment-provider")


@pytest.fixture
async def provider(provider_process: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the provider, with every injected failure switched off."""
    async for channel in configured_channels(provider_process):
        yield channel
