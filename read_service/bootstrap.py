"""The composition root: opens the read service's resources in order and closes them in reverse."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from read_service.consistency import ConsistencyGate, log_versions
from read_service.entrypoints.grpc_server import SERVICE_NAME, PageLimits, UserQueryServicer
from read_service.keys import UserKeys
from read_service.page_tokens import PageTokenCodec
from read_service.projections.users import UsersProjection
from read_service.projector import Projector
from read_service.settings import ReadServiceSettings
from read_service.view_store import ViewStore
from read_service.views.users import UserViews
from shared_kernel.db import create_pool
from shared_kernel.grpc_server import GrpcServer
from shared_kernel.redis_client import ClosedTransportAwareConnection
from shared_kernel.security.authn import Authenticator
from tessera.users.v1.user_query_service_pb2_grpc import add_UserQueryServiceServicer_to_server

logger = logging.getLogger(__name__)

APPLICATION_NAME = "tessera-read-service"


@dataclass(frozen=True, slots=True)
class ReadService:
    """The running parts of one read service process."""

    settings: ReadServiceSettings
    server: GrpcServer
    projector: Projector
    redis: aioredis.Redis
    pool: asyncpg.Pool[Any]

    @property
    def port(self) -> int:
        """The port the gRPC server is bound to."""
        return self.server.port


def create_redis_client(url: str, timeout_s: float) -> aioredis.Redis:
    """A Redis client that fails fast when Redis is down.

    The driver's default retries with backoff of up to seconds would hold every query that
    long; one quick retry still covers a pooled connection the server closed, and beyond it
    callers get UNAVAILABLE (and may try another replica) while the projector backs off.
    """
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        connection_class=ClosedTransportAwareConnection,
    )


def _page_token_codec(settings: ReadServiceSettings) -> PageTokenCodec:
    key, is_dev_default = settings.page_token_key()
    if is_dev_default:
        logger.warning(
            "PAGE_TOKEN_SECRET is not set: page tokens are signed with a PUBLIC development key "
            "and can be forged. Set PAGE_TOKEN_SECRET (the same value on every replica) outside development."
        )
    return PageTokenCodec(key)


@asynccontextmanager
async def running_read_service(
    settings: ReadServiceSettings, authenticator: Authenticator | None = None
) -> AsyncIterator[ReadService]:
    """Open Postgres and Redis, start the gRPC server and the projector; stop all on exit.

    `authenticator` checks every call (the process passes the one its settings ask for);
    without one, calls are not authenticated, which only in-process tests want.

    On exit: the server reports NOT_SERVING and drains its calls, then the projector stops,
    then Redis and Postgres close (the reverse of opening).
    """
    tokens = _page_token_codec(settings)
    async with AsyncExitStack() as stack:
        pool = await create_pool(settings, APPLICATION_NAME)
        stack.push_async_callback(pool.close)
        redis_client = create_redis_client(str(settings.redis_url), settings.redis_socket_timeout_s)
        stack.push_async_callback(redis_client.aclose)

        keys = UserKeys(settings.redis_key_prefix)
        server = GrpcServer(settings, [SERVICE_NAME], authenticator=authenticator)
        projection = UsersProjection(keys)

        async def on_readiness_change(ready: bool) -> None:
            await server.set_serving(ready)

        projector = Projector(
            redis_client,
            pool,
            projection,
            channel_prefix=settings.redis_key_prefix,
            batch_size=settings.catchup_batch_size,
            on_readiness_change=on_readiness_change,
        )
        stack.push_async_callback(projector.stop)

        views = UserViews(redis_client, keys, scan_limit=settings.list_scan_limit)

        async def user_version(user_id: str) -> int:
            view = await views.get(user_id)
            return 0 if view is None else view.version

        servicer = UserQueryServicer(
            views,
            tokens,
            is_ready=lambda: projector.ready,
            limits=PageLimits(settings.list_page_size_default, settings.list_page_size_max),
            query_timeout_s=settings.query_timeout_s,
            gate=ConsistencyGate(projector, user_version, log_versions(pool)),
            checkpoint=ViewStore(redis_client, projection.checkpoint_key).checkpoint,
            max_wait_ms=settings.consistency_max_wait_ms,
        )
        server.add(add_UserQueryServiceServicer_to_server, servicer)
        # Health stays NOT_SERVING from start() until the projector's first catch-up.
        await server.start()
        stack.push_async_callback(server.stop)
        projector.start()
        yield ReadService(settings, server, projector, redis_client, pool)
