"""`python -m write_service.saga`: drive order sagas until SIGTERM or SIGINT.

Serves grpc.health.v1 on GRPC_PORT (or SAGA_WORKER_PORT; 0 picks a free port, logged at
start-up) so supervisors can probe it. SIGTERM lets the steps in progress finish within
GRPC_SHUTDOWN_GRACE_S; a step cut short is safe too, because its transaction never
committed and its lease runs out (and is handed back when the database still answers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc

from shared_kernel.platform.db import create_pool
from shared_kernel.platform.grpc_server import GrpcServer, wait_for_shutdown_signal
from shared_kernel.platform.logs import configure_logging
from shared_kernel.platform.metrics import configure_metrics, current
from shared_kernel.platform.runtime import run
from shared_kernel.platform.telemetry import configure_tracing
from write_service.bootstrap import close_pool
from write_service.saga.breaker import CircuitBreaker
from write_service.saga.metrics import register_saga_metrics, saga_status_sampler
from write_service.saga.orchestrator import SagaRunner
from write_service.saga.provider import GrpcPaymentProvider, GuardedProvider
from write_service.saga.settings import SagaWorkerSettings
from write_service.saga.worker import SagaWorker

logger = logging.getLogger("write_service.saga")

APPLICATION_NAME = "tessera-saga-worker"


def default_worker_id() -> str:
    """host:pid:random, unique even when a restarted worker gets the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


async def serve(
    settings: SagaWorkerSettings,
    shutdown_signal: Callable[[], Awaitable[None]] = wait_for_shutdown_signal,
) -> None:
    """Open the pool and the provider channel, drive sagas until `shutdown_signal` returns, then close."""
    # No server-side reset on release, as in the write service: a step's session state is
    # transaction-local (SET LOCAL), and the reset cost a round trip per step.
    pool = await create_pool(settings, APPLICATION_NAME, wait_s=settings.database_startup_wait_s, reset_sessions=False)
    channel = grpc.aio.insecure_channel(settings.payment_provider_address)
    secondary_address = settings.payment_provider_secondary_address
    secondary_channel = grpc.aio.insecure_channel(secondary_address) if secondary_address else None
    server = GrpcServer(settings, [])
    stop = asyncio.Event()
    try:
        breaker = CircuitBreaker(settings.saga_breaker_failure_threshold, settings.saga_breaker_cooldown_s)
        provider = GuardedProvider(GrpcPaymentProvider(channel, settings.payment_provider_timeout_s), breaker)
        secondary = None
        if secondary_channel is not None:
            # Its own breaker: a secondary that is down too fails fast, and the saga waits as before.
            secondary = GuardedProvider(
                GrpcPaymentProvider(secondary_channel, settings.payment_provider_timeout_s),
                CircuitBreaker(settings.saga_breaker_failure_threshold, settings.saga_breaker_cooldown_s),
            )
        runner = SagaRunner(
            pool,
            provider,
            worker_id=settings.saga_worker_id or default_worker_id(),
            lease_s=settings.saga_lease_s,
            max_attempts=settings.saga_max_attempts,
            backoff_base_ms=settings.saga_backoff_base_ms,
            backoff_cap_ms=settings.saga_backoff_cap_ms,
            secondary=secondary,
        )

        async def connect_listener() -> asyncpg.Connection[Any]:
            conn: asyncpg.Connection[Any] = await asyncpg.connect(
                str(settings.database_url),
                timeout=settings.database_connect_timeout_s,
                server_settings={"application_name": f"{APPLICATION_NAME}-listen"},
            )
            return conn

        worker = SagaWorker(
            pool,
            runner,
            connect_listener,
            concurrency=settings.saga_concurrency,
            lease_s=settings.saga_lease_s,
            poll_interval_s=settings.saga_poll_interval_s,
        )
        port = await server.start()
        sampler = saga_status_sampler(pool, current().settings.metrics_sample_interval_s)
        if current().enabled:
            register_saga_metrics(sampler)
            sampler.start()
        work = asyncio.create_task(worker.run(stop, grace_s=settings.grpc_shutdown_grace_s), name="saga-worker")
        try:
            await server.set_serving(True)
            logger.info("saga worker serving", extra={"port": port, "worker_id": runner.worker_id})
            signalled = asyncio.ensure_future(shutdown_signal())
            await asyncio.wait([signalled, work], return_when=asyncio.FIRST_COMPLETED)
            if not signalled.done():
                # The loop ended without being asked to: a bug. Exit non-zero so a supervisor restarts us.
                signalled.cancel()
                error = work.exception()
                raise RuntimeError(f"the saga worker loop ended unexpectedly: {error!r}") from error
            logger.info("shutting down")
        finally:
            stop.set()
            await asyncio.wait([work])
            await sampler.stop()
            await server.stop()
    finally:
        await channel.close()
        if secondary_channel is not None:
            await secondary_channel.close()
        await close_pool(pool)


async def main() -> int:
    """Run the process; 0 after a clean shutdown, 1 when start-up fails."""
    settings = SagaWorkerSettings()
    configure_logging(settings.log_level, settings.log_format, service="saga_worker")
    tracing = configure_tracing("saga_worker")
    process_metrics = configure_metrics("saga_worker")
    try:
        await serve(settings)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, RuntimeError):
        logger.exception("saga worker could not start or stopped abnormally")
        return 1
    finally:
        tracing.shutdown()
        process_metrics.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main()))
