"""The search index over a large seeded log: full pages for rare terms, updates, rebuilds, filters, consistency.

Events are appended to the real Postgres log directly (as the relay would have positioned
them) and the composed read service (every projection, generations, real gRPC) catches up
from it; later events are announced with a StreamHead, as the relay's heartbeat does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis.asyncio as aioredis

from read_service.bootstrap import ReadService, running_read_service
from read_service.generations import keyspace_prefix, pointer_key
from read_service.rebuild import rebuild, registered_projections
from shared_kernel.contracts.consistency import encode_token
from shared_kernel.contracts.event_log import NewEvent
from tessera.orders.v1 import order_query_service_pb2 as opb
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera.orders.v1.order_query_service_pb2_grpc import OrderQueryServiceStub
from tessera.users.v1 import user_query_service_pb2 as upb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub
from tests.unit.read_service.order_events import Events

from .conftest import EventLog, Publisher, UserFactory, dump_keyspace, eventually
from .test_service import settings_for

if TYPE_CHECKING:
    from tessera.orders.v1.order_query_service_pb2_grpc import OrderQueryServiceAsyncStub
    from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceAsyncStub

pytestmark = pytest.mark.integration

S = OrderStatus
USERS = 20_000
ORDERS = 3_000
RARE = "qzxv"  # in no generated name, e-mail or sku
START = datetime(2024, 5, 1, tzinfo=UTC)


@dataclass
class Seeded:
    """What the log holds: many ordinary users and orders, and a few that hold the rare term."""

    users: UserFactory = field(default_factory=UserFactory)
    events: Events = field(default_factory=Events)
    log: list[NewEvent] = field(default_factory=list)
    rare_users: list[str] = field(default_factory=list)
    rare_orders: list[str] = field(default_factory=list)
    products: dict[str, str] = field(default_factory=dict)

    def build(self) -> None:
        first = ["anna", "ben", "carla", "dan", "emma", "finn", "gina", "hugo", "ida", "jon"]
        last = ["smith", "jones", "brown", "taylor", "wilson", "evans", "thomas", "roberts"]
        customers: list[str] = []
        for n in range(USERS):
            name = f"{first[n % 10].title()} {last[(n // 10) % 8].title()}"
            at = START + timedelta(seconds=n)
            if n in (4_000, 11_000, 17_500):
                # The rare term in a different field of each (and in another case).
                k = len(self.rare_users)
                email = f"u{n}.{RARE}@example.org" if k == 0 else f"u{n}@example.org"
                username = f"{RARE.upper()}_{n}" if k == 1 else f"user_{n}"
                full_name = f"{name} Mc{RARE.title()}" if k == 2 else name
                user_id, event = self.users.register(email, username, full_name, at=at)
                self.rare_users.append(user_id)
            else:
                user_id, event = self.users.register(f"u{n}@example.org", f"user_{n}", name, at=at)
            customers.append(user_id)
            self.log.append(event)
        ev = self.events
        for sku, name in (("ANV-1", "Anvil"), ("BLT-2", "Bolt"), (f"{RARE}-9", "Rare Widget")):
            product_id, added = ev.add_product(sku, name, 1000, 1_000_000)
            self.products[sku] = product_id
            self.log.append(added)
        for n in range(ORDERS):
            when = START + timedelta(minutes=n)
            rare = n in (500, 1_500, 2_500)
            name = f"Kim {RARE.title()}" if rare else "Kim Smith"
            order_id, placed = ev.place(
                customers[n], [(self.products["ANV-1"], 1 + n % 5)], name=name, email=f"c{n}@example.org", when=when
            )
            self.log.append(placed)
            if rare:
                self.rare_orders.append(order_id)


@dataclass
class Searching:
    service: ReadService
    users: UserQueryServiceAsyncStub
    orders: OrderQueryServiceAsyncStub
    seeded: Seeded
    event_log: EventLog
    publisher: Publisher

    async def append(self, *events: NewEvent) -> int:
        """Append events, announce the head and wait until every projection has applied them."""
        envelopes = await self.event_log.append(*events)
        head = envelopes[-1].position
        await self.publisher.head(head)
        await eventually(lambda: all(p.checkpoint >= head for p in self.service.projectors), timeout=30)
        return head


@pytest.fixture
def seeded() -> Seeded:
    world = Seeded()
    world.build()
    return world


@pytest.fixture
async def searching(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    event_log: EventLog,
    seeded: Seeded,
) -> AsyncIterator[Searching]:
    for start in range(0, len(seeded.log), 5_000):
        await event_log.append(*seeded.log[start : start + 5_000])
    settings = settings_for(database_url, redis_server_url, redis_prefix)
    async with running_read_service(settings) as service:
        head = await event_log.head()
        await eventually(
            lambda: all(p.ready and p.checkpoint == head for p in service.projectors),
            timeout=240,
            message="the projectors did not catch up",
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        try:
            yield Searching(
                service,
                UserQueryServiceStub(channel),
                OrderQueryServiceStub(channel),
                seeded,
                event_log,
                Publisher(redis_client, redis_prefix),
            )
        finally:
            await channel.close()


async def user_pages(s: Searching, page_size: int = 2, **fields: Any) -> list[list[str]]:
    """The user ids of every page of a ListUsers search, following tokens."""
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await s.users.ListUsers(upb.ListUsersRequest(page_size=page_size, page_token=token, **fields))
        pages.append([u.user_id for u in reply.users])
        token = reply.next_page_token
        if not token:
            return pages


async def order_pages(s: Searching, page_size: int = 2, **fields: Any) -> list[list[str]]:
    """The order ids of every page of a SearchOrders, following tokens."""
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await s.orders.SearchOrders(opb.SearchOrdersRequest(page_size=page_size, page_token=token, **fields))
        pages.append([o.order_id for o in reply.orders])
        token = reply.next_page_token
        if not token:
            return pages


async def rare_terms_give_full_pages_in_every_sort_and_filter(s: Searching) -> None:
    rare = s.seeded.rare_users
    # Registered in this order, so created_at order is this order.
    assert await user_pages(s, search=RARE) == [rare[:2], rare[2:]]
    assert await user_pages(s, search=RARE.upper(), sort_direction=upb.SORT_DIRECTION_DESC) == [
        rare[::-1][:2],
        rare[::-1][2:],
    ]
    # E-mail order: u11000 < u17500 < u4000 as strings.
    by_email = [rare[1], rare[2], rare[0]]
    assert await user_pages(s, search=RARE, sort_by=upb.USER_SORT_FIELD_EMAIL) == [by_email[:2], by_email[2:]]
    assert await user_pages(s, page_size=5, search=RARE, active=upb.ACTIVE_FILTER_INACTIVE) == [[]]
    assert await user_pages(s, page_size=3, search=f"{RARE}#") == [[]]
    assert await user_pages(s, page_size=3, search=f".{RARE}@exa") == [[rare[0]]]
    # Every trigram of "xv_1" is in some user, but only one user holds them all, in one field.
    assert await user_pages(s, page_size=3, search="xv_11") == [[rare[1]]]

    orders = s.seeded.rare_orders  # placed in this order; SearchOrders is newest first by default
    assert await order_pages(s, text=RARE) == [orders[::-1][:2], orders[::-1][2:]]
    assert await order_pages(s, text=f"kim {RARE}", sort_direction=opb.ORDER_SORT_DIRECTION_ASC) == [
        orders[:2],
        orders[2:],
    ]
    assert await order_pages(s, text=RARE, statuses=[S.ORDER_STATUS_PENDING], page_size=3) == [orders[::-1]]
    assert await order_pages(s, text=RARE, statuses=[S.ORDER_STATUS_CANCELLED]) == [[]]
    placed_from = opb.SearchOrdersRequest().placed_from
    placed_from.FromDatetime(START + timedelta(minutes=1_000))
    placed_to = opb.SearchOrdersRequest().placed_to
    placed_to.FromDatetime(START + timedelta(minutes=2_000))
    assert await order_pages(s, text=RARE, placed_from=placed_from, placed_to=placed_to) == [[orders[1]]]
    # Totals: 1 + n % 5 anvils: order 500 -> 1, 1500 -> 1, 2500 -> 1; ties break on the order id.
    by_total = sorted(orders)
    assert await order_pages(
        s, text=RARE, sort_by=opb.ORDER_SORT_FIELD_TOTAL, sort_direction=opb.ORDER_SORT_DIRECTION_ASC, page_size=1
    ) == [[o] for o in by_total]


async def a_term_with_many_candidates_pages_in_order_through_every_match(s: Searching) -> None:
    # "u19" is in the e-mail u<n>@example.org of every n that starts with 19: 1,111 users,
    # walked in creation order, each page reading only as far as it reaches.
    matching = [n for n in range(USERS) if str(n).startswith("19")]
    ids = [s.seeded.log[n].aggregate_id for n in matching]  # registered in this order
    pages = await user_pages(s, page_size=50, search="u19")
    assert all(len(page) == 50 for page in pages[:-1]) and [u for page in pages for u in page] == ids
    pages = await user_pages(s, page_size=50, search="U19", sort_direction=upb.SORT_DIRECTION_DESC)
    assert all(len(page) == 50 for page in pages[:-1]) and [u for page in pages for u in page] == ids[::-1]
    # Another sort reads every candidate: the same users, in e-mail order.
    by_email = [s.seeded.log[n].aggregate_id for n in sorted(matching, key=lambda n: f"u{n}@example.org")]
    first = await s.users.ListUsers(upb.ListUsersRequest(page_size=30, search="u19", sort_by=upb.USER_SORT_FIELD_EMAIL))
    assert [u.user_id for u in first.users] == by_email[:30]
    assert await user_pages(s, page_size=50, search="u19", active=upb.ACTIVE_FILTER_INACTIVE) == [[]]

    # Orders c<n>@example.org: every n that starts with 29, newest first; a placing window keeps 290..294.
    orders = {n: s.seeded.log[USERS + 3 + n].aggregate_id for n in range(ORDERS)}
    newest_first = [orders[n] for n in reversed(range(ORDERS)) if str(n).startswith("29")]
    pages = await order_pages(s, page_size=20, text="c29")
    assert all(len(page) == 20 for page in pages[:-1]) and [o for page in pages for o in page] == newest_first
    placed_from = opb.SearchOrdersRequest().placed_from
    placed_from.FromDatetime(START + timedelta(minutes=290))
    placed_to = opb.SearchOrdersRequest().placed_to
    placed_to.FromDatetime(START + timedelta(minutes=295))
    assert await order_pages(s, page_size=3, text="c29", placed_from=placed_from, placed_to=placed_to) == [
        [orders[n] for n in (294, 293, 292)],
        [orders[n] for n in (291, 290)],
    ]


async def test_rare_terms_and_terms_with_many_candidates_give_full_pages_in_order(searching: Searching) -> None:
    # Both only read, so they share one seeded world (seeding and building it is most of this file's time).
    await rare_terms_give_full_pages_in_every_sort_and_filter(searching)
    await a_term_with_many_candidates_pages_in_order_through_every_match(searching)


async def test_the_index_follows_updates_deactivations_placements_and_cancellations(searching: Searching) -> None:
    s = searching
    users = s.seeded.users
    rare = s.seeded.rare_users
    plain = s.seeded.log[100]
    plain_id = plain.aggregate_id
    renamed_version = users.versions[rare[2]] + 1
    await s.append(
        users.update(rare[2], "Plain Name"),  # loses the term
        users.update(plain_id, f"Now {RARE} Too"),  # gains it
        users.deactivate(rare[1]),
    )
    # Read-your-writes: the token of the rename, and the answer is not stale.
    reply = await s.users.ListUsers(
        upb.ListUsersRequest(
            page_size=10,
            search=RARE,
            consistency_token=encode_token("user", rare[2], renamed_version),
            max_wait_ms=2000,
        )
    )
    assert reply.stale is False
    assert [u.user_id for u in reply.users] == [plain_id, rare[0], rare[1]]  # registration order
    assert await user_pages(s, search=RARE, active=upb.ACTIVE_FILTER_ACTIVE) == [[plain_id, rare[0]]]
    assert await user_pages(s, search=RARE, active=upb.ACTIVE_FILTER_INACTIVE) == [[rare[1]]]
    assert await user_pages(s, search="plain name") == [[rare[2]]]
    # A version in the log that the replica has not heard of: answered with what it has, marked stale.
    await s.event_log.append(users.update(rare[0], "Never Announced"))
    stale = await s.users.ListUsers(
        upb.ListUsersRequest(
            page_size=10,
            search=RARE,
            consistency_token=encode_token("user", rare[0], users.versions[rare[0]]),
            max_wait_ms=200,
        )
    )
    assert stale.stale is True and len(stale.users) == 3

    ev = s.seeded.events
    orders = s.seeded.rare_orders
    new_id, placed = ev.place(rare[0], [(s.seeded.products["BLT-2"], 1)], name="Lee Park", email="lee@example.org")
    widget_order = s.seeded.log[USERS + 3 + 10].aggregate_id  # an ordinary order
    await s.append(
        placed,
        ev.cancel(orders[0], S.ORDER_STATUS_PENDING),
        ev.add_item(widget_order, s.seeded.products[f"{RARE}-9"], 1),  # its sku and name now hold the term
    )
    assert await order_pages(s, text="lee park") == [[new_id]]
    assert await order_pages(s, text=RARE, statuses=[S.ORDER_STATUS_CANCELLED]) == [[orders[0]]]
    assert await order_pages(s, text="rare widget") == [[widget_order]]
    found = {o for page in await order_pages(s, text=RARE) for o in page}
    assert found == {*orders, widget_order}


async def test_a_rebuild_gives_the_same_index_and_answers(
    searching: Searching, redis_client: aioredis.Redis, redis_prefix: str, db_pool: Any
) -> None:
    s = searching
    users = s.seeded.users
    await s.append(users.update(s.seeded.rare_users[0], "Renamed Away"))
    before_pages = await user_pages(s, search=RARE, sort_by=upb.USER_SORT_FIELD_USERNAME)
    walked_pages = await user_pages(s, page_size=50, search="u19")  # creation order: the walk
    pointer = await redis_client.get(pointer_key(redis_prefix, "users"))
    assert isinstance(pointer, bytes)
    old = pointer.decode()
    old_index = await dump_keyspace(redis_client, f"{keyspace_prefix(redis_prefix, 'users', old)}users:tri:")
    assert len(old_index) > 1000
    # Sorted sets scored by creation time: "u19" is in u19@, u190@.. and u1900@.. (registered a second apart).
    scores = {score for _, score in old_index["u19"]}
    assert len(old_index["u19"]) == 1 + 10 + 100 + 1_000 and len(scores) == len(old_index["u19"])

    result = await rebuild(redis_client, db_pool, redis_prefix, registered_projections()["users"], grace_s=0.5)

    new_prefix = keyspace_prefix(redis_prefix, "users", result.generation)
    assert await dump_keyspace(redis_client, f"{new_prefix}users:tri:") == old_index
    await eventually(
        lambda: all(
            p.generation == result.generation for p in s.service.projectors if p.status().projection == "users"
        ),
        timeout=10,
    )
    assert await user_pages(s, search=RARE, sort_by=upb.USER_SORT_FIELD_USERNAME) == before_pages
    assert await user_pages(s, page_size=50, search="u19") == walked_pages
    # The rename kept the term in the e-mail; username order: qzxv_11000, user_17500, user_4000.
    rare = s.seeded.rare_users
    assert before_pages == [[rare[1], rare[2]], [rare[0]]]
