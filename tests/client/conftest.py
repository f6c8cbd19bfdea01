"""Fixtures for the client library's tests: the real stack (tests/e2e/conftest.py) and a client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devstack.supervisor import Stack
from tessera_client import TesseraClient
from tests.e2e.conftest import (  # noqa: F401 - fixtures shared with the e2e tests
    e2e_database,
    e2e_logs,
    e2e_prefix,
    stack,
    unique,
)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[TesseraClient]:  # noqa: F811
    """A client over the stack's write service and its replicas (a static list, round_robin)."""
    async with TesseraClient(stack.write_address, stack.read_addresses, timeout=15.0) as tessera:
        yield tessera
