"""Fixtures for the write service's integration tests: a command bus over the test database."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.unit.write_service import helpers
from write_service.adapters.postgres import PostgresUnitOfWork
from write_service.service_layer.handlers import Dependencies
from write_service.service_layer.messagebus import CommandBus


@pytest.fixture
def pg_bus(db_pool: asyncpg.Pool[Any]) -> CommandBus:
    """The command bus wired to Postgres, with a cheap argon2 hasher."""
    return CommandBus(
        lambda deadline: PostgresUnitOfWork(db_pool, deadline), Dependencies(hasher=helpers.cheap_hasher())
    )
