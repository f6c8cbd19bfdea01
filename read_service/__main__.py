"""`python -m read_service`: serve UserQueryService and keep the views current until SIGTERM."""

from __future__ import annotations

import logging
import sys

from read_service.bootstrap import running_read_service
from read_service.settings import ReadServiceSettings
from shared_kernel.grpc_server import wait_for_shutdown_signal
from shared_kernel.logs import configure_logging
from shared_kernel.runtime import run
from shared_kernel.security.authn import AuthConfigurationError, authenticator_from_settings
from shared_kernel.telemetry import configure_tracing

logger = logging.getLogger("read_service")


async def serve(settings: ReadServiceSettings) -> int:
    """Run the service until a shutdown signal, or until the projector fails."""
    try:
        authenticator = authenticator_from_settings(settings)
    except AuthConfigurationError as exc:
        logger.error("read service refused to start: %s", exc)  # noqa: TRY400 - a setting, not a bug
        return 1
    async with running_read_service(settings, authenticator=authenticator) as service:
        task = service.projector.task
        # A projector that dies of a bug ends the process, so the orchestrator restarts it.
        await wait_for_shutdown_signal(extra=[task] if task is not None else [])
        logger.info("shutting down")
    return 0


def main() -> int:
    """Entry point: settings, logging and tracing once, then serve."""
    settings = ReadServiceSettings()
    configure_logging(settings.log_level, settings.log_format, service="read_service")
    provider = configure_tracing("tessera-read-service")
    try:
        return run(serve(settings))
    finally:
        provider.shutdown()


if __name__ == "__main__":
    sys.exit(main())
