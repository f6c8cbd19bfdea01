"""Composition root of `python -m relay`: settings, logging, tracing, pool, Redis, signals, run."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis

from relay.metrics import backlog_sampler, register_relay_metrics
from relay.outbox import CLAIM_SESSION_SETTINGS
from relay.runner import Relay
from relay.settings import RelaySettings
from shared_kernel.platform.db import create_pool
from shared_kernel.platform.logs import configure_logging
from shared_kernel.platform.metrics import Sampler, configure_metrics
from shared_kernel.platform.runtime import run
from shared_kernel.platform.telemetry import configure_tracing

logger = logging.getLogger("relay")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_T = TypeVar("_T")


async def main() -> int:
    """Run one relay process until SIGTERM or SIGINT; return the exit status."""
    settings = RelaySettings()
    configure_logging(settings.log_level, settings.log_format, service="relay")
    provider = configure_tracing("tessera-relay")
    process_metrics = configure_metrics("tessera-relay")
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    relay: Relay | None = None
    backlog: Sampler | None = None
    shutdowns: set[asyncio.Task[None]] = set()

    def on_signal(signum: signal.Signals) -> None:
        logger.info("received %s, shutting down", signum.name)
        stop_requested.set()
        if relay is not None:
            task = loop.create_task(relay.shutdown())
            shutdowns.add(task)
            task.add_done_callback(shutdowns.discard)

    for signum in _SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        # Postgres may come up after the relay; create_pool logs a WARNING on every retry.
        # The relay's pooled statements leave no session state (its lock and LISTEN live on a
        # connection of their own), so releases skip the reset round trip.
        pool = await _until_stopped(
            create_pool(
                settings,
                "tessera-relay",
                wait_s=math.inf,
                reset_sessions=False,
                session_settings=CLAIM_SESSION_SETTINGS,
            ),
            stop_requested,
        )
        if pool is None:
            return 0
        redis = aioredis.Redis.from_url(
            str(settings.redis_url),
            socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_socket_timeout_s,
        )
        try:
            relay = Relay(settings, pool, redis)
            if stop_requested.is_set():
                return 0
            if process_metrics.enabled:
                backlog = backlog_sampler(pool, process_metrics.settings.metrics_sample_interval_s)
                register_relay_metrics(backlog, lambda: relay.published_head if relay is not None else 0)
                backlog.start()
            logger.info(
                "relay starting",
                extra={"lock_key": settings.relay_lock_key, "batch_size": settings.relay_batch_size},
            )
            await relay.run()
        finally:
            if backlog is not None:
                await backlog.stop()
            await redis.aclose()
            try:
                async with asyncio.timeout(settings.database_connect_timeout_s):
                    await pool.close()
            except TimeoutError:
                pool.terminate()
    except Exception:
        logger.exception("relay crashed")
        return 1
    finally:
        for signum in _SIGNALS:
            loop.remove_signal_handler(signum)
        provider.shutdown()
        process_metrics.shutdown()
    logger.info("relay stopped")
    return 0


async def _until_stopped(work: Coroutine[Any, Any, _T], stop: asyncio.Event) -> _T | None:
    """Await `work` unless `stop` is set first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            # asyncio.wait never raises the task's CancelledError, so ours (if any) still propagates.
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


if __name__ == "__main__":
    sys.exit(run(main()))
