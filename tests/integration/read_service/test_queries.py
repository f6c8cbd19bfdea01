"""UserQueryService through a real server, channel and stub, over views built by the projector."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from read_service.bootstrap import create_redis_client
from read_service.entrypoints.grpc_server import SERVICE_NAME, PageLimits, UserQueryServicer, register_user_queries
from read_service.keys import UserKeys
from read_service.page_tokens import PageTokenCodec
from read_service.projector import Projector
from read_service.views.users import UserViews
from shared_kernel.platform.grpc_errors import bad_request_from_status
from shared_kernel.platform.grpc_server import GrpcServer
from shared_kernel.platform.settings import GrpcServerSettings
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

from .conftest import BASE_TIME, EventLog, Publisher, StartProjector, UserFactory, eventually

pytestmark = pytest.mark.integration

SECRET = b"integration-test-page-token-secret"
NAMES = [
    "alice", "Bob", "carol", "dave", "Eve", "frank", "Grace", "heidi", "ivan", "Judy", "mallory",
    "Niaj", "olivia", "peggy", "Rupert", "sybil", "Trent", "victor", "Walter", "xavier", "Yolanda",
    "zoe", "alex",
]  # fmt: skip
INACTIVE = {"Bob", "heidi", "mallory", "Trent", "zoe"}
SMITHS = {"carol", "ivan", "Trent", "xavier"}


@dataclass
class Served:
    """A running query server over one projector's views."""

    stub: Any
    projector: Projector
    event_log: EventLog
    publisher: Publisher

    async def sync(self) -> None:
        """Announce the log's head and wait until the views reach it."""
        head = await self.event_log.head()
        await self.publisher.head(head)
        await eventually(lambda: self.projector.checkpoint == head, message="views did not catch up")


ServeServicer = Callable[[UserQueryServicer], contextlib.AbstractAsyncContextManager[Any]]


@pytest.fixture
def serve_servicer() -> ServeServicer:
    """Serve a servicer on a free port with the shared GrpcServer; yields a stub."""

    @contextlib.asynccontextmanager
    async def serve(servicer: UserQueryServicer) -> AsyncIterator[Any]:
        settings = GrpcServerSettings(grpc_host="127.0.0.1", grpc_port=0, grpc_shutdown_grace_s=1)
        server = GrpcServer(settings, [SERVICE_NAME])
        server.add(register_user_queries, servicer)
        port = await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield UserQueryServiceStub(channel)
        finally:
            await channel.close()
            await server.stop()

    return serve


@pytest.fixture
async def views_client(redis_server_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server_url, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def served(
    start_projector: StartProjector,
    event_log: EventLog,
    publisher: Publisher,
    views_client: aioredis.Redis,
    redis_prefix: str,
    serve_servicer: ServeServicer,
) -> AsyncIterator[Served]:
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    servicer = UserQueryServicer(
        UserViews(views_client, UserKeys(redis_prefix)), PageTokenCodec(SECRET), lambda: projector.ready
    )
    async with serve_servicer(servicer) as stub:
        yield Served(stub, projector, event_log, publisher)


@dataclass(frozen=True)
class Person:
    name: str
    user_id: str
    email: str
    username: str
    full_name: str
    created_micros: int
    active: bool


async def populate(served: Served, users: UserFactory) -> list[Person]:
    """Register NAMES (every third shares its predecessor's time), rename and deactivate some."""
    people: list[Person] = []
    events = []
    at = BASE_TIME
    for index, name in enumerate(NAMES):
        if index % 3 != 2:
            at += timedelta(seconds=1)
        email = f"{name}@Example.org"
        username = f"{name.swapcase()}_{index}"
        user_id, event = users.register(email, username, f"{name.title()} Jones", at=at)
        events.append(event)
        full_name = f"{name.title()} Jones"
        if name in SMITHS:
            full_name = f"{name.title()} Smith"
            events.append(users.update(user_id, full_name, bio="renamed"))
        if name in INACTIVE:
            events.append(users.deactivate(user_id))
        people.append(
            Person(name, user_id, email, username, full_name, int(at.timestamp() * 1_000_000), name not in INACTIVE)
        )
    await served.event_log.append(*events)
    await served.sync()
    return people


def expected(people: list[Person], sort: int = 0, desc: bool = False, active: int = 0, search: str = "") -> list[str]:
    chosen = [
        p
        for p in people
        if (active == 0 or p.active is (active == pb.ACTIVE_FILTER_ACTIVE))
        and (not search or any(search.casefold() in text.casefold() for text in (p.email, p.username, p.full_name)))
    ]
    key: Callable[[Person], Any]
    if sort == pb.USER_SORT_FIELD_EMAIL:
        key = lambda p: (p.email.lower(), p.user_id)  # noqa: E731
    elif sort == pb.USER_SORT_FIELD_USERNAME:
        key = lambda p: (p.username.lower(), p.user_id)  # noqa: E731
    else:
        key = lambda p: (p.created_micros, p.user_id)  # noqa: E731
    return [p.user_id for p in sorted(chosen, key=key, reverse=desc)]


async def list_all(stub: Any, **request: Any) -> tuple[list[str], int]:
    """Follow page tokens to the end; return the ids in order and the number of calls."""
    ids: list[str] = []
    token = ""
    calls = 0
    while True:
        reply = await stub.ListUsers(pb.ListUsersRequest(page_token=token, **request))
        calls += 1
        ids.extend(user.user_id for user in reply.users)
        token = reply.next_page_token
        if not token:
            return ids, calls
        assert calls < 500, "pagination does not end"


async def expect_error(call: Any, code: grpc.StatusCode, field: str | None = None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, error.details()
    if field is not None:
        bad_request = bad_request_from_status(error)
        assert bad_request is not None
        assert [v.field for v in bad_request.field_violations] == [field]
    return error


# -- GetUser / GetUserByEmail ---------------------------------------------------------------


async def test_get_user_returns_the_whole_view(served: Served, users: UserFactory):
    user_id, registered = users.register("Ada@Example.com", "AdaL", "Ada Lovelace")
    await served.event_log.append(registered, users.update(user_id, "Ada King", "Analyst", "https://x/a.png"))
    await served.sync()

    reply = await served.stub.GetUser(pb.GetUserRequest(user_id=user_id))

    user = reply.user
    assert (user.user_id, user.email, user.username) == (user_id, "Ada@Example.com", "AdaL")
    assert (user.full_name, user.bio, user.avatar_url) == ("Ada King", "Analyst", "https://x/a.png")
    assert user.active and user.deactivation_reason == ""
    assert user.version == 2
    assert user.created_at.ToDatetime() < user.updated_at.ToDatetime()
    upper = await served.stub.GetUser(pb.GetUserRequest(user_id=user_id.upper()))
    assert upper.user == user


async def test_get_user_errors(served: Served):
    for bad in ["", "nope", "123e4567e89b12d3a456426614174000", "{123e4567-e89b-12d3-a456-426614174000}"]:
        await expect_error(
            served.stub.GetUser(pb.GetUserRequest(user_id=bad)), grpc.StatusCode.INVALID_ARGUMENT, "user_id"
        )
    await expect_error(
        served.stub.GetUser(pb.GetUserRequest(user_id="123e4567-e89b-12d3-a456-426614174000")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_get_user_by_email_is_case_insensitive(served: Served, users: UserFactory):
    user_id, registered = users.register("Grace.Hopper@Navy.MIL", "grace")
    await served.event_log.append(registered, users.deactivate(user_id, "retired"))
    await served.sync()

    for email in ["Grace.Hopper@Navy.MIL", "grace.hopper@navy.mil", "GRACE.HOPPER@NAVY.MIL"]:
        reply = await served.stub.GetUserByEmail(pb.GetUserByEmailRequest(email=email))
        assert reply.user.user_id == user_id
        assert reply.user.email == "Grace.Hopper@Navy.MIL"
        assert not reply.user.active and reply.user.deactivation_reason == "retired"


async def test_get_user_by_email_errors(served: Served):
    for bad in ["", "a" * 321, "a\n@b.c", "x\x7f@y.z"]:
        await expect_error(
            served.stub.GetUserByEmail(pb.GetUserByEmailRequest(email=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "email",
        )
    await expect_error(
        served.stub.GetUserByEmail(pb.GetUserByEmailRequest(email="nobody@example.com")),
        grpc.StatusCode.NOT_FOUND,
    )


# -- ListUsers ----------------------------------------------------------------------------------


async def test_every_sort_direction_and_filter_pages_through_in_order(served: Served, users: UserFactory):
    people = await populate(served, users)
    for sort in (0, pb.USER_SORT_FIELD_CREATED_AT, pb.USER_SORT_FIELD_EMAIL, pb.USER_SORT_FIELD_USERNAME):
        for direction in (0, pb.SORT_DIRECTION_ASC, pb.SORT_DIRECTION_DESC):
            for active in (0, pb.ACTIVE_FILTER_ACTIVE, pb.ACTIVE_FILTER_INACTIVE):
                want = expected(people, sort, direction == pb.SORT_DIRECTION_DESC, active)
                for page_size in (1, 4, 100):
                    got, calls = await list_all(
                        served.stub, page_size=page_size, sort_by=sort, sort_direction=direction, active=active
                    )
                    assert got == want, (sort, direction, active, page_size)
                    assert calls == max(1, -(-len(want) // page_size))


async def test_default_page_size_is_twenty(served: Served, users: UserFactory):
    people = await populate(served, users)
    first = await served.stub.ListUsers(pb.ListUsersRequest())
    assert [u.user_id for u in first.users] == expected(people)[:20]
    second = await served.stub.ListUsers(pb.ListUsersRequest(page_token=first.next_page_token))
    assert [u.user_id for u in second.users] == expected(people)[20:]
    assert second.next_page_token == ""


async def test_users_with_equal_creation_times_are_ordered_by_id(served: Served, users: UserFactory):
    people = await populate(served, users)
    ids, _ = await list_all(served.stub, page_size=2)
    by_time: dict[int, list[str]] = {}
    for person in people:
        by_time.setdefault(person.created_micros, []).append(person.user_id)
    ties = [sorted(group) for group in by_time.values() if len(group) > 1]
    assert ties
    for group in ties:
        positions = [ids.index(user_id) for user_id in group]
        assert positions == sorted(positions)


@pytest.mark.parametrize(
    ("search", "active"),
    [
        ("smith", 0),
        ("SMITH", pb.ACTIVE_FILTER_ACTIVE),
        ("example.ORG", 0),
        ("_1", 0),  # usernames only: name_1, name_10 ... name_19
        ("rUPERT", 0),
        ("jones", pb.ACTIVE_FILTER_INACTIVE),
        ("no such person", 0),
    ],
)
async def test_search_is_a_case_insensitive_substring_of_email_username_or_name(
    served: Served, users: UserFactory, search: str, active: int
):
    people = await populate(served, users)
    for sort in (pb.USER_SORT_FIELD_CREATED_AT, pb.USER_SORT_FIELD_EMAIL):
        for direction in (pb.SORT_DIRECTION_ASC, pb.SORT_DIRECTION_DESC):
            want = expected(people, sort, direction == pb.SORT_DIRECTION_DESC, active, search)
            for page_size in (1, 3, 50):
                got, _ = await list_all(
                    served.stub,
                    page_size=page_size,
                    search=search,
                    active=active,
                    sort_by=sort,
                    sort_direction=direction,
                )
                assert got == want, (search, active, sort, direction, page_size)


async def test_a_scanned_search_with_a_small_scan_budget_returns_short_pages_that_still_cover_everything(
    served: Served,
    users: UserFactory,
    views_client: aioredis.Redis,
    redis_prefix: str,
    serve_servicer: ServeServicer,
):
    people = await populate(served, users)
    servicer = UserQueryServicer(
        # Candidate limit 0: every term counts as common and is scanned, as a short term is.
        UserViews(views_client, UserKeys(redis_prefix), scan_limit=3, candidate_limit=0),
        PageTokenCodec(SECRET),
        lambda: True,
    )
    async with serve_servicer(servicer) as stub:
        got, calls = await list_all(stub, page_size=10, search="smith")
        assert got == expected(people, search="smith")
        assert calls > 1
        # A page may even be empty, with a token to go on.
        reply = await stub.ListUsers(pb.ListUsersRequest(page_size=1, search="zoe"))
        assert reply.next_page_token


async def test_every_search_plan_gives_the_same_full_pages(
    served: Served,
    users: UserFactory,
    views_client: aioredis.Redis,
    redis_prefix: str,
    serve_servicer: ServeServicer,
):
    """The scan (limit 0), an intersection too large for the index (limit 2: "smith"), and the index (limit 2000).

    Username order reads every candidate; creation order takes them ranked (read_service.views.paging).
    """
    people = await populate(served, users)
    orders = ((pb.USER_SORT_FIELD_USERNAME, True), (pb.USER_SORT_FIELD_CREATED_AT, False))
    for limit in (0, 2, 2000):
        servicer = UserQueryServicer(
            UserViews(views_client, UserKeys(redis_prefix), candidate_limit=limit), PageTokenCodec(SECRET), lambda: True
        )
        async with serve_servicer(servicer) as stub:
            for search in ("smith", "jones", "ol", "@example.org", "_1", "zoe@", "nothing-like-it"):
                for active, (sort, desc) in [(a, o) for a in (0, pb.ACTIVE_FILTER_ACTIVE) for o in orders]:
                    want = expected(people, sort=sort, desc=desc, active=active, search=search)
                    got, calls = await list_all(
                        stub,
                        page_size=3,
                        search=search.upper(),
                        active=active,
                        sort_by=sort,
                        sort_direction=pb.SORT_DIRECTION_DESC if desc else pb.SORT_DIRECTION_ASC,
                    )
                    assert got == want, (limit, search, active, sort)
                    if limit:
                        # Full pages: as many calls as pages the results need (one for none).
                        assert calls == max(1, -(-len(want) // 3)), (limit, search, active, sort)


async def test_paging_is_stable_while_users_are_added(served: Served, users: UserFactory):
    people = await populate(served, users)
    request: dict[str, Any] = {"page_size": 5, "sort_by": pb.USER_SORT_FIELD_EMAIL}
    first = await served.stub.ListUsers(pb.ListUsersRequest(**request))
    seen = [u.user_id for u in first.users]
    last_email = first.users[-1].email.lower()

    before_id, before = users.register("aaaa@example.org", "aaaa")  # sorts before the cursor
    after_id, after = users.register("zzzz@example.org", "zzzz")  # sorts after it
    await served.event_log.append(before, after)
    await served.sync()

    token = first.next_page_token
    while token:
        reply = await served.stub.ListUsers(pb.ListUsersRequest(page_token=token, **request))
        seen.extend(u.user_id for u in reply.users)
        token = reply.next_page_token
    assert last_email > "aaaa@example.org"
    assert len(seen) == len(set(seen)), "a user appeared twice"
    assert set(seen) == {p.user_id for p in people} | {after_id}
    assert before_id not in seen


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 101}, "page_size"),
        ({"sort_by": 99}, "sort_by"),
        ({"sort_direction": 7}, "sort_direction"),
        ({"active": -3}, "active"),
        ({"search": "x" * 101}, "search"),
        ({"search": "line\nbreak"}, "search"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": "A" * 5000}, "page_token"),
    ],
)
async def test_list_users_rejects_bad_requests(served: Served, request_fields: dict[str, Any], field: str):
    await expect_error(
        served.stub.ListUsers(pb.ListUsersRequest(**request_fields)), grpc.StatusCode.INVALID_ARGUMENT, field
    )


async def test_page_tokens_are_bound_to_their_query_and_cannot_be_tampered_with(served: Served, users: UserFactory):
    await populate(served, users)
    first = await served.stub.ListUsers(pb.ListUsersRequest(page_size=2, search="jones"))
    token = first.next_page_token
    assert token

    others: list[dict[str, Any]] = [
        {"search": "smith"},
        {"search": "jones", "sort_by": pb.USER_SORT_FIELD_EMAIL},
        {"search": "jones", "sort_direction": pb.SORT_DIRECTION_DESC},
        {"search": "jones", "active": pb.ACTIVE_FILTER_ACTIVE},
    ]
    for other in others:
        error = await expect_error(
            served.stub.ListUsers(pb.ListUsersRequest(page_size=2, page_token=token, **other)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        )
        bad_request = bad_request_from_status(error)
        assert bad_request is not None
        assert "different filter" in bad_request.field_violations[0].description
    for index in (0, len(token) // 2, len(token) - 1):
        replacement = "A" if token[index] != "A" else "B"
        tampered = token[:index] + replacement + token[index + 1 :]
        await expect_error(
            served.stub.ListUsers(pb.ListUsersRequest(page_size=2, search="jones", page_token=tampered)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        )
    forged = PageTokenCodec(b"some-other-secret-of-enough-length").issue(
        b"users.list|created_at|asc|all|jones", b"anything"
    )
    await expect_error(
        served.stub.ListUsers(pb.ListUsersRequest(page_size=2, search="jones", page_token=forged)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    # The genuine token still works, with any page size.
    reply = await served.stub.ListUsers(pb.ListUsersRequest(page_size=3, search="JONES", page_token=token))
    assert len(reply.users) == 3


async def test_page_size_above_the_configured_maximum_is_rejected(
    views_client: aioredis.Redis, redis_prefix: str, serve_servicer: ServeServicer
):
    servicer = UserQueryServicer(
        UserViews(views_client, UserKeys(redis_prefix)),
        PageTokenCodec(SECRET),
        lambda: True,
        limits=PageLimits(default=2, maximum=3),
    )
    async with serve_servicer(servicer) as stub:
        await expect_error(
            stub.ListUsers(pb.ListUsersRequest(page_size=4)), grpc.StatusCode.INVALID_ARGUMENT, "page_size"
        )
        assert (await stub.ListUsers(pb.ListUsersRequest(page_size=3))).users == []


# -- availability -----------------------------------------------------------------------------


async def test_queries_are_unavailable_until_the_views_have_caught_up(
    views_client: aioredis.Redis, redis_prefix: str, serve_servicer: ServeServicer
):
    servicer = UserQueryServicer(UserViews(views_client, UserKeys(redis_prefix)), PageTokenCodec(SECRET), lambda: False)
    async with serve_servicer(servicer) as stub:
        await expect_error(stub.ListUsers(pb.ListUsersRequest()), grpc.StatusCode.UNAVAILABLE)
        await expect_error(
            stub.GetUser(pb.GetUserRequest(user_id="123e4567-e89b-12d3-a456-426614174000")),
            grpc.StatusCode.UNAVAILABLE,
        )
        await expect_error(stub.GetUserByEmail(pb.GetUserByEmailRequest(email="a@b.c")), grpc.StatusCode.UNAVAILABLE)
        # Invalid input is still reported as such.
        await expect_error(
            stub.ListUsers(pb.ListUsersRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT, "page_size"
        )


async def test_redis_errors_become_unavailable(redis_prefix: str, serve_servicer: ServeServicer):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        unused_port = probe.getsockname()[1]
    dead = create_redis_client(f"redis://127.0.0.1:{unused_port}/0", timeout_s=1.0)
    servicer = UserQueryServicer(UserViews(dead, UserKeys(redis_prefix)), PageTokenCodec(SECRET), lambda: True)
    try:
        async with serve_servicer(servicer) as stub:
            await expect_error(stub.ListUsers(pb.ListUsersRequest()), grpc.StatusCode.UNAVAILABLE)
            await expect_error(
                stub.GetUser(pb.GetUserRequest(user_id="123e4567-e89b-12d3-a456-426614174000")),
                grpc.StatusCode.UNAVAILABLE,
            )
            await expect_error(
                stub.GetUserByEmail(pb.GetUserByEmailRequest(email="a@b.c")), grpc.StatusCode.UNAVAILABLE
            )
    finally:
        await dead.aclose()
