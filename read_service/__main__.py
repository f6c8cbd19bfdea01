"""`python -m read_service`: serve UserQueryService and keep the views current until SIGTERM.

With READ_WORKERS above 1 this process becomes the parent of a worker group (see
read_service/workers.py): it reserves the port and runs that many complete read services on it.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from read_service.bootstrap import running_read_service
from read_service.eviction import EvictingRedis
from read_service.projector_metrics import register_projector_metrics
from read_service.settings import ReadServiceSettings
from read_service.workers import GroupLink, ReplicaHeaderInterceptor, WorkerGroup
from shared_kernel.platform.grpc_server import wait_for_shutdown_signal
from shared_kernel.platform.logs import configure_logging
from shared_kernel.platform.metrics import configure_metrics
from shared_kernel.platform.runtime import run
from shared_kernel.platform.security.authn import AuthConfigurationError, authenticator_from_settings
from shared_kernel.platform.telemetry import configure_tracing

logger = logging.getLogger("read_service")


async def serve(settings: ReadServiceSettings) -> int:
    """Run the service until a shutdown signal, until the projector fails, or (in a group) until the parent is gone."""
    try:
        authenticator = authenticator_from_settings(settings)
    except AuthConfigurationError as exc:
        logger.error("read service refused to start: %s", exc)  # noqa: TRY400 - a setting, not a bug
        return 1
    link = None
    if settings.read_worker_control_fd is not None:
        link = GroupLink(settings.read_worker_control_fd, settings.read_worker_index)
        await link.open()
    try:
        async with running_read_service(
            settings,
            authenticator=authenticator,
            interceptors=[ReplicaHeaderInterceptor(settings.read_replica_id)],
            readiness_hook=link.readiness_hook if link is not None else None,
        ) as service:
            register_projector_metrics(service.projectors)
            # A projector that dies of a bug ends the process, so the orchestrator (or the group) restarts it.
            extra: list[asyncio.Future[None]] = list(service.projector_tasks)
            if link is not None and link.parent_gone is not None:
                extra.append(link.parent_gone)
            await wait_for_shutdown_signal(extra=extra)
            logger.info("shutting down")
    except EvictingRedis as exc:
        logger.error("read service refused to start: %s", exc)  # noqa: TRY400 - a setting, not a bug
        return 1
    finally:
        if link is not None:
            await link.close()
    return 0


async def supervise(settings: ReadServiceSettings) -> int:
    """Run a worker group; refuse at once what every worker would refuse."""
    try:
        authenticator_from_settings(settings)
    except AuthConfigurationError as exc:
        logger.error("read service refused to start: %s", exc)  # noqa: TRY400 - a setting, not a bug
        return 1
    return await WorkerGroup(settings).run()


def main() -> int:
    """Entry point: settings, logging and tracing once, then serve (or supervise a worker group)."""
    settings = ReadServiceSettings()
    configure_logging(settings.log_level, settings.log_format, service="read_service")
    if settings.read_workers > 1:
        return run(supervise(settings))
    provider = configure_tracing("tessera-read-service")
    # Workers of a group share one environment: each serves metrics on METRICS_PORT + its index.
    process_metrics = configure_metrics("tessera-read-service", port_offset=settings.read_worker_index)
    try:
        return run(serve(settings))
    finally:
        provider.shutdown()
        process_metrics.shutdown()


if __name__ == "__main__":
    sys.exit(main())
