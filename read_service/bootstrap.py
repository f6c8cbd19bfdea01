"""The composition root: opens the read service's resources in order and closes them in reverse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from read_service.consistency import ORDER_AGGREGATE, USER_AGGREGATE, ConsistencyGate, log_versions
from read_service.entrypoints import catalog_queries, order_queries
from read_service.entrypoints.freshness import Freshness
from read_service.entrypoints.grpc_server import SERVICE_NAME, PageLimits, UserQueryServicer, register_user_queries
from read_service.event_source import EventSource
from read_service.eviction import EvictionGuard
from read_service.generations import replica_generations
from read_service.keys import CatalogKeys, OrderKeys, UserKeys
from read_service.lease import ApplyMode, LeaseOptions, default_holder_id
from read_service.near_cache import NearCache, view_caches
from read_service.page_tokens import PageTokenCodec
from read_service.projections.base import Projection
from read_service.projections.catalog import CatalogProjection
from read_service.projections.orders import OrdersProjection
from read_service.projections.users import UsersProjection
from read_service.projector import Projector, ProjectorLinks, ProjectorOptions
from read_service.settings import ReadServiceSettings
from read_service.views.catalog import ProductViews
from read_service.views.orders import OrderViews
from read_service.views.users import UserViews
from read_service.watch import ChangeFeed, WatchLimiter, attach_feed, customer_orders, resume_at
from shared_kernel.platform.db import create_pool
from shared_kernel.platform.grpc_server import GrpcServer
from shared_kernel.platform.redis_client import warm_up
from shared_kernel.platform.security.authn import Authenticator

logger = logging.getLogger(__name__)

APPLICATION_NAME = "tessera-read-service"
# Redis connections one process opens at most; more concurrent commands wait for one.
REDIS_MAX_CONNECTIONS = 200
# Opened at start (shared_kernel.platform.redis_client.warm_up): the projectors' pub/sub and apply
# connections and a first burst of queries then find a connection ready.
REDIS_WARM_CONNECTIONS = 16

# Decides what health reports when the projector's readiness changes (default: exactly that).
ReadinessHook = Callable[[GrpcServer, bool], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ReadService:
    """The running parts of one read service process."""

    settings: ReadServiceSettings
    server: GrpcServer
    projector: Projector
    redis: aioredis.Redis
    pool: asyncpg.Pool[Any]
    # Every projector of the replica (users first, so `projector` is the first of them); the
    # replica is ready when all of them are.
    projectors: tuple[Projector, ...] = ()
    # The near caches by projection name (read_service.near_cache) and the change feeds of watches.
    near_caches: tuple[NearCache, ...] = ()
    feeds: tuple[ChangeFeed, ...] = ()

    @property
    def port(self) -> int:
        """The port the gRPC server is bound to."""
        return self.server.port

    @property
    def projector_tasks(self) -> list[Any]:
        """The running task of every projector (a finished one is a projector that died)."""
        return [p.task for p in self.projectors or (self.projector,) if p.task is not None]


async def _eviction_guard(settings: ReadServiceSettings, client: aioredis.Redis) -> EvictionGuard:
    """The guard of the views' Redis, checked once: one that may evict views is refused (EvictingRedis)."""
    guard = EvictionGuard(client, settings.redis_socket_timeout_s, settings.redis_policy_check_s)
    await guard.check()
    return guard


def _watch_policy(guard: EvictionGuard, on_change: Callable[[bool], Awaitable[None]], stack: AsyncExitStack) -> None:
    """Check the policy again while serving; a change goes to `on_change`; stopped by `stack`."""
    guard.on_change = on_change
    task = asyncio.create_task(guard.run(), name="redis-eviction-guard")

    async def stop() -> None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our own cancellation, not the guard's

    stack.push_async_callback(stop)


def create_redis_client(url: str, timeout_s: float, max_connections: int = REDIS_MAX_CONNECTIONS) -> aioredis.Redis:
    """A Redis client that fails fast when Redis is down.

    The driver's default retries with backoff of up to seconds would hold every query that
    long; one quick retry still covers a pooled connection the server closed, and beyond it
    callers get UNAVAILABLE (and may try another replica) while the projector backs off.

    The driver's default pool refuses a command once 100 connections are in use (under load,
    the 101st concurrent query would fail); this pool makes it wait, within `timeout_s`, for
    one of `max_connections` connections instead.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
    )
    return aioredis.Redis.from_pool(pool)


def _page_token_codec(settings: ReadServiceSettings) -> PageTokenCodec:
    key, is_dev_default = settings.page_token_key()
    if is_dev_default:
        logger.warning(
            "PAGE_TOKEN_SECRET is not set: page tokens are signed with a PUBLIC development key "
            "and can be forged. Set PAGE_TOKEN_SECRET (the same value on every replica) outside development."
        )
    return PageTokenCodec(key)


async def _open_stores(
    settings: ReadServiceSettings, stack: AsyncExitStack
) -> tuple[asyncpg.Pool[Any], aioredis.Redis]:
    """The Postgres pool and the views' Redis client, closed by `stack`."""
    # Nothing here leaves session state on a pooled connection (the rebuild's cursor lives in
    # its transaction), so releases skip the reset round trip: catch-up and the watch feeds
    # read the log on the hot path.
    pool = await create_pool(settings, APPLICATION_NAME, reset_sessions=False)
    stack.push_async_callback(pool.close)
    redis_client = create_redis_client(str(settings.redis_url), settings.redis_socket_timeout_s)
    stack.push_async_callback(redis_client.aclose)
    await warm_up(redis_client, REDIS_WARM_CONNECTIONS, settings.redis_socket_timeout_s)
    return pool, redis_client


def open_events_client(settings: ReadServiceSettings, stack: AsyncExitStack) -> aioredis.Redis | None:
    """The relays' Redis when this replica keeps its views in a server of its own; None when they share one."""
    if settings.redis_events_url is None:
        return None
    client = create_redis_client(str(settings.redis_events_url), settings.redis_socket_timeout_s)
    stack.push_async_callback(client.aclose)
    return client


@asynccontextmanager
async def running_read_service(
    settings: ReadServiceSettings,
    authenticator: Authenticator | None = None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    readiness_hook: ReadinessHook | None = None,
) -> AsyncIterator[ReadService]:
    """Open Postgres and Redis, start the gRPC server and the projector; stop all on exit.

    `authenticator` checks every call (the process passes the one its settings ask for);
    without one, calls are not authenticated, which only in-process tests want.
    `interceptors` run innermost, around the servicers; `readiness_hook`, when given, sets
    health instead of the projector's readiness alone (a worker of a group reports the group's).

    On exit: the server reports NOT_SERVING and drains its calls, then the projector stops,
    then Redis and Postgres close (the reverse of opening).
    """
    tokens = _page_token_codec(settings)
    async with AsyncExitStack() as stack:
        pool, redis_client = await _open_stores(settings, stack)
        events_client = open_events_client(settings, stack)
        guard = await _eviction_guard(settings, redis_client)

        keys = UserKeys(settings.redis_key_prefix)
        catalog_keys = CatalogKeys(settings.redis_key_prefix)
        order_keys = OrderKeys(settings.redis_key_prefix)
        server = GrpcServer(
            settings,
            [SERVICE_NAME, catalog_queries.SERVICE_NAME, order_queries.SERVICE_NAME],
            interceptors=interceptors,
            authenticator=authenticator,
            # Queries start no span of their own unless one is recorded (nothing reads its ids).
            root_spans=False,
        )
        projection = UsersProjection(keys)
        # Each projection has its own applying lease; `always` lets every replica apply.
        lease = (
            LeaseOptions(
                holder_id=default_holder_id(settings.read_replica_id),
                ttl_ms=settings.read_lease_ttl_ms,
                renew_interval_ms=settings.read_lease_renew_ms,
            )
            if settings.read_apply_mode is ApplyMode.LEASE
            else None
        )
        # One projector per projection, each with its own checkpoint; one subscription feeds them all.
        projectors: list[Projector] = []
        source = EventSource(events_client or redis_client, settings.redis_key_prefix)
        # Closed after every projector has stopped (the stack runs its callbacks last in, first out).
        stack.push_async_callback(source.close)

        async def on_readiness_change(_ready: bool) -> None:
            # The replica serves once every projection has caught up, and stops when one falls behind
            # or when Redis starts allowing the eviction of views.
            ready = bool(projectors) and all(p.ready for p in projectors) and guard.safe
            if readiness_hook is None:
                await server.set_serving(ready)
            else:
                await readiness_hook(server, ready)

        def start_projector(other: Projection, factory: Callable[[str], Projection], query_keys: object) -> Projector:
            started = Projector(
                redis_client,
                pool,
                other,
                ProjectorOptions(
                    settings.redis_key_prefix, batch_size=settings.catchup_batch_size, parking=settings.parking_mode
                ),
                ProjectorLinks(
                    source=source,
                    events_client=events_client,
                    generations=replica_generations(
                        redis_client, settings.redis_key_prefix, other, factory, query_keys
                    ),
                    lease=lease,
                    on_readiness_change=on_readiness_change,
                ),
            )
            stack.push_async_callback(started.stop)
            projectors.append(started)
            return started

        # The views live in a generation (read_service.generations); the query keys follow it.
        projector = start_projector(projection, lambda p: UsersProjection(UserKeys(p)), keys)
        catalog_projection = CatalogProjection(catalog_keys)
        catalog_projector = start_projector(
            catalog_projection, lambda p: CatalogProjection(CatalogKeys(p)), catalog_keys
        )
        orders_projection = OrdersProjection(order_keys)
        orders_projector = start_projector(orders_projection, lambda p: OrdersProjection(OrderKeys(p)), order_keys)
        limits = PageLimits(settings.list_page_size_default, settings.list_page_size_max)

        # Watch streams and the near caches follow each projector's effects (read_service.watch).
        limiter = WatchLimiter(settings.watch_max_streams)
        caches = view_caches(("users", "catalog", "orders"), settings.near_cache_size)
        feeds: dict[str, ChangeFeed] = {
            owned.name: attach_feed(owner, owned, redis_client, pool, cache=caches[owned.name], settings=settings)
            for owner, owned in (
                (projector, projection),
                (catalog_projector, catalog_projection),
                (orders_projector, orders_projection),
            )
        }

        def freshness(owner: Projector, owned: Projection, version: Callable[[str], Awaitable[int]]) -> Freshness:
            # Queries of a view read the state its projector publishes, never the projector itself.
            state = owner.published
            return Freshness(
                lambda: state.ready,
                settings.query_timeout_s,
                gate=ConsistencyGate(state, version, log_versions(pool)),
                checkpoint=caches[owned.name].observe(state.read_checkpoint),
                max_wait_ms=settings.consistency_max_wait_ms,
            )

        product_views = ProductViews(redis_client, catalog_keys, cache=caches["catalog"])
        server.add(
            catalog_queries.register_product_queries,
            catalog_queries.ProductQueryServicer(
                product_views,
                tokens,
                freshness(catalog_projector, catalog_projection, product_views.version),
                limits,
            ),
        )
        order_views = OrderViews(redis_client, order_keys, scan_limit=settings.list_scan_limit, cache=caches["orders"])
        server.add(
            order_queries.register_order_queries,
            order_queries.OrderQueryServicer(
                order_views,
                tokens,
                freshness(orders_projector, orders_projection, order_views.version),
                limits,
                watch_order=lambda order_id, after: (
                    feeds["orders"]
                    .watches(limiter)
                    .one(order_keys.view(order_id), resume_at(after, ORDER_AGGREGATE, order_id))
                ),
                watch_customer=lambda customer, after: customer_orders(
                    feeds["orders"].watches(limiter), order_keys, customer, after
                ),
            ),
        )

        views = UserViews(redis_client, keys, scan_limit=settings.list_scan_limit, cache=caches["users"])

        servicer = UserQueryServicer(
            views,
            tokens,
            is_ready=lambda: projector.published.ready,
            limits=limits,
            query_timeout_s=settings.query_timeout_s,
            gate=ConsistencyGate(projector.published, views.version, log_versions(pool)),
            checkpoint=caches["users"].observe(projector.published.read_checkpoint),
            max_wait_ms=settings.consistency_max_wait_ms,
            watch=lambda user_id, after: (
                feeds["users"].watches(limiter).one(keys.view(user_id), resume_at(after, USER_AGGREGATE, user_id))
            ),
        )
        server.add(register_user_queries, servicer)
        # Health stays NOT_SERVING from start() until the projector's first catch-up.
        await server.start()
        stack.push_async_callback(server.stop)
        for change_feed in feeds.values():
            # Runs before server.stop (last in, first out): watches end cleanly, then calls drain.
            stack.push_async_callback(change_feed.close)
        # The replica's subscription first: a projector that follows the lease holder never asks for it.
        source.start()
        for started in projectors:
            started.start()
        _watch_policy(guard, on_readiness_change, stack)
        yield ReadService(
            settings,
            server,
            projector,
            redis_client,
            pool,
            tuple(projectors),
            near_caches=tuple(caches.values()),
            feeds=tuple(feeds.values()),
        )
