"""`python -m payment_provider`: serve the stand-in payment provider until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from payment_provider.faults import FailureConfig, FaultInjector
from payment_provider.ledger import Ledger
from payment_provider.service import (
    ADMIN_SERVICE,
    PROVIDER_SERVICE,
    PaymentProviderAdminServicer,
    PaymentProviderServicer,
    Provider,
)
from payment_provider.settings import PaymentProviderSettings
from shared_kernel.platform.grpc_server import GrpcServer, wait_for_shutdown_signal
from shared_kernel.platform.logs import configure_logging
from shared_kernel.platform.runtime import run
from shared_kernel.platform.telemetry import configure_tracing
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc
from tessera.payments.v1 import payment_provider_pb2_grpc as pb_grpc

logger = logging.getLogger("payment_provider")


def failure_config(settings: PaymentProviderSettings) -> FailureConfig:
    """The failures the process starts with, from its settings."""
    return FailureConfig(
        latency_ms=settings.payment_latency_ms,
        decline_rate=settings.payment_decline_rate,
        timeout_rate=settings.payment_timeout_rate,
        unavailable_rate=settings.payment_unavailable_rate,
        decline_above_minor=settings.payment_decline_above_minor,
        timeout_effect=settings.payment_timeout_effect,
        timeout_hang_ms=settings.payment_timeout_hang_ms,
        decline_customer_ids=tuple(settings.payment_decline_customer_ids),
        seed=settings.payment_seed,
    )


async def serve(
    settings: PaymentProviderSettings,
    shutdown_signal: Callable[[], Awaitable[None]] = wait_for_shutdown_signal,
) -> None:
    """Open the ledger, serve until `shutdown_signal` returns, then stop and close in reverse order."""
    if settings.payment_state_file != ":memory:":
        Path(settings.payment_state_file).parent.mkdir(parents=True, exist_ok=True)
    # One worker thread owns the SQLite connection: calls never block the loop and never interleave.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger") as executor:
        ledger = executor.submit(Ledger, settings.payment_state_file).result()
        try:
            provider = Provider(ledger, FaultInjector(failure_config(settings)), executor)
            server = GrpcServer(settings, [PROVIDER_SERVICE, ADMIN_SERVICE])
            server.add(pb_grpc.add_PaymentProviderServiceServicer_to_server, PaymentProviderServicer(provider))
            server.add(
                admin_grpc.add_PaymentProviderAdminServiceServicer_to_server, PaymentProviderAdminServicer(provider)
            )
            port = await server.start()
            try:
                await server.set_serving(True)
                logger.info(
                    "payment provider serving",
                    extra={"port": port, "state_file": settings.payment_state_file, "seed": settings.payment_seed},
                )
                await shutdown_signal()
                logger.info("shutting down")
            finally:
                await server.stop()
        finally:
            executor.submit(ledger.close).result()


async def main() -> int:
    """Run the process; 0 after a clean shutdown, 1 when start-up fails."""
    settings = PaymentProviderSettings()
    configure_logging(settings.log_level, settings.log_format, service="payment_provider")
    tracing = configure_tracing("payment_provider")
    try:
        await serve(settings)
    except (OSError, sqlite3.Error, RuntimeError):
        logger.exception("payment provider could not start or stopped abnormally")
        return 1
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main()))
