"""The composition root: builds the write service from its settings and a pool.

Resources are opened here inside the running loop, never at import time, and closed in
the reverse order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from shared_kernel.platform.db import create_pool
from write_service.adapters.password_hasher import Argon2PasswordHasher
from write_service.adapters.unit_of_work import PostgresExpiredKeyPurger, PostgresUnitOfWork
from write_service.entrypoints.catalog import CatalogCommandServicer
from write_service.entrypoints.idempotency_cleanup import ExpiredKeyCleanup
from write_service.entrypoints.orders import OrderCommandServicer
from write_service.entrypoints.users import UserCommandServicer
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import UnitOfWork
from write_service.settings import WriteServiceSettings

logger = logging.getLogger(__name__)

IDLE_IN_TRANSACTION_TIMEOUT_MS = 5_000
APPLICATION_NAME = "tessera-write-service"
_POOL_CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class WriteService:
    """The wired service: the bus that runs commands and the servicer that exposes it."""

    bus: CommandBus
    servicer: UserCommandServicer
    catalog_servicer: CatalogCommandServicer
    order_servicer: OrderCommandServicer


def build(pool: asyncpg.Pool[Any], settings: WriteServiceSettings) -> WriteService:
    """Wire handlers, adapters and the servicer around an open pool."""
    hasher = Argon2PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_cost_kib=settings.argon2_memory_cost_kib,
        parallelism=settings.argon2_parallelism,
        max_concurrent=settings.argon2_max_concurrent,
    )

    def unit_of_work(deadline: Deadline) -> UnitOfWork:
        return PostgresUnitOfWork(pool, deadline)

    bus = CommandBus(
        unit_of_work,
        Dependencies(hasher=hasher),
        max_attempts=settings.command_max_attempts,
        retry_backoff_s=settings.command_retry_backoff_ms / 1000,
        idempotency_retention=timedelta(seconds=settings.idempotency_retention_s),
    )
    servicer = UserCommandServicer(bus, max_command_s=settings.command_timeout_s)
    return WriteService(
        bus=bus,
        servicer=servicer,
        catalog_servicer=CatalogCommandServicer(bus, max_command_s=settings.command_timeout_s),
        order_servicer=OrderCommandServicer(bus, max_command_s=settings.command_timeout_s),
    )


@asynccontextmanager
async def expired_key_cleanup(pool: asyncpg.Pool[Any], settings: WriteServiceSettings) -> AsyncIterator[None]:
    """Delete expired idempotency keys periodically while the block runs; stop it on the way out."""
    cleanup = ExpiredKeyCleanup(
        PostgresExpiredKeyPurger(pool),
        interval_s=settings.idempotency_cleanup_interval_s,
        batch_size=settings.idempotency_cleanup_batch_size,
    )
    task = asyncio.create_task(cleanup.run(), name="idempotency-key-cleanup")
    try:
        yield
    finally:
        task.cancel()
        # wait() never raises the task's CancelledError, yet still lets our own cancellation through.
        await asyncio.wait([task])


@asynccontextmanager
async def open_pool(settings: WriteServiceSettings) -> AsyncIterator[asyncpg.Pool[Any]]:
    """Open the Postgres pool (waiting for Postgres at start-up) and close it on the way out."""
    # No server-side reset on release: every command's state is transaction-local (SET LOCAL,
    # xact advisory locks), and the reset cost a round trip per command.
    # A command's transaction is one statement, or a few for a retry with locked reads; one
    # left open (a call cancelled at the wrong moment, a connection the pool lost track of)
    # must not hold its locks until the connection is closed.
    pool = await create_pool(
        settings,
        APPLICATION_NAME,
        wait_s=settings.database_startup_wait_s,
        reset_sessions=False,
        session_settings={"idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_TIMEOUT_MS)},
    )
    try:
        yield pool
    finally:
        await close_pool(pool)


async def close_pool(pool: asyncpg.Pool[Any]) -> None:
    """Close the pool gracefully, terminating connections that do not close in time."""
    try:
        await asyncio.wait_for(pool.close(), _POOL_CLOSE_TIMEOUT_S)
    except TimeoutError:
        logger.warning("Postgres pool did not close in %.0f s; terminating it", _POOL_CLOSE_TIMEOUT_S)
        pool.terminate()
