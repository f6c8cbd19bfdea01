"""`python -m write_service`: serve the command API until SIGTERM or SIGINT."""

from __future__ import annotations

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
    """Open the pool, serve until `shutdown_signal` returns, then stop and close in reverse order."""
    authenticator = authenticator_from_settings(settings)
    async with bootstrap.open_pool(settings) as pool, bootstrap.expired_key_cleanup(pool, settings):
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
            await server.set_serving(True)
            logger.info("write service serving", extra={"port": port})
            await shutdown_signal()
            logger.info("shutting down")
        finally:
            await server.stop()


async def _check_pool(pool: asyncpg.Pool[Any]) -> None:
    """Prove the pool can run a query before health reports SERVING."""
    await pool.fetchval("SELECT 1", timeout=_POOL_CHECK_TIMEOUT_S)


async def main() -> int:
    """Run the process; 0 after a clean shutdown, 1 when start-up fails."""
    settings = WriteServiceSettings()
    configure_logging(settings.log_level, settings.log_format, service="write_service")
    provider = configure_tracing("write_service")
    process_metrics = configure_metrics("write_service")
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


if __name__ == "__main__":
    sys.exit(run(main()))
