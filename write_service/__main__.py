"""`python -m write_service`: serve the command API until SIGTERM or SIGINT.

With WRITE_WORKERS above 1 this process becomes the parent of a worker group
(shared_kernel/platform/worker_group.py): it reserves the port and runs that many complete write
services on it, each with its own pool. What must hold across commands holds across the
workers too, because Postgres decides it: every write is guarded by the version it read
(decision 0027), uniqueness by the unique indexes, an idempotency key by its advisory lock
and the stored reply's primary key. A worker's aggregate turns and batches only spare it
the guards' losses within itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from shared_kernel.platform.grpc_server import GrpcServer, wait_for_shutdown_signal
from shared_kernel.platform.logs import configure_logging
from shared_kernel.platform.metrics import configure_metrics
from shared_kernel.platform.runtime import run
from shared_kernel.platform.security.authn import AuthConfigurationError, authenticator_from_settings
from shared_kernel.platform.telemetry import configure_tracing
from shared_kernel.platform.worker_group import GroupLink, GroupSpec, WorkerGroup
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as catalog_grpc
from tessera.orders.v1 import order_command_service_pb2_grpc as orders_grpc
from tessera.orders.v1 import saga_admin_service_pb2_grpc as saga_admin_grpc
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from write_service import bootstrap
from write_service.entrypoints.catalog import CATALOG_SERVICE_NAME
from write_service.entrypoints.orders import ORDER_SERVICE_NAME
from write_service.entrypoints.users import USER_SERVICE_NAME
from write_service.saga.admin_service import SERVICE_NAME as SAGA_ADMIN_SERVICE_NAME
from write_service.saga.admin_service import OrderSagaAdminServicer
from write_service.settings import WriteServiceSettings

logger = logging.getLogger("write_service")

_POOL_CHECK_TIMEOUT_S = 5.0


async def serve(
    settings: WriteServiceSettings,
    shutdown_signal: Callable[[], Awaitable[None]] = wait_for_shutdown_signal,
) -> None:
    """Open the pool, serve until `shutdown_signal` returns, then stop and close in reverse order.

    A worker of a group also stops when its parent is gone, and reports its readiness to it.
    """
    authenticator = authenticator_from_settings(settings)
    link = None
    if settings.write_worker_control_fd is not None:
        link = GroupLink(settings.write_worker_control_fd, settings.write_worker_index)
        await link.open()
        parent_gone = link.parent_gone
        if parent_gone is not None:
            shutdown_signal = functools.partial(wait_for_shutdown_signal, extra=[parent_gone])
    # One worker of a group deletes expired keys: the others would only contend for the same rows.
    cleans = settings.write_worker_index == 0
    try:
        async with (
            bootstrap.open_pool(settings) as pool,
            bootstrap.expired_key_cleanup(pool, settings) if cleans else contextlib.nullcontext(),
        ):
            service = bootstrap.build(pool, settings)
            server = GrpcServer(
                settings,
                [USER_SERVICE_NAME, CATALOG_SERVICE_NAME, ORDER_SERVICE_NAME, SAGA_ADMIN_SERVICE_NAME],
                authenticator=authenticator,
            )
            server.add(pb_grpc.add_UserCommandServiceServicer_to_server, service.servicer)
            server.add(catalog_grpc.add_CatalogCommandServiceServicer_to_server, service.catalog_servicer)
            server.add(orders_grpc.add_OrderCommandServiceServicer_to_server, service.order_servicer)
            server.add(saga_admin_grpc.add_OrderSagaAdminServiceServicer_to_server, OrderSagaAdminServicer(pool))
            port = await server.start()
            try:
                await _check_pool(pool)
                if link is not None:
                    await link.readiness_hook(server, True)
                else:
                    await server.set_serving(True)
                logger.info("write service serving", extra={"port": port})
                await shutdown_signal()
                logger.info("shutting down")
            finally:
                await server.stop()
    finally:
        if link is not None:
            await link.close()


async def _check_pool(pool: asyncpg.Pool[Any]) -> None:
    """Prove the pool can run a query before health reports SERVING."""
    await pool.fetchval("SELECT 1", timeout=_POOL_CHECK_TIMEOUT_S)


async def _serve_process(settings: WriteServiceSettings) -> int:
    """Serve as one process (alone, or as a worker of a group); 0 after a clean shutdown, 1 when start-up fails."""
    provider = configure_tracing("write_service")
    # Workers of a group share one environment: each serves metrics on METRICS_PORT + its index.
    process_metrics = configure_metrics("write_service", port_offset=settings.write_worker_index)
    try:
        await serve(settings)
    except AuthConfigurationError as exc:
        logger.error("write service refused to start: %s", exc)  # noqa: TRY400 - a setting, not a bug
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, RuntimeError):
        logger.exception("write service could not start or stopped abnormally")
        return 1
    finally:
        provider.shutdown()
        process_metrics.shutdown()
    return 0


def group_spec(settings: WriteServiceSettings) -> GroupSpec:
    """The worker group `python -m write_service` runs when WRITE_WORKERS is above 1."""
    return GroupSpec(
        label="write",
        module="write_service",
        env_prefix="WRITE",
        workers=settings.write_workers,
        host=settings.grpc_host,
        port=settings.grpc_port,
        shutdown_grace_s=settings.grpc_shutdown_grace_s,
        restart_max_backoff_s=settings.write_worker_restart_max_backoff_s,
        max_crashes=settings.write_worker_max_crashes,
        # ARGON2_MAX_CONCURRENT bounds the whole service's hashing (and its memory), so the workers share it.
        env={"ARGON2_MAX_CONCURRENT": str(max(1, settings.argon2_max_concurrent // settings.write_workers))},
    )


async def supervise(settings: WriteServiceSettings) -> int:
    """Run a worker group; refuse at once what every worker would refuse."""
    try:
        authenticator_from_settings(settings)
    except AuthConfigurationError as exc:
        logger.error("write service refused to start: %s", exc)  # noqa: TRY400 - a setting, not a bug
        return 1
    return await WorkerGroup(group_spec(settings)).run()


def main() -> int:
    """Entry point: settings and logging once, then serve (or supervise a worker group)."""
    settings = WriteServiceSettings()
    configure_logging(settings.log_level, settings.log_format, service="write_service")
    if settings.write_workers > 1:
        return run(supervise(settings))
    return run(_serve_process(settings))


if __name__ == "__main__":
    sys.exit(main())
