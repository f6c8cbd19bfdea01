"""Change feeds, watches and the near cache against a real Postgres event log and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis

from read_service.bootstrap import running_read_service
from read_service.keys import UserKeys
from read_service.near_cache import NearCache
from read_service.projections.users import UsersProjection
from read_service.projector import Projector
from read_service.views.users import UserViews
from read_service.watch import Change, ChangeFeed, Watches, WatchLimiter, resume_at
from shared_kernel.contracts import errors
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1.user_query_service_pb2 import UserView
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

from .conftest import EventLog, Publisher, StartProjector, UserFactory, eventually
from .test_near_cache_hits import query
from .test_service import settings_for

pytestmark = pytest.mark.integration


class Follower:
    """A replica that applies nothing: it follows another projector's checkpoint (as a lease follower does)."""

    def __init__(self, leader: Projector) -> None:
        self._leader = leader

    @property
    def ready(self) -> bool:
        return self._leader.ready

    @property
    def checkpoint(self) -> int:
        return self._leader.checkpoint

    @property
    def generation(self) -> str | None:
        return self._leader.generation

    def changed(self) -> asyncio.Event:
        return self._leader.changed()


@contextlib.asynccontextmanager
async def running(feed: ChangeFeed) -> AsyncIterator[ChangeFeed]:
    feed.start()
    try:
        yield feed
    finally:
        await feed.close()


async def collect(stream: AsyncGenerator[Change, None], until_version: int, into: list[tuple[int, int]]) -> None:
    """Append (version, position) of each message until `until_version` is seen."""
    try:
        async for change in stream:
            version = 0 if change.value is None else UserView.FromString(change.value).version
            into.append((version, change.position))
            if version >= until_version:
                return
    finally:
        await stream.aclose()  # as grpc does when a call ends: gives the watch slot back


def feed_for(
    projector: Any, prefix: str, client: aioredis.Redis, pool: asyncpg.Pool[Any], **options: Any
) -> ChangeFeed:
    return ChangeFeed(projector, UsersProjection(UserKeys(prefix)), client, pool, recheck_s=0.05, **options)


async def test_watches_see_every_version_once_in_order_whether_computed_here_or_replayed(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector()
    own = feed_for(projector, redis_prefix, redis_client, db_pool)
    projector.effect_listeners = (own.on_effect,)
    # A second replica's feed gets no effects at all: it replays every event from the log.
    replayed = feed_for(Follower(projector), redis_prefix, redis_client, db_pool)
    await eventually(lambda: projector.ready)
    ids = []
    events = []
    for n in range(3):
        user_id, registered = users.register(f"w{n}@example.com", f"w{n}", "Name 1")
        ids.append(user_id)
        events.append(registered)
    for envelope in await event_log.append(*events):
        await publisher.event(envelope)
    await eventually(lambda: projector.checkpoint == 3)

    # 90 updates in random order of users, some published live, some only in the log
    # (gaps the projector fills with a catch-up batch).
    rng = random.Random(7)
    plan = [rng.choice(ids) for _ in range(90)]
    final = {user_id: 1 + plan.count(user_id) for user_id in ids}
    limiter = WatchLimiter(10)
    async with running(own), running(replayed):
        await eventually(lambda: own.released == 3 and replayed.released == 3)
        seen: dict[tuple[str, int], list[tuple[int, int]]] = {}
        tasks = []
        for feed_number, feed in enumerate((own, replayed)):
            for user_id in ids:
                into = seen.setdefault((user_id, feed_number), [])
                stream = Watches(feed, limiter).one(UserKeys(redis_prefix).view(user_id))
                tasks.append(asyncio.create_task(collect(stream, final[user_id], into)))
        await eventually(lambda: limiter.active == 6)
        for index, user_id in enumerate(plan):
            envelopes = await event_log.append(users.update(user_id, f"Name {index}"))
            if rng.random() < 0.7:
                await publisher.event(envelopes[0])
        await publisher.head(await event_log.head())
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

    assert replayed.replayed > 0
    for user_id in ids:
        expected = users.versions[user_id]
        for feed_number in (0, 1):
            got = seen[(user_id, feed_number)]
            assert [v for v, _ in got] == list(range(1, expected + 1)), (feed_number, got)
            positions = [p for _, p in got]
            assert positions == sorted(set(positions))
        # Both replicas announce each version at the same position.
        assert seen[(user_id, 0)] == seen[(user_id, 1)]
    assert limiter.active == 0


async def test_a_watch_of_a_user_not_registered_yet_starts_absent(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector()
    feed = feed_for(projector, redis_prefix, redis_client, db_pool)
    projector.effect_listeners = (feed.on_effect,)
    # And on a replica that applies nothing: the registration and the update are replayed.
    follower = feed_for(Follower(projector), redis_prefix, redis_client, db_pool)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("later@example.com", "later")
    async with running(feed), running(follower):
        await eventually(lambda: feed.released is not None and follower.released is not None)
        streams = [Watches(f, WatchLimiter(1)).one(UserKeys(redis_prefix).view(user_id)) for f in (feed, follower)]
        for stream in streams:
            first = await anext(stream)
            assert first.value is None
        (envelope,) = await event_log.append(registered)
        await publisher.event(envelope)
        (update,) = await event_log.append(users.update(user_id, "Later Name"))
        await publisher.event(update)
        for stream in streams:
            second = await asyncio.wait_for(anext(stream), 10)
            assert second.value is not None
            assert UserView.FromString(second.value).version == 1
            assert second.position == envelope.position
            third = await asyncio.wait_for(anext(stream), 10)
            assert third.value is not None
            assert UserView.FromString(third.value).full_name == "Later Name"
            assert third.position == update.position
            await stream.aclose()
        assert follower.replayed == 2


async def test_a_watcher_that_does_not_read_is_ended_with_resource_exhausted(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector()
    feed = feed_for(projector, redis_prefix, redis_client, db_pool, queue_max=5)
    projector.effect_listeners = (feed.on_effect,)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("slow@example.com", "slow")
    for envelope in await event_log.append(registered):
        await publisher.event(envelope)
    await eventually(lambda: projector.checkpoint == 1)
    limiter = WatchLimiter(1)
    async with running(feed):
        await eventually(lambda: feed.released == 1)
        stream = Watches(feed, limiter).one(UserKeys(redis_prefix).view(user_id))
        await anext(stream)
        # The process-wide limit holds while it is open.
        with pytest.raises(errors.ResourceExhausted):
            await anext(Watches(feed, limiter).one(UserKeys(redis_prefix).view(user_id)))
        for n in range(10):
            for envelope in await event_log.append(users.update(user_id, f"Name {n}")):
                await publisher.event(envelope)
        await eventually(lambda: feed.released == 11)
        with pytest.raises(errors.ResourceExhausted):
            async for _ in stream:
                pass
    assert limiter.active == 0


async def test_watches_end_unavailable_when_the_views_are_lost(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector(ping_interval_s=0.2)
    feed = feed_for(projector, redis_prefix, redis_client, db_pool)
    projector.effect_listeners = (feed.on_effect,)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("lost@example.com", "lost")
    for envelope in await event_log.append(registered):
        await publisher.event(envelope)
    await eventually(lambda: projector.checkpoint == 1)
    async with running(feed):
        await eventually(lambda: feed.released == 1)
        stream = Watches(feed, WatchLimiter(1)).one(UserKeys(redis_prefix).view(user_id))
        await anext(stream)
        # The views and checkpoint vanish (a flush); the next event makes the projector notice.
        keys = [k async for k in redis_client.scan_iter(match=f"{redis_prefix}users:*")]
        await redis_client.delete(*keys)
        for envelope in await event_log.append(users.update(user_id, "After")):
            await publisher.event(envelope)
        with pytest.raises(errors.Unavailable):
            await asyncio.wait_for(anext(stream), 15)


async def test_near_cache_reads_are_never_older_than_the_checkpoint_they_report(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector()
    cache = NearCache("users", 100)
    feed = feed_for(projector, redis_prefix, redis_client, db_pool, caches=[cache])
    projector.effect_listeners = (feed.on_effect,)
    keys = UserKeys(redis_prefix)
    views = UserViews(redis_client, keys, cache=cache)
    await eventually(lambda: projector.ready)
    ids = []
    for n in range(4):
        user_id, registered = users.register(f"c{n}@example.com", f"c{n}")
        ids.append(user_id)
        for envelope in await event_log.append(registered):
            await publisher.event(envelope)
    # version of each user at each position, to judge every answer
    history: dict[int, dict[str, int]] = {p: {u: 1 for u in ids[:p]} for p in range(1, 5)}

    async def checkpoint() -> int:
        return int(await redis_client.get(keys.checkpoint) or 0)

    stale: list[str] = []
    stop = asyncio.Event()

    async def reader(user_id: str) -> None:
        async def one() -> None:
            position = await cache.observe(checkpoint)()
            view = await views.get(user_id)
            wanted = history.get(position, {}).get(user_id, 0)
            got = 0 if view is None else view.version
            if got < wanted:
                stale.append(f"{user_id} at {position}: version {got} < {wanted}")

        while not stop.is_set():
            await asyncio.create_task(one())

    async with running(feed):
        await eventually(lambda: projector.checkpoint == 4)
        readers = [asyncio.create_task(reader(u)) for u in ids for _ in range(2)]
        rng = random.Random(3)
        versions = {u: 1 for u in ids}
        position = 4
        for index in range(120):
            user_id = rng.choice(ids)
            versions[user_id] += 1
            position += 1
            history[position] = dict(versions)
            for envelope in await event_log.append(users.update(user_id, f"N{index}")):
                await publisher.event(envelope)
            if index % 10 == 0:
                await eventually(lambda p=position: projector.checkpoint >= p)  # type: ignore[misc]
        await eventually(lambda: feed.released == position)
        await asyncio.sleep(0)
        stop.set()
        await asyncio.gather(*readers)
        # After the last write, every query reads the last versions, mostly from memory.
        for user_id in ids:
            view = await asyncio.create_task(_query(cache, checkpoint, views, user_id))
            assert view is not None and view.version == versions[user_id]
    assert stale == []
    stats = cache.stats()
    assert stats.hits > 0 and stats.invalidations > 0
    assert 0 < stats.hit_ratio < 1


async def _query(cache: NearCache, checkpoint: Any, views: UserViews, user_id: str) -> UserView | None:
    await cache.observe(checkpoint)()
    return await views.get(user_id)


async def test_the_service_ends_watches_cleanly_on_shutdown_and_caps_their_number(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    event_log: EventLog,
    users: UserFactory,
) -> None:
    user_id, registered = users.register("shutdown@example.com", "shutdown")
    await event_log.append(registered)
    settings = settings_for(database_url, redis_server_url, redis_prefix).model_copy(
        update={"watch_max_streams": 1, "near_cache_size": 10}
    )
    async with running_read_service(settings) as service:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        try:
            stub = UserQueryServiceStub(channel)
            await eventually(lambda: service.projector.ready)
            watch = stub.WatchUser(pb.WatchUserRequest(user_id=user_id), timeout=30)
            first = await watch.read()
            assert isinstance(first, pb.WatchUserResponse)
            assert first.exists and first.version == 1 and first.view_position == 1
            # WATCH_MAX_STREAMS=1: a second watch is refused while the first is open.
            second = stub.WatchUser(pb.WatchUserRequest(user_id=user_id), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await second.read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # GetUser goes through the near cache: the second read is a hit.
            for _ in range(2):
                reply = await stub.GetUser(pb.GetUserRequest(user_id=user_id), timeout=10)
                assert reply.user.version == 1
            users_cache = next(c for c in service.near_caches if c.name == "users")
            assert users_cache.stats().hits >= 1
        except BaseException:
            await channel.close()
            raise
    # Shutdown ended the open watch with OK, before the server's drain.
    assert await watch.read() is grpc.aio.EOF
    assert await watch.code() == grpc.StatusCode.OK
    await channel.close()


class CountingPool:
    """The real pool, counting the event-log reads a feed makes through it."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self._pool = pool
        self.fetches = 0

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        self.fetches += 1
        return await self._pool.fetch(*args, **kwargs)


async def test_a_follower_without_watches_reads_nothing_from_the_log_and_its_cache_forgets(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector()
    pool = CountingPool(db_pool)
    cache = NearCache("users", 100)
    follower = feed_for(Follower(projector), redis_prefix, redis_client, pool, caches=[cache])  # type: ignore[arg-type]
    views = UserViews(redis_client, UserKeys(redis_prefix), cache=cache)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("quiet@example.com", "quiet")
    async with running(follower):
        for envelope in await event_log.append(registered):
            await publisher.event(envelope)
        await eventually(lambda: projector.checkpoint == 1 and follower.released == 1)
        first, _position = await query(views, cache, projector, user_id)  # a miss: fills the cache
        assert first is not None and first.version == 1
        assert cache.stats().size == 1

        for index in range(5):
            for envelope in await event_log.append(users.update(user_id, f"Quiet {index}")):
                await publisher.event(envelope)
        await eventually(lambda: projector.checkpoint == 6 and follower.released == 6)
        assert pool.fetches == 0
        assert follower.replayed == 6
        assert cache.stats().size == 0  # forgotten: the follower cannot tell which keys changed

        # Once a watch is open the follower reads the events it did not compute again.
        stream = Watches(follower, WatchLimiter(1)).one(UserKeys(redis_prefix).view(user_id))
        opening = await anext(stream)
        assert opening.value is not None and UserView.FromString(opening.value).version == 6
        for envelope in await event_log.append(users.update(user_id, "Watched")):
            await publisher.event(envelope)
        change = await asyncio.wait_for(anext(stream), 10)
        assert change.value is not None and UserView.FromString(change.value).full_name == "Watched"
        await stream.aclose()
        assert pool.fetches >= 1


async def test_a_resumed_watch_replays_every_change_after_its_position_then_goes_on_live(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
) -> None:
    watched, registered = users.register("resume@example.com", "resume")
    other, other_registered = users.register("other@example.com", "other")
    envelopes = await event_log.append(registered, other_registered)
    for n in range(6):
        envelopes += await event_log.append(users.update(watched, f"Resume {n}"), users.update(other, f"Other {n}"))
    # (version, position) of each event of the watched user, in log order: versions 1..7.
    history = [(e.aggregate_version, e.position) for e in envelopes if e.aggregate_id == watched]
    assert [v for v, _ in history] == list(range(1, 8))
    settings = settings_for(database_url, redis_server_url, redis_prefix)
    async with running_read_service(settings) as service:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        try:
            stub = UserQueryServiceStub(channel)
            head = await event_log.head()
            await eventually(lambda: service.projector.ready and service.projector.checkpoint == head)

            async def received(after: int, count: int) -> list[tuple[int, int, str]]:
                call = stub.WatchUser(pb.WatchUserRequest(user_id=watched, after_position=after), timeout=30)
                got = []
                for _ in range(count):
                    message = await asyncio.wait_for(call.read(), 10)
                    assert isinstance(message, pb.WatchUserResponse) and message.exists
                    got.append((message.version, message.view_position, message.user.full_name))
                call.cancel()
                return got

            # From the position of version 2: versions 3..7 at their own positions, each view as it was then.
            after = history[1][1]
            got = await received(after, 5)
            assert [(v, p) for v, p, _ in got] == history[2:]
            assert [name for _, _, name in got] == [f"Resume {n}" for n in range(1, 6)]
            # From before the first event: every version, the registration first.
            assert [(v, p) for v, p, _ in await received(0, 7)] == history

            # From the head: nothing until the next change, which comes live.
            call = stub.WatchUser(pb.WatchUserRequest(user_id=watched, after_position=head), timeout=30)
            reading = asyncio.ensure_future(call.read())
            (update,) = await event_log.append(users.update(watched, "Live"))
            await publisher.event(update)
            message = await asyncio.wait_for(reading, 10)
            assert isinstance(message, pb.WatchUserResponse)
            assert (message.version, message.view_position, message.user.full_name) == (8, update.position, "Live")
            call.cancel()

            # Without a resume point the watch starts with the view now, as before.
            plain = stub.WatchUser(pb.WatchUserRequest(user_id=watched), timeout=30)
            first = await asyncio.wait_for(plain.read(), 10)
            assert isinstance(first, pb.WatchUserResponse) and first.version == 8
            plain.cancel()

            # A position above the event log's head was never sent by any replica.
            bad = stub.WatchUser(pb.WatchUserRequest(user_id=watched, after_position=update.position + 100), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bad.read()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await channel.close()


async def test_a_resume_point_ahead_of_the_replica_sends_only_what_comes_after_it(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    """The caller saw a position this replica has not reached: nothing until the first change after it."""
    projector = await start_projector()
    feed = feed_for(projector, redis_prefix, redis_client, db_pool)
    projector.effect_listeners = (feed.on_effect,)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("ahead@example.com", "ahead")
    (created,) = await event_log.append(registered)
    await publisher.event(created)
    await eventually(lambda: projector.checkpoint == created.position)
    # Two updates in the log only: another replica delivered them, this one has not seen them.
    behind = await event_log.append(
        users.update(user_id, "Seen elsewhere 1"), users.update(user_id, "Seen elsewhere 2")
    )
    async with running(feed):
        await eventually(lambda: feed.released == created.position)
        stream = Watches(feed, WatchLimiter(1)).one(
            UserKeys(redis_prefix).view(user_id), resume_at(behind[-1].position, "user", user_id)
        )
        first = asyncio.ensure_future(anext(stream))
        await publisher.head(await event_log.head())  # the replica catches up with the two updates
        await eventually(lambda: feed.released == behind[-1].position)
        assert not first.done()
        (after,) = await event_log.append(users.update(user_id, "New"))
        await publisher.event(after)
        change = await asyncio.wait_for(first, 10)
        assert change.position == after.position
        assert change.value is not None and UserView.FromString(change.value).full_name == "New"
        await stream.aclose()
